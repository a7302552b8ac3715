"""`rlm-train launch`: every template rendered for every recipe and checked with `bash -n`;
submission order, dependencies and the paths a script writes, checked by stand-in Slurm
commands at the moment `sbatch` is called; bad input refused before anything is submitted; the
early SIGTERM passed from the batch script to the stage's command; `--resume` planned from exit
records and stand-in Slurm states. (tests/test_slurm.py runs the same on a real Slurm.)"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import launch_stand_ins
from conftest import REPO
from launch_stand_ins import lacks_of
from rlm_train import cli
from rlm_train.launch.cluster import ClusterInfo, Partition, check_resources, parse_sinfo
from rlm_train.launch.jobs import stage_command_of
from rlm_train.launch.render import written_paths
from rlm_train.launch.resources import SlurmResources

# launch_stand_ins' fixtures, here under their own names
cluster_software = launch_stand_ins.cluster_software
cluster_environment = launch_stand_ins.cluster_environment

STAGE_RECIPES = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if stage_command_of(p)]
PIPELINE_RECIPES = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if "stages" in (yaml.safe_load(p.read_text()) or {})]

# Stand-ins for sbatch & co. sbatch checks, when it is called, what the real one needs: a script
# bash can parse whose log and redirect targets have their folders already.
FAKE_SBATCH = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, subprocess, sys
    from pathlib import Path
    from rlm_train.launch.render import written_paths
    args = sys.argv[1:]
    log = Path(os.environ["FAKE_SLURM_LOG"])
    if "--test-only" in args:
        print("sbatch: Job 1 to start at now", file=sys.stderr); sys.exit(0)
    script = Path(args[-1])
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    missing = [p for p in written_paths(text) if not Path(p).parent.is_dir()]
    calls = [line for line in log.read_text().splitlines() if '"sbatch"' in line] if log.exists() else []
    job_id = 100 + len(calls)
    with log.open("a") as fh:
        fh.write(json.dumps({{"cmd": "sbatch", "args": args, "missing": missing, "id": job_id}}) + "\\n")
    if str(len(calls) + 1) == os.environ.get("FAKE_SBATCH_FAIL_AT"):
        print("sbatch: error: Batch job submission failed: Invalid account", file=sys.stderr); sys.exit(1)
    print(job_id)
""")
FAKE_SINFO = "#!/bin/sh\nprintf '%s\\n' \"$FAKE_SINFO\"\n"
FAKE_SCONTROL = "#!/bin/sh\necho 'AccountingStorageEnforce = none'\necho 'AccountingStorageType = accounting_storage/none'\n"
FAKE_LOGGER = "#!/bin/sh\necho \"{\\\"cmd\\\": \\\"$(basename $0)\\\", \\\"args\\\": \\\"$*\\\"}\" >> \"$FAKE_SLURM_LOG\"\n"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "sinfo": FAKE_SINFO, "scontrol": FAKE_SCONTROL,
                       "squeue": "#!/bin/sh\nexit 0\n", "scancel": FAKE_LOGGER}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    monkeypatch.setenv("FAKE_SINFO", "gpu*|4|96|1000000|gpu:h100:8(S:0-1)|up\ncpu|8|64|256000|(null)|up")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(tmp_path)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return calls


