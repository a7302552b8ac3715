"""`rlm-train launch --slurm` on a real single-node Slurm (slurmctld + slurmd + munge, started by
scripts/slurm_up.sh, i.e. `make slurm-up`): an array job of 2 generation shards against a local
mock server, a filter job and a dependent SFT job on a tiny model; then the outputs. A stage
stopped by its time limit's early signal, then `launch --resume`. Skips with the reason where
Slurm cannot be started (not root, no apt-get, daemons that will not start)."""

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
from rlm_train.rollouts import store
from rlm_train.rollouts.shards import check_run
from rlm_train.testing.mock_server import MockOpenAIServer

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm; stopped at the end only if this fixture started it."""
    was_up = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    if not was_up:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_up.sh")], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            pytest.skip(f"no Slurm here: {reason}")
    yield
    if not was_up:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_down.sh")], capture_output=True, timeout=120)


def rlm(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlm_train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def write_pipeline(tmp: Path, base_url: str, gen_out: str = "out/gen") -> Path:
    stages = [
        {"name": "gen", "run": "generate",
         "with": {"tasks": "tasks.jsonl", "out": gen_out, "policy": "openai:mock", "base_urls": [base_url],
                  "samples": 2, "concurrency": 4, "client": {"max_retries": 1}, "max_consecutive_failures": 2,
                  "rlm": {"max_iterations": 4}},
         "slurm": {"shards": 2, "cpus_per_task": 1, "time": "00:15:00"}},
        {"name": "filter", "run": "filter",
         "with": {"trajectories": [gen_out], "out": "out/data", "validation_fraction": 0.0},
         "slurm": {"cpus_per_task": 1, "time": "00:10:00"}},
        {"name": "sft", "run": "sft", "recipe": str(REPO / "recipes" / "tiny-cpu-sft.yaml"),
         "with": {"model": "model", "dataset": "out/data/sft", "output_dir": "out/sft", "save_merged": False,
                  "training": {"max_steps": 3, "save_steps": 3, "max_length": 3072}},
         "slurm": {"cpus_per_task": 2, "time": "00:20:00"}},
    ]
    path = tmp / "pipeline.yaml"
    path.write_text("# rlm-train launch --recipe pipeline.yaml --slurm\n"
                    + yaml.safe_dump({"name": "tiny", "out_dir": "out", "stages": stages}, sort_keys=False))
    return path


def test_shards_then_filter_then_sft_on_a_real_slurm(slurm, tmp_path):
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    build_tiny_qwen3(tmp_path / "model")
    write_scenario_tasks(tmp_path / "tasks.jsonl", 6)
    with MockOpenAIServer(responder=scenario_responder) as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        submitted = rlm("launch", "--recipe", str(pipeline), "--slurm", cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        ids = dict(re.findall(r"^(\w+): job (\d+)", submitted.stdout, re.M))
        assert list(ids) == ["gen", "filter", "sft"]
        status = rlm("launch", "--status", "out", "--wait", cwd=tmp_path, timeout=840)
    assert status.returncode == 0, status.stdout + status.stderr
    for stage in ("gen", "filter", "sft"):
        assert re.search(rf"^  {stage}\s+job {ids[stage]}\S*\s+COMPLETED", status.stdout, re.M), status.stdout

    # Two array tasks, one shard file each, exactly one record per (task, sample) across them.
    run = tmp_path / "out" / "gen"
    shards = store.shard_files(run)
    assert sorted(re.search(r"-(\dof2)-", p.name).group(1) for p in shards) == ["0of2", "1of2"]
    pairs = Counter((json.loads(line)["task_id"], json.loads(line)["sample"])
                    for path in shards for line in path.read_text().splitlines())
    assert pairs == Counter({(f"bench-{i}", k): 1 for i in range(6) for k in range(2)})
    assert check_run([run]).complete
    assert "records: 12 of 12 (task, sample) pairs" in status.stdout
    assert (tmp_path / "out" / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    # The jobs ran the venv's interpreter (no activated venv in the job's environment).
    script = (tmp_path / "out" / "pipeline" / "slurm" / "gen.sbatch").read_text()
    assert f"PY={Path(sys.executable).absolute()}" in script


def test_a_failed_stage_cancels_what_depends_on_it(slurm, tmp_path):
    write_scenario_tasks(tmp_path / "tasks.jsonl", 2)
    pipeline = write_pipeline(tmp_path, "http://127.0.0.1:9/v1", gen_out="out/dead")  # nothing listens there
    submitted = rlm("launch", "--recipe", str(pipeline), "--slurm", "--stages", "gen,filter", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    filter_id = re.search(r"^filter: job (\d+)", submitted.stdout, re.M).group(1)
    status = rlm("launch", "--status", "out", "--wait", cwd=tmp_path, timeout=600)
    assert status.returncode == 1, status.stdout
    assert re.search(r"^  gen\s+job \d+\[2\]\s+FAILED\s+\d+_0 exit 2, \d+_1 exit 2", status.stdout, re.M), status.stdout
    assert "no answer from the server" in status.stdout  # the stage's own error, from its log
    assert re.search(r"^  filter\s+job \d+\s+CANCELLED\s+never runs: gen failed", status.stdout, re.M), status.stdout
    # Slurm itself cancelled the dependent job (--kill-on-invalid-dep), it is not left pending.
    job = subprocess.run(["scontrol", "show", "job", "-o", filter_id], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in job or job == ""


def test_a_stage_stopped_by_its_time_limit_resumes_with_launch_resume(slurm, tmp_path):
    """gen runs with a 2-minute limit and its early signal 60 s before it, against a server that never
    answers: Slurm's SIGTERM reaches the batch script, which passes it to generation, which stops
    (exit 143) before the limit; filter, waiting on it, never runs and --status says why. With the
    server answering, `launch --resume` submits both again (gen's two shards, filter after them) and
    both complete."""
    from rlm_train.testing.mock_server import FailPlan

    write_scenario_tasks(tmp_path / "tasks.jsonl", 4)
    with MockOpenAIServer(responder=scenario_responder, fail_plan=FailPlan(p=1.0, mode="hang", hang_s=600)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        spec = yaml.safe_load(pipeline.read_text())
        spec["stages"] = spec["stages"][:2]
        # slurmctld sends the signal at its first time-limit check (every 30 s) within signal_s + 30 s of
        # the limit: here 30-60 s after the start, once generation runs.
        spec["stages"][0]["slurm"].update(time="00:02:00", signal_s=60)
        pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
        submitted = rlm("launch", "--recipe", str(pipeline), "--slurm", cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        gen_id = re.search(r"^gen: job (\d+)", submitted.stdout, re.M).group(1)
        stopped = rlm("launch", "--status", "out", "--wait", cwd=tmp_path, timeout=300)
        assert stopped.returncode == 1, stopped.stdout
        assert re.search(rf"^  gen\s+job {gen_id}\[2\]\s+FAILED\s+{gen_id}_0 exit 143, {gen_id}_1 exit 143 \(143: stopped by SIGTERM",
                         stopped.stdout, re.M), stopped.stdout
        assert re.search(r"^  filter\s+job \d+\s+CANCELLED\s+never runs: gen failed; fix it, then rlm-train launch --resume out",
                         stopped.stdout, re.M), stopped.stdout
        logs = tmp_path / "out" / "pipeline" / "slurm" / "logs"
        for task in (0, 1):
            log = (logs / f"gen-{gen_id}_{task}.out").read_text()
            assert re.search(r"stage gen: SIGTERM at \S+: passed to the stage's command", log) and "SIGTERM: stopping" in log, log
        # The early signal stopped it, not the limit's kill: Slurm saw the script end on its own, before the limit.
        job = subprocess.run(["scontrol", "show", "job", "-o", gen_id], capture_output=True, text=True).stdout
        assert "JobState=FAILED" in job and "TIMEOUT" not in job, job
        assert all(t < "00:02:00" for t in re.findall(r"RunTime=(\S+)", job)), job

        server.fail_plan = FailPlan()
        resumed = rlm("launch", "--resume", "out", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        new_gen = re.search(r"^gen: job (\d+) \[tasks 0,1\]", resumed.stdout, re.M).group(1)
        assert re.search(rf"^filter: job \d+ after gen \({new_gen}\)", resumed.stdout, re.M), resumed.stdout
        done = rlm("launch", "--status", "out", "--wait", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^  gen\s+job {new_gen}\[2\]\s+COMPLETED", done.stdout, re.M), done.stdout
    assert f"earlier job(s): {gen_id}" in done.stdout
    assert re.search(r"^  filter\s+job \d+\s+COMPLETED", done.stdout, re.M), done.stdout
    assert check_run([tmp_path / "out" / "gen"]).complete
    assert (tmp_path / "out" / "data" / "sft").exists()
    # A finished run: nothing to resume, one line.
    again = rlm("launch", "--resume", "out", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().endswith("nothing to resume: all 2 stage(s) completed")


def test_a_cancelled_stage_stops_gracefully_and_resumes(slurm, tmp_path):
    """scancel signals every process of the job: the batch script sees the job ending and passes
    nothing on, so generation gets one SIGTERM (a second would stop it at once, unsaved) and
    writes its summary; `launch --resume` submits the cancelled stage again."""
    from rlm_train.testing.mock_server import FailPlan

    write_scenario_tasks(tmp_path / "tasks.jsonl", 2)
    with MockOpenAIServer(responder=scenario_responder, fail_plan=FailPlan(p=1.0, mode="hang", hang_s=600)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        spec = yaml.safe_load(pipeline.read_text())
        spec["stages"] = spec["stages"][:1]
        spec["stages"][0]["slurm"]["shards"] = 1
        pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
        submitted = rlm("launch", "--recipe", str(pipeline), "--slurm", cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        gen_id = re.search(r"^gen: job (\d+)", submitted.stdout, re.M).group(1)
        for _ in range(600):
            if server.counts["hang"] >= 1:
                break
            time.sleep(0.1)
        assert server.counts["hang"] >= 1, "the job never asked its server"
        subprocess.run(["scancel", gen_id], check=True, timeout=60)
        stopped = rlm("launch", "--status", "out", "--wait", cwd=tmp_path, timeout=300)
        assert re.search(rf"^  gen\s+job {gen_id}\s+CANCELLED\s+{gen_id} exit 143", stopped.stdout, re.M), stopped.stdout
        log = (tmp_path / "out" / "pipeline" / "slurm" / "logs" / f"gen-{gen_id}.out").read_text()
        assert re.search(r"stage gen: SIGTERM at \S+, the job (COMPLETING|CANCELLED): waiting for the stage's command", log), log
        assert "passed to the stage's command" not in log and "rlm-train generate: stopped:" in log, log

        server.fail_plan = FailPlan()
        resumed = rlm("launch", "--resume", "out", cwd=tmp_path)
        assert resumed.returncode == 0 and re.search(r"^gen: job \d+  \(was job \d+: CANCELLED", resumed.stdout, re.M), \
            resumed.stdout + resumed.stderr
        done = rlm("launch", "--status", "out", "--wait", cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and re.search(r"^  gen\s+job \d+\s+COMPLETED", done.stdout, re.M), done.stdout
    assert check_run([tmp_path / "out" / "gen"]).complete
