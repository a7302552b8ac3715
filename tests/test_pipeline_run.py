"""`rlm-train pipeline`: real runs of small pipelines on CPU (tasks -> generate -> filter with the
scripted teacher; generate against a real local HTTP server), as a user runs them: a subprocess in
a working directory of its own. Finished stages are skipped, a changed stage reruns with what
follows it and its old outputs move aside, Ctrl-C stops a stage that the next run resumes, and a
failing stage is one line with its exit code and the command to rerun it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from rlm_train import cli

REPO = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, stages: list[dict], **extra) -> Path:
    path.write_text("# rlm-train pipeline --recipe " + path.name + "\n" +
                    yaml.safe_dump({"name": "test", "out_dir": "out", **extra, "stages": stages}, sort_keys=False))
    return path


def small_stages(samples: int = 1) -> list[dict]:
    return [
        {"name": "tasks", "run": "tasks make",
         "with": {"out_dir": "tasks", "seed": 0, "context_tokens": [2000], "families": {"niah": {"train": 4, "heldout": 1}}}},
        {"name": "generate", "run": "generate", "recipe": str(REPO / "recipes/generate-scripted-cpu.yaml"),
         "with": {"tasks": "tasks/train.jsonl", "out": "gen", "samples": samples, "concurrency": 2, "progress": False}},
        {"name": "filter", "run": "filter", "recipe": str(REPO / "recipes/filter-paper.yaml"),
         "with": {"trajectories": ["gen"], "out": "data", "validation_fraction": 0.0}},
    ]


def pipeline(cwd: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlm_train.cli", "pipeline", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def state(cwd: Path, stage: str) -> dict:
    return json.loads((cwd / "out" / "pipeline" / f"{stage}.state.json").read_text())


def trajectories(run_dir: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(run_dir.glob("shard-*.jsonl")) for line in shard.read_text().splitlines()]


def test_runs_then_skips_then_reruns_a_changed_stage_and_what_follows(tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", small_stages(samples=1))
    first = pipeline(tmp_path, "--recipe", str(recipe))
    assert first.returncode == 0, first.stderr
    for index, name in enumerate(("tasks", "generate", "filter"), 1):
        assert f"=== [{index}/3] {name}: rlm-train " in first.stdout
        assert state(tmp_path, name)["status"] == "done"
    assert len(trajectories(tmp_path / "gen")) == 4
    assert (tmp_path / "data" / "sft").is_dir()
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert set(timings["stages"]) == {"tasks", "generate", "filter"}
    assert all(entry["status"] == "done" and entry["seconds"] > 0 for entry in timings["stages"].values())
    assert "last full run" in first.stdout and "total" in first.stdout  # the table at the end

    started = {name: state(tmp_path, name)["started"] for name in ("tasks", "generate", "filter")}
    again = pipeline(tmp_path, "--recipe", str(recipe))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped (finished before with the same config") == 3
    assert {name: state(tmp_path, name)["started"] for name in started} == started

    # A changed `with:` key of generate: generate and filter rerun, tasks does not; the old outputs
    # of both move aside, so no trajectory of the old config is read by the new filter.
    old_generate = state(tmp_path, "generate")["fingerprint"]
    write_recipe(recipe, small_stages(samples=2))
    changed = pipeline(tmp_path, "--recipe", str(recipe))
    assert changed.returncode == 0, changed.stderr
    assert "=== [1/3] tasks: skipped" in changed.stdout
    assert "=== [2/3] generate: rlm-train generate" in changed.stdout and "=== [3/3] filter: rlm-train filter" in changed.stdout
    assert "left, from the last run's timings" in changed.stdout  # the estimate from the first run
    assert state(tmp_path, "generate")["fingerprint"] != old_generate
    assert len(trajectories(tmp_path / "gen")) == 8  # 4 tasks x 2 samples, none of the old 4 mixed in
    stale = sorted((tmp_path / "out" / "pipeline" / "stale").iterdir())
    assert [p.name.split("-")[0] for p in stale] == ["filter", "generate"]
    moved_gen = next(p for p in stale if p.name.startswith("generate")) / "gen"
    assert len(trajectories(moved_gen)) == 4
    assert (next(p for p in stale if p.name.startswith("filter")) / "data" / "filter_report.json").is_file()

    # A STAGE.KEY=VALUE override is a config change too: only filter reruns.
    override = pipeline(tmp_path, "--recipe", str(recipe), "filter.min_turns=1")
    assert override.returncode == 0, override.stderr
    assert override.stdout.count("skipped (finished before") == 2 and "=== [3/3] filter: rlm-train filter" in override.stdout


def test_a_failing_stage_is_one_line_with_its_exit_code_and_the_command_to_rerun(tmp_path):
    stages = small_stages()[:1] + [{"name": "filter", "run": "filter", "recipe": str(REPO / "recipes/filter-paper.yaml"),
                                     "with": {"trajectories": ["no-such-run"], "out": "data"}}]
    recipe = write_recipe(tmp_path / "p.yaml", stages)
    result = pipeline(tmp_path, "--recipe", str(recipe))
    assert result.returncode == 2
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("rlm-train pipeline:")]
    assert len(line) == 1, result.stderr
    assert "stage filter (2/2) failed (exit code 2)" in line[0]
    assert "rlm-train filter --recipe out/pipeline/filter.yaml" in line[0]
    assert state(tmp_path, "filter")["status"] == "failed" and state(tmp_path, "tasks")["status"] == "done"


def start_until(tmp_path: Path, recipe: Path, episodes: int) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start the pipeline; return once its stage has written `episodes` trajectories (with the
    stage's processes, to check later that none is left)."""
    proc = subprocess.Popen([sys.executable, "-m", "rlm_train.cli", "pipeline", "--recipe", str(recipe)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(trajectories(tmp_path / "gen")) < episodes and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    assert children, "the stage finished before it could be interrupted"
    return proc, children


def all_gone(procs: list[psutil.Process], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_interrupted_stage_stops_cleanly_and_the_next_run_resumes_it(tmp_path):
    from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
    from rlm_train.testing.mock_server import MockOpenAIServer

    write_scenario_tasks(tmp_path / "tasks.jsonl", 12)
    with MockOpenAIServer(responder=scenario_responder, latency_s=0.25) as server:
        stages = [{"name": "generate", "run": "generate",
                   "with": {"tasks": "tasks.jsonl", "out": "gen", "policy": "openai:mock-model",
                            "base_urls": [server.base_url], "concurrency": 1, "progress": False}}]
        recipe = write_recipe(tmp_path / "p.yaml", stages)
        # Ctrl-C: the stage stops cleanly, recorded as interrupted, exit 130.
        proc, stage_procs = start_until(tmp_path, recipe, 2)
        try:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130, err
        assert "interrupted during stage generate (1/1)" in err and "run the same command again" in err
        assert state(tmp_path, "generate")["status"] == "interrupted"
        assert all_gone(stage_procs, 0)
        done_before = len(trajectories(tmp_path / "gen"))
        assert 2 <= done_before < 12

        # The pipeline itself killed (SIGKILL, no chance to clean up): its stage stops anyway.
        proc, stage_procs = start_until(tmp_path, recipe, done_before + 1)
        proc.kill()
        proc.wait()
        assert all_gone(stage_procs, 30)
        assert len(trajectories(tmp_path / "gen")) < 12  # stopped, not left to run on to the end
        assert state(tmp_path, "generate")["status"] == "running"

        resumed = pipeline(tmp_path, "--recipe", str(recipe))
    assert resumed.returncode == 0, resumed.stderr
    assert "(resuming: last run running)" in resumed.stdout
    records = trajectories(tmp_path / "gen")
    assert sorted(r["task_id"] for r in records) == sorted(f"bench-{i}" for i in range(12))  # each once
    assert not (tmp_path / "out" / "pipeline" / "stale").exists()  # same config: resumed in place


def test_bad_pipeline_input_is_one_line(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "p.yaml", small_stages())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pipeline", "--recipe", str(recipe), "--only", "nope"]) == 2
    assert "no stage named 'nope'; stages: tasks, generate, filter" in capsys.readouterr().err
    bad = write_recipe(tmp_path / "bad.yaml", [{"name": "tasks", "run": "tasks make", "background": True}])
    assert cli.main(["pipeline", "--recipe", str(bad)]) == 2
    assert "background: true is only for `run: serve` stages" in capsys.readouterr().err
    needs = write_recipe(tmp_path / "needs.yaml", small_stages()[:1], requires=[{"path": "models/x", "how": "make x"}])
    assert cli.main(["pipeline", "--recipe", str(needs)]) == 2
    err = capsys.readouterr().err
    assert "requires models/x: not found; make it first: make x" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass

    # A bad key in the last stage stops the pipeline before the first stage runs: one line naming the
    # stage, the key and the closest valid one, and nothing else printed.
    stages = small_stages()
    stages[2]["with"]["min_turnz"] = 2
    typo = write_recipe(tmp_path / "typo.yaml", stages)
    assert cli.main(["pipeline", "--recipe", str(typo)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"rlm-train pipeline: error: {typo}: stage filter: unknown key 'min_turnz'; "
                                 "did you mean 'min_turns'?\n")
    assert not (tmp_path / "tasks").exists() and not (tmp_path / "out" / "pipeline" / "tasks.state.json").exists()


def test_a_pipeline_with_an_eval_stage_writes_its_report_viewer_and_prints_the_results(tmp_path):
    stages = [small_stages()[0],
              {"name": "eval", "run": "eval",
               "with": {"tasks": ["tasks/heldout.jsonl"], "out": "ev", "concurrency": 2, "progress": False,
                        "methods": [{"name": "teacher", "policy": "scripted", "sub_policy": "oracle"}]}}]
    recipe = write_recipe(tmp_path / "p.yaml", stages)
    run = pipeline(tmp_path, "--recipe", str(recipe))
    assert run.returncode == 0, run.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Stages" in report and "## Stage eval (`ev/report.md`)" in report
    # The eval report's relative links now point into its directory, as seen from out/.
    assert "](plots/" not in report and ("](../ev/plots/" in report or "plots" not in report)
    page = (tmp_path / "out" / "viewer.html").read_text()
    assert "<html" in page.lower() and "teacher" in page
    # The score table is printed last, after the timings.
    tail = run.stdout[run.stdout.index("timings:"):]
    assert "results of stage eval" in tail and "| teacher" in tail

    # Once an upstream stage changes, that eval's results are of another config: they are no
    # longer reported (not printed, not in report.md) until the eval reruns.
    changed = pipeline(tmp_path, "--recipe", str(recipe), "--only", "tasks", "tasks.seed=5")
    assert changed.returncode == 0, changed.stderr
    assert "results of stage eval" not in changed.stdout
    assert "## Stage eval" not in (tmp_path / "out" / "report.md").read_text()