def every_template_pipeline(tmp_path: Path) -> Path:
    """One pipeline whose stages use every template, in its multi-node / server variants, each
    stage reading what the stages before it write (Qwen/Qwen3-8B from the Hugging Face cache)."""
    r = lambda name: str(REPO / "recipes" / name)  # noqa: E731
    pipeline = {
        "name": "all", "out_dir": str(tmp_path / "all"),
        "requires": [{"model": "Qwen/Qwen3-8B"}],
        "stages": [
            {"name": "tasks", "run": "tasks make", "recipe": r("tasks-tiny.yaml"), "with": {"out_dir": str(tmp_path / "tasks")},
             "slurm": {"partition": "cpu", "cpus_per_task": 8}},
            {"name": "gen", "run": "generate", "recipe": r("generate-vllm.yaml"),
             "with": {"tasks": str(tmp_path / "tasks/train.jsonl"), "out": str(tmp_path / "gen")},
             "slurm": {"shards": 4, "max_parallel": 2, "gpus_per_node": 1, "time": "02:00:00",
                       "server": {"vllm": {"model": "/models/teacher", "args": ["--max-model-len", "32768"]}},
                       "env": {"HF_HOME": "/scratch/hf"}}},
            {"name": "filter", "run": "filter", "recipe": r("filter-paper.yaml"),
             "with": {"trajectories": [str(tmp_path / "gen")], "out": str(tmp_path / "data")}},
            {"name": "sft", "run": "sft", "recipe": r("qwen3-8b-sft-full.yaml"),
             "with": {"dataset": str(tmp_path / "data/sft"), "output_dir": str(tmp_path / "sft")},
             "slurm": {"nodes": 2, "gpus_per_node": 8, "exclusive": True, "mem": "0"}},
            {"name": "grpo", "run": "grpo", "recipe": r("qwen3-8b-grpo.yaml"),
             "with": {"model": str(tmp_path / "sft/model"), "prompts": str(tmp_path / "data/rl"),
                      "output_dir": str(tmp_path / "grpo")},
             "slurm": {"nodes": 3, "vllm_nodes": 1, "gpus_per_node": 8}},
            {"name": "grpo1", "run": "grpo", "recipe": r("qwen3-8b-grpo.yaml"), "after": ["sft"],
             "with": {"model": str(tmp_path / "sft/model"), "prompts": str(tmp_path / "data/rl"),
                      "output_dir": str(tmp_path / "grpo1")}},
            {"name": "eval", "run": "eval", "recipe": r("eval-qwen3-8b.yaml"), "after": ["grpo", "grpo1"],
             "with": {"tasks": [str(tmp_path / "tasks/heldout.jsonl")], "train_tasks": [str(tmp_path / "tasks/train.jsonl")]},
             "slurm": {"gpus_per_node": 1, "server": {"vllm": {"model": "/models/qwen3-8b", "port": 8000}}}},
            {"name": "serve", "run": "serve", "with": {"vllm": {"model": "Qwen/Qwen3-8B", "chat_template": "qwen3"}},
             "after": ["eval"], "slurm": {"gpus_per_node": 1, "time": "1-00:00:00"}},
        ],
    }
    path = tmp_path / "all.yaml"
    path.write_text("# rlm-train launch --recipe all.yaml --slurm\n" + yaml.safe_dump(pipeline, sort_keys=False))
    return path


def split_scripts(text: str) -> dict[str, str]:
    parts = re.split(r"^# ==== stage (\S+): .*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n# ==== ", 1)[0].strip() + "\n" for i in range(1, len(parts), 2)}


def check_script(name: str, script: str, state: Path) -> None:
    assert script.startswith("#!/bin/bash\n"), name
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, f"{name}: {proc.stderr}"
    assert "{{" not in script, f"{name}: an unfilled template field"
    assert re.search(r"^#SBATCH --job-name=\S+", script, re.M) and re.search(r"^#SBATCH --output=/", script, re.M)
    assert f"PY={Path(sys.executable).absolute()}" in script  # the venv's python, by absolute path
    for path in written_paths(script):
        assert Path(path).is_absolute() and Path(path).parent.parent == state.absolute(), (name, path)
        assert Path(path).parent.name in ("logs", "exit"), (name, path)


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.name)
def test_every_stage_recipe_renders_a_script_bash_accepts(recipe, tmp_path, capsys, monkeypatch, cluster_environment):
    """Alone, most stage recipes read inputs no stage of the launch makes: listed, the scripts rendered all the same."""
    monkeypatch.chdir(REPO)
    code = cli.main(["launch", "--recipe", str(recipe), "--slurm", "--dry-run", "--out", str(tmp_path / "l")])
    out, err = capsys.readouterr()
    assert all("no stage of this launch makes it" in lack for lack in lacks_of(code, err)), err
    scripts = split_scripts(out)
    assert len(scripts) == 1
    check_script(recipe.name, next(iter(scripts.values())), tmp_path / "l" / "pipeline" / "slurm")
    assert not (tmp_path / "l").exists()  # a dry run writes nothing


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES, ids=lambda p: p.name)
def test_every_pipeline_recipe_renders_scripts_bash_accepts(recipe, capsys, monkeypatch, cluster_environment):
    """Background serve stages are no jobs: the stages after them start them on their own nodes. With
    what the cluster has (Qwen/Qwen3-8B cached, vLLM installed: stand-ins) a job lacks at most what the
    recipe's `requires:` says is made outside it (the tiny pipeline's model, by a script)."""
    monkeypatch.chdir(REPO)
    code = cli.main(["launch", "--recipe", str(recipe), "--slurm", "--dry-run"])
    out, err = capsys.readouterr()
    assert all(": requires runs/" in lack and "make it first: " in lack for lack in lacks_of(code, err)), err
    pipeline = yaml.safe_load(recipe.read_text())
    state = REPO / pipeline["out_dir"] / "pipeline" / "slurm"
    scripts = split_scripts(out)
    background = {s["name"] for s in pipeline["stages"] if s.get("background")}
    assert list(scripts) == [s["name"] for s in pipeline["stages"] if s["name"] not in background]
    for name, script in scripts.items():
        check_script(name, script, state)
        for stage in pipeline["stages"]:
            if stage["name"] == name:
                started = [a for a in stage.get("after", []) if a in background]
                assert all(f"pipeline/{a}.yaml|" in script for a in started), (name, started)


def test_every_template_renders_in_one_pipeline_and_bash_accepts_it(tmp_path, capsys, monkeypatch, cluster_environment):
    monkeypatch.chdir(REPO)
    code = cli.main(["launch", "--recipe", str(every_template_pipeline(tmp_path)), "--slurm", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    scripts = split_scripts(out)
    assert list(scripts) == ["tasks", "gen", "filter", "sft", "grpo", "grpo1", "eval", "serve"]
    used = {re.search(r"this script: slurm/(\S+) ----", s).group(1) for s in scripts.values()}
    from rlm_train import registry

    assert used == {registry.stage(name).slurm_template for name in registry.stage_names()}
    state = tmp_path / "all" / "pipeline" / "slurm"
    for name, script in scripts.items():
        check_script(name, script, state)
    gen, sft, grpo, grpo1 = scripts["gen"], scripts["sft"], scripts["grpo"], scripts["grpo1"]
    assert "#SBATCH --array=0-3%2" in gen and "#SBATCH --gpus-per-node=1" in gen and "export HF_HOME=/scratch/hf" in gen
    assert '--shard "$SHARD/$SHARDS"' in gen and "SHARDS=4" in gen and f"SERVERS=('{state.absolute()}/gen-server.yaml|8000|1')" in gen
    assert "--no-progress 'base_urls=[http://127.0.0.1:8000/v1]'" in gen
    assert "#SBATCH --nodes=2" in sft and "#SBATCH --exclusive" in sft and "#SBATCH --mem=0" in sft
    assert "--cpus-per-task=" not in sft.split("# ---- common")[0]  # exclusive: all of the node's CPUs
    assert '--machine_rank "$SLURM_NODEID"' in sft and "scontrol show hostnames" in sft
    assert "ACCELERATE_CONFIG=recipes/accelerate/fsdp-8gpu.yaml" in sft
    assert "VLLM_NODES=1" in grpo and "#SBATCH --nodes=3" in grpo and "VLLM_GPUS=2" in grpo
    assert "#SBATCH --gpus-per-node=8" in grpo1 and "VLLM_NODES=0" in grpo1  # 6 training + 2 vLLM GPUs, implied
    assert "#SBATCH --partition=cpu" in scripts["tasks"] and "#SBATCH --time=1-00:00:00" in scripts["serve"]
    server = yaml.safe_load(out.split(f"# ==== {state.absolute()}/gen-server.yaml (the server this stage starts)\n")[1]
                            .split("# ====")[0])
    assert server["vllm"] == {"model": "/models/teacher", "args": ["--max-model-len", "32768"], "host": "127.0.0.1"}
    assert not (tmp_path / "all").exists()


def test_launch_submits_in_order_after_creating_every_path_the_scripts_write(tmp_path, fake_slurm, cluster_environment):
    pipeline = every_template_pipeline(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "rlm_train.cli", "launch", "--recipe", str(pipeline), "--slurm"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    submits = [c for c in fake_slurm() if c["cmd"] == "sbatch"]
    assert [Path(c["args"][-1]).stem for c in submits] == ["tasks", "gen", "filter", "sft", "grpo", "grpo1", "eval", "serve"]
    assert all(c["missing"] == [] for c in submits)  # every log/exit folder existed when sbatch ran
    ids = {Path(c["args"][-1]).stem: str(c["id"]) for c in submits}
    deps = {Path(c["args"][-1]).stem: next((a for a in c["args"] if a.startswith("--dependency=")), None) for c in submits}
    assert deps["tasks"] is None and deps["gen"] == f"--dependency=afterok:{ids['tasks']}"
    assert deps["grpo1"] == f"--dependency=afterok:{ids['sft']}"
    assert deps["eval"] == f"--dependency=afterok:{ids['grpo']}:{ids['grpo1']}"
    assert all("--kill-on-invalid-dep=yes" in c["args"] for c in submits if deps[Path(c["args"][-1]).stem])
    state = tmp_path / "all" / "pipeline" / "slurm"
    record = json.loads((state / "launch.json").read_text())
    assert {s["name"]: s["job_id"] for s in record["stages"]} == ids
    assert record["stages"][1]["outputs"]["run_dir"].rstrip("/") == str(tmp_path / "gen")
    assert (state / "gen-server.yaml").is_file() and (tmp_path / "all" / "pipeline" / "sft.yaml").is_file()
    assert "submitted 8 job(s)" in proc.stdout


def launch(pipeline: Path, *extra: str):
    return subprocess.run([sys.executable, "-m", "rlm_train.cli", "launch", "--recipe", str(pipeline), "--slurm", *extra],
                          capture_output=True, text=True, timeout=300)


def small_pipeline(tmp_path: Path, **slurm) -> Path:
    path = tmp_path / "p.yaml"
    stages = [{"name": "tasks", "run": "tasks make", "recipe": str(REPO / "recipes/tasks-tiny.yaml"),
               "with": {"out_dir": str(tmp_path / "tasks")}, "slurm": slurm},
              {"name": "again", "run": "tasks make", "recipe": str(REPO / "recipes/tasks-tiny.yaml"),
               "with": {"out_dir": str(tmp_path / "tasks2")}}]
    path.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "p"), "stages": stages}))
    return path


@pytest.mark.parametrize("slurm,env,message", [
    ({"gpus_per_node": 16}, {}, "stage tasks: needs 16 GPU(s) per node but partition gpu has 8 per node"),
    ({"partition": "nope"}, {}, "slurm.partition 'nope' does not exist on this cluster; partitions: cpu, gpu"),
    ({}, {"FAKE_SINFO": "a|1|8|1000|(null)|up"}, "no partition given and the cluster has no default one"),
    ({"nodes": 9, "partition": "cpu"}, {}, "slurm.nodes=9 but partition cpu has 8 node(s)"),
    ({"mem": "2T"}, {}, "stage tasks: slurm.mem=2T asks 2097152 MB per node but partition gpu's nodes have 1000000 MB"),
    ({"cpus_per_task": 128}, {}, "stage tasks: slurm.cpus_per_task=128 asks 128 CPUs per node but partition gpu's nodes have 96"),
    # What the job asks for by default is checked too: 8 CPUs and 96G per GPU.
    ({"gpus_per_node": 8}, {"FAKE_SINFO": "gpu*|4|48|1000000|gpu:h100:8(S:0-1)|up"},
     "stage tasks: slurm.cpus_per_task=64 (default: 8 per GPU x 8) asks 64 CPUs per node but partition gpu's nodes "
     "have 48; set slurm.cpus_per_task <= 48 or exclusive: true"),
])
def test_resources_the_cluster_lacks_are_refused_before_anything_is_submitted(tmp_path, fake_slurm, monkeypatch,
                                                                             slurm, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    proc = launch(small_pipeline(tmp_path, **slurm))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "nothing submitted" in proc.stderr
    assert [c for c in fake_slurm() if c["cmd"] == "sbatch"] == [] and not (tmp_path / "p").exists()


def test_sbatch_absent_and_a_failed_submission(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL_AT", "2")
    proc = launch(small_pipeline(tmp_path))
    assert proc.returncode == 2 and "Invalid account; cancelled the jobs already submitted (100)" in proc.stderr
    assert [c["args"] for c in fake_slurm() if c["cmd"] == "scancel"] == ["100"]
    assert not (tmp_path / "p" / "pipeline" / "slurm" / "launch.json").exists()

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no Slurm commands at all
    proc = launch(small_pipeline(tmp_path))
    assert proc.returncode == 2 and "sinfo not found on PATH: run `rlm-train launch` on a Slurm login node" in proc.stderr
    dry = launch(small_pipeline(tmp_path), "--dry-run")  # rendering needs no Slurm
    assert dry.returncode == 0 and dry.stdout.count("#!/bin/bash") == 2


def test_accounts_and_resource_typos_are_clear():
    cluster = ClusterInfo({"gpu": Partition("gpu", 2, 64, 512000, 8)}, "gpu", accounts_enforced=True,
                          accounts=["lab-a", "lab-b"], default_account=None, accounting=True)
    assert check_resources("sft", SlurmResources(), cluster) == [
        "stage sft: this cluster charges jobs to accounts and you have no default one; set slurm.account (yours: lab-a, lab-b)"]
    assert "slurm.account 'lab-c' is not one of yours" in check_resources("sft", SlurmResources(account="lab-c"), cluster)[0]
    assert check_resources("sft", SlurmResources(account="lab-b", gpus_per_node=8), cluster) == []
    parts, default = parse_sinfo("gpu*|2|64|512000|gpu:h100:4(S:0),gpu:a100:4|up\ngpu*|1|64|512000|gpu:8|up\n")
    assert default == "gpu" and parts["gpu"].nodes == 3 and parts["gpu"].gpus_per_node == 8


def test_bad_recipes_fail_with_the_field_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["launch", "--recipe", str(small_pipeline(tmp_path, gpus=1)), "--slurm", "--dry-run"]) == 2
    assert "stage tasks: slurm: unknown key 'gpus'" in capsys.readouterr().err
    assert cli.main(["launch", "--recipe", str(small_pipeline(tmp_path, time="1h")), "--slurm", "--dry-run"]) == 2
    assert "key 'time': Value error, use MM, HH:MM:SS or D-HH:MM:SS" in capsys.readouterr().err
    assert cli.main(["launch", "--recipe", str(small_pipeline(tmp_path, shards=2)), "--slurm", "--dry-run"]) == 2
    assert "only generate stages run as shards" in capsys.readouterr().err
    assert cli.main(["launch", "--recipe", str(small_pipeline(tmp_path)), "--dry-run"]) == 2
    assert "pass --slurm" in capsys.readouterr().err
    bare = tmp_path / "bare.yaml"
    bare.write_text("tasks: a.jsonl\n")
    assert cli.main(["launch", "--recipe", str(bare), "--slurm", "--dry-run"]) == 2
    assert "its first line names no stage command; pass --stage-command" in capsys.readouterr().err
    assert cli.main(["launch", "--status", str(tmp_path / "nowhere")]) == 2
    assert "no launch found" in capsys.readouterr().err


def test_status_names_the_failed_stage_and_what_never_ran(tmp_path, fake_slurm, capsys):
    proc = launch(small_pipeline(tmp_path))
    assert proc.returncode == 0, proc.stderr
    state = tmp_path / "p" / "pipeline" / "slurm"
    (state / "logs" / "tasks-100.out").write_text("rlm-train tasks: error: out_dir: disk full\n")
    (state / "exit" / "tasks.100").write_text("2\n")
    os.environ["PATH"] = os.environ["PATH"]  # squeue/scontrol (fakes) know nothing: the exit records decide
    assert cli.main(["launch", "--status", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"tasks\s+job 100\s+FAILED\s+100 exit 2", out)
    assert "error: tasks-100.out: rlm-train tasks: error: out_dir: disk full" in out
    assert re.search(r"again\s+job 101\s+CANCELLED\s+never runs: tasks failed", out)


def test_a_rendered_script_starts_its_servers_then_stops_them(tmp_path, fake_slurm):
    """Run a rendered script as the node would (plain bash, outside Slurm): the background serve
    stage in its `after` (the RLM gateway in front of a mock server) starts on 127.0.0.1, answers
    /health, the stage runs, and the server is gone when the script ends."""
    import socket
    import urllib.request

    from rlm_train.testing.mock_server import MockOpenAIServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with MockOpenAIServer() as mock:
        stages = [{"name": "gw", "run": "serve", "background": True,
                   "with": {"gateway": {"enabled": True, "port": port, "base_urls": [mock.base_url]}}},
                  {"name": "tasks", "run": "tasks make", "recipe": str(REPO / "recipes/tasks-tiny.yaml"), "after": ["gw"],
                   "with": {"out_dir": str(tmp_path / "tasks"), "families": {"niah": {"train": 2, "heldout": 0}}}}]
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "p"), "stages": stages}))
        assert launch(pipeline).returncode == 0
        state = tmp_path / "p" / "pipeline" / "slurm"
        script = (state / "tasks.sbatch").read_text()
        assert f"gw.yaml|{port}|0'" in script and [Path(c["args"][-1]).stem for c in fake_slurm() if c["cmd"] == "sbatch"] == ["tasks"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        proc = subprocess.run(["bash", str(state / "tasks.sbatch")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (state / "exit" / "tasks.local").read_text().strip() == "0"
    assert (tmp_path / "tasks" / "train.jsonl").is_file()
    log = (state / "logs" / f"tasks-server-{port}.local.log").read_text()
    assert f"127.0.0.1:{port}" in log, log
    with pytest.raises(OSError):  # stopped with the job
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_a_term_to_the_batch_script_reaches_the_stage_command_and_a_rerun_resumes(tmp_path, fake_slurm):
    """What `--signal=B:TERM@N` does on a node, here with plain bash: the TERM reaches the batch script
    alone; the script passes it to the stage's command (generation, its server never answering),
    waits for it to stop, and records 143. The same script run again resumes and completes."""
    import signal
    import time

    from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
    from rlm_train.rollouts.shards import check_run
    from rlm_train.testing.mock_server import FailPlan, MockOpenAIServer

    write_scenario_tasks(tmp_path / "tasks.jsonl", 2)
    with MockOpenAIServer(responder=scenario_responder, fail_plan=FailPlan(p=1.0, mode="hang", hang_s=600)) as server:
        stages = [{"name": "gen", "run": "generate",
                   "with": {"tasks": str(tmp_path / "tasks.jsonl"), "out": str(tmp_path / "gen"), "policy": "openai:mock",
                            "base_urls": [server.base_url], "samples": 1, "concurrency": 2, "rlm": {"max_iterations": 4}}}]
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "p"), "stages": stages}))
        assert launch(pipeline).returncode == 0
        state = tmp_path / "p" / "pipeline" / "slurm"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        job = subprocess.Popen(["bash", str(state / "gen.sbatch")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
        deadline = time.monotonic() + 120
        while server.counts["hang"] < 1 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.counts["hang"] >= 1, "the stage never asked its server"
        job.send_signal(signal.SIGTERM)  # to the batch shell only, as B: does
        out, _ = job.communicate(timeout=60)  # the shell passed it on: nothing waits for the hung requests
        assert job.returncode == 143, out
        pid = int(re.search(r"stage gen: SIGTERM at \S+: passed to the stage's command \(pid (\d+)\)", out).group(1))
        assert "SIGTERM: stopping" in out  # generation's own handler ran
        assert not Path(f"/proc/{pid}").exists()  # waited for, not orphaned
        assert (state / "exit" / "gen.local").read_text().strip() == "143"

        server.fail_plan = FailPlan()
        again = subprocess.run(["bash", str(state / "gen.sbatch")], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (state / "exit" / "gen.local").read_text().strip() == "0"
    assert check_run([tmp_path / "gen"]).complete


def write_launch_record(tmp_path: Path) -> tuple[Path, Path]:
    """tasks -> gen (3 shards) -> filter, launched through the stand-in sbatch (jobs 100, 101, 102)."""
    stages = [{"name": "tasks", "run": "tasks make", "recipe": str(REPO / "recipes/tasks-tiny.yaml"),
               "with": {"out_dir": str(tmp_path / "tasks")}},
              {"name": "gen", "run": "generate", "recipe": str(REPO / "recipes/generate-scripted-cpu.yaml"),
               "with": {"tasks": str(tmp_path / "tasks/train.jsonl"), "out": str(tmp_path / "gen")},
               "slurm": {"shards": 3, "max_parallel": 2}},
              {"name": "filter", "run": "filter", "recipe": str(REPO / "recipes/filter-paper.yaml"),
               "with": {"trajectories": [str(tmp_path / "gen")], "out": str(tmp_path / "data")}}]
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "p"), "stages": stages}))
    proc = launch(pipeline)
    assert proc.returncode == 0, proc.stderr
    return pipeline, tmp_path / "p" / "pipeline" / "slurm"


def test_resume_resubmits_what_did_not_complete_and_keeps_the_job_history(tmp_path, fake_slurm, capsys, monkeypatch):
    from rlm_train.launch import status
    from rlm_train.launch.cluster import JobState

    _, state = write_launch_record(tmp_path)
    slurm: dict[str, list[JobState]] = {}
    monkeypatch.setattr(status, "job_states", lambda ids: {i: slurm.get(i, []) for i in ids})
    # tasks completed; gen's shard 0 completed, shard 1 stopped by the time limit's early signal,
    # shard 2 killed at the limit before recording; filter cancelled by Slurm (its afterok can never hold).
    (state / "exit" / "tasks.100").write_text("0\n")
    (state / "exit" / "gen.101_0").write_text("0\n")
    (state / "exit" / "gen.101_1").write_text("143\n")
    slurm.update({"101": [JobState("101_1", "FAILED"), JobState("101_2", "TIMEOUT")],
                  "102": [JobState("102", "CANCELLED", "DependencyNeverSatisfied")]})
    run = str(tmp_path / "p")
    assert cli.main(["launch", "--status", run]) == 1
    out = capsys.readouterr().out
    assert re.search(r"gen\s+job 101\[3\]\s+TIMEOUT\s+101_1 exit 143 \(143: stopped by SIGTERM", out), out
    assert re.search(rf"filter\s+job 102\s+CANCELLED\s+never runs: gen timed out; fix it, then rlm-train launch --resume {run}", out)

    # A failed shard while another still waits: not yet (its job would run beside the resubmitted one).
    slurm["101"], waiting = [JobState("101_1", "FAILED"), JobState("101_2", "PENDING")], slurm["101"]
    assert cli.main(["launch", "--resume", run]) == 2
    assert "nothing to resume yet: gen (job 101, FAILED; 101_2 not ended) still queued or running" in capsys.readouterr().err
    slurm["101"] = waiting

    assert cli.main(["launch", "--resume", run, "--dry-run"]) == 0
    assert re.search(r"^gen: would resubmit \S+/gen.sbatch \[tasks 1,2\]", capsys.readouterr().out, re.M)
    assert len([c for c in fake_slurm() if c["cmd"] == "sbatch"]) == 3  # the launch's three, nothing more

    assert cli.main(["launch", "--resume", run]) == 0
    out = capsys.readouterr().out
    submits = [c for c in fake_slurm() if c["cmd"] == "sbatch"][3:]  # after the launch's three
    assert [(Path(c["args"][-1]).stem, c["id"]) for c in submits] == [("gen", 103), ("filter", 104)]
    assert "--array=1,2%2" in submits[0]["args"]  # only the shards that did not exit 0
    assert "--dependency=afterok:103" in submits[1]["args"]  # on the new gen job; tasks is done
    assert "gen: job 103 [tasks 1,2]  (was job 101: TIMEOUT" in out
    assert "filter: job 104 after gen (103)  (was job 102: CANCELLED, never runs: gen timed out" in out
    assert "resubmitted 2 stage(s); completed, not rerun: tasks;" in out
    record = json.loads((state / "launch.json").read_text())
    by_name = {s["name"]: s for s in record["stages"]}
    assert by_name["gen"]["job_id"] == "103" and by_name["gen"]["attempts"] == [
        {"job_id": "101", "tasks": None}, {"job_id": "103", "tasks": [1, 2]}]
    assert by_name["tasks"]["attempts"] == [{"job_id": "100", "tasks": None}] and len(record["resumed"]) == 1

    # While the resubmitted jobs wait or run: nothing to resume yet, one line.
    slurm.update({"103": [JobState("103_1", "RUNNING"), JobState("103_2", "PENDING")],
                  "104": [JobState("104", "PENDING", "Dependency")]})
    assert cli.main(["launch", "--resume", run]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing to resume yet: gen (job 103, RUNNING), filter (job 104, PENDING) still queued" in err

    # Once they end well, shard 0 of the first job and shards 1, 2 of the second make gen complete
    # (shard 1's old 143 no longer counts).
    for name in ("gen.103_1", "gen.103_2", "filter.104"):
        (state / "exit" / name).write_text("0\n")
    slurm.update({"103": [], "104": []})
    assert cli.main(["launch", "--status", run]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gen\s+job 103\[3\]\s+COMPLETED\s+3 task\(s\), exit 0", out), out
    assert "resubmitted by launch --resume; earlier job(s): 101" in out
    assert cli.main(["launch", "--resume", run]) == 2
    assert capsys.readouterr().err.strip().endswith("nothing to resume: all 3 stage(s) completed")
    assert cli.main(["launch", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no launch found" in capsys.readouterr().err
