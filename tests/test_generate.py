"""`rlm-train generate`: resumable concurrent generation against real local servers."""

import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rlm_train.errors import UserError
from rlm_train.testing.mock_server import FailPlan, MockHTTPError, MockOpenAIServer
from rlm_train.models.openai_client import OpenAIPolicy
from rlm_train.records import Outcome
from rlm_train.rlm import RLMConfig
from rlm_train.rollouts import store
from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
from rlm_train.rollouts.generate import GenerateConfig, run_generate


def shard_lines(out: Path) -> list[str]:
    return [line for path in store.shard_files(out) for line in path.read_text().splitlines()]


def pairs(out: Path) -> Counter:
    return Counter((json.loads(line)["task_id"], json.loads(line)["sample"]) for line in shard_lines(out))


def config(tmp_path, tasks, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("rlm", RLMConfig(max_iterations=4))
    return GenerateConfig(tasks=str(tasks), out=str(tmp_path / "out"), **kw)


def test_scripted_run_scores_every_sample_and_a_rerun_adds_nothing(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 4)
    summary = run_generate(config(tmp_path, tasks, policy="scripted", samples=3, concurrency=4))
    assert summary["records"] == 12 and summary["this_run"]["episodes"] == 12
    assert set(pairs(tmp_path / "out")) == {(f"bench-{i}", k) for i in range(4) for k in range(3)}
    # The scripted teacher finds "The answer is: keyN" with code; the task scorer agrees.
    records = store.read_records(tmp_path / "out")
    assert all(r["outcome"] == Outcome.FINAL and r["score"] == 1.0 for r in records), [r["final"] for r in records]
    assert all(r["family"] == "niah" and r["stats"]["turns"] >= 2 for r in records)
    again = run_generate(config(tmp_path, tasks, policy="scripted", samples=3, concurrency=4))
    assert again["this_run"]["episodes"] == 0 and again["records"] == 12
    assert max(pairs(tmp_path / "out").values()) == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["by_family"]["niah"]["mean_score"] == 1.0


def test_a_different_run_in_the_same_directory_is_refused(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)
    run_generate(config(tmp_path, tasks, policy="scripted"))
    with pytest.raises(UserError, match="samples is 1 there, 2 here"):
        run_generate(config(tmp_path, tasks, policy="scripted", samples=2))
    with pytest.raises(UserError, match=r"rlm\.max_iterations is 4 there, 6 here"):
        run_generate(config(tmp_path, tasks, policy="scripted", rlm=RLMConfig(max_iterations=6)))
    write_scenario_tasks(tasks, 3)  # the task file changed
    with pytest.raises(UserError, match="tasks_sha256"):
        run_generate(config(tmp_path, tasks, policy="scripted"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and has no manifest.json"):
        run_generate(GenerateConfig(tasks=str(tasks), out=str(other), policy="scripted", progress=False))


def test_bad_task_line_is_fatal_with_its_line_number_or_skipped_by_flag(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)
    lines = tasks.read_text().splitlines()
    lines.insert(1, '{"schema": "rlm-train/task/v1", "id": "broken", "query": ')
    lines.insert(3, json.dumps({"schema": "rlm-train/task/v1", "id": "nocontext", "query": "q"}))
    tasks.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"tasks\.jsonl:2: not valid JSON.*--skip-bad-lines"):
        run_generate(config(tmp_path, tasks, policy="scripted"))
    summary = run_generate(config(tmp_path, tasks, policy="scripted", skip_bad_lines=True))
    assert summary["records"] == 3
    bad = summary["this_run"]["bad_task_lines"]
    assert len(bad) == 2 and bad[0].endswith(":2: not valid JSON (Expecting value)")
    assert ":4: task 'nocontext' has neither 'context' nor 'context_path'" in bad[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_never_answers_stops_the_run_and_records_nothing(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 6)
    port = _free_port()  # nothing listens there
    cfg = config(tmp_path, tasks, policy="openai:mock-model", base_urls=[f"http://127.0.0.1:{port}/v1"],
                 client={"max_retries": 1}, max_consecutive_failures=4, concurrency=2)
    with pytest.raises(UserError, match=r"in a row got no answer from the server.*no answer after 2 attempts"):
        run_generate(cfg)
    assert shard_lines(tmp_path / "out") == []  # nothing marked done: a re-run retries them all
    # The server comes up on that port: the same command now finishes the run.
    with MockOpenAIServer(responder=scenario_responder, port=port):
        summary = run_generate(cfg)
    assert summary["records"] == 6 and summary["outcomes"] == {Outcome.FINAL: 6}
    assert summary["mean_score"] == 1.0


@pytest.mark.slow
def test_20_percent_failing_server_completes_counts_retries_and_records_errors(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 24)

    def responder(messages, body):
        # One task's root conversation always gets a 500: it can never finish.
        if any("key7." in m["content"] for m in messages if m["role"] == "user") or "answer is: key7" in str(body):
            raise MockHTTPError(500, "poisoned task")
        return scenario_responder(messages, body)

    # Tasks carry their answer in the context, which the first prompt does not show; mark
    # the poisoned task by query instead.
    lines = [json.loads(line) for line in tasks.read_text().splitlines()]
    lines[7]["query"] = "What is the answer? key7."
    tasks.write_text("".join(json.dumps(t) + "\n" for t in lines))

    plan = FailPlan(p=0.2, mode="mix", hang_s=5.0, seed=3)
    with MockOpenAIServer(responder=responder, latency_s=0.02, fail_plan=plan) as server:
        policy = OpenAIPolicy("mock-model", [server.base_url], request_timeout_s=0.5, max_retries=3, backoff_base_s=0.02,
                              backoff_max_s=0.1)
        summary = run_generate(config(tmp_path, tasks, policy="openai:mock-model", concurrency=8), policy=policy)
        counts = dict(server.counts)
    out = tmp_path / "out"
    assert summary["records"] == 24 and max(pairs(out).values()) == 1
    assert all(json.loads(line) for line in shard_lines(out))
    # Every failure mode was hit, and retries were counted.
    assert counts.get("error_500", 0) and counts.get("hang", 0) and counts.get("drop", 0), counts
    # Each 500 or hang was either retried or was the last try of a request that gave up. (A drop
    # on a reused keep-alive connection looks stale and is re-sent at once, uncounted.)
    injected = counts["error_500"] + counts["hang"]
    assert summary["this_run"]["retries"] == policy.stats["retries"] > 0
    assert policy.stats["retries"] + policy.stats["failures"] >= injected
    records = {r["task_id"]: r for r in store.read_records(out)}
    poisoned = records["bench-7"]
    assert poisoned["outcome"] == Outcome.ERROR and "model call failed" in poisoned["error"]
    assert "no answer after 4 attempts" in poisoned["error"] and poisoned["score"] is None
    # Everything the server eventually answered was solved.
    for task_id, r in records.items():
        if r["outcome"] != Outcome.ERROR:
            assert r["outcome"] == Outcome.FINAL and r["score"] == 1.0, (task_id, r["outcome"], r["error"])
    assert summary["this_run"]["errors"] == sum(r["outcome"] == Outcome.ERROR for r in records.values())


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_exactly_one_valid_record_per_task_sample(tmp_path, rlm_cli):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 20)
    out = tmp_path / "out"
    with MockOpenAIServer(responder=scenario_responder, latency_s=0.05) as server:
        argv = rlm_cli + ["generate", "--tasks", str(tasks), "--policy", "openai:mock-model",
                          "--base-url", server.base_url, "--samples", "2", "--concurrency", "4",
                          "--out", str(out), "--no-progress"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(shard_lines(out) if out.exists() else []) < 8:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its REPL fork-server, mid-run
        proc.wait()
        first = shard_lines(out)
        assert 8 <= len(first) < 40, "the kill should land mid-run"
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stderr and "40 trajectories" in rerun.stdout
    lines = shard_lines(out)
    assert len(store.shard_files(out)) == 2 and len(lines) == 40
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    assert Counter((r["task_id"], r["sample"]) for r in records) == Counter(
        {(f"bench-{i}", k): 1 for i in range(20) for k in range(2)})
    assert all(r["schema"] == "rlm-train/trajectory/v1" and r["outcome"] == Outcome.FINAL for r in records)


def test_cli_dry_run_merges_recipe_flags_and_overrides(tmp_path, rlm_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# rlm-train generate --recipe r.yaml\ntasks: a.jsonl\npolicy: scripted\nsamples: 2\n"
                      "rlm:\n  max_iterations: 5\n")
    result = subprocess.run(rlm_cli + ["generate", "--recipe", str(recipe), "--samples", "3", "--dry-run",
                                       "--out", str(tmp_path / "run"), "rlm.max_depth=2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout.split("\n", 1)[1])["config"]  # the plan: a header line, then YAML
    assert cfg["samples"] == 3 and cfg["rlm"]["max_iterations"] == 5 and cfg["rlm"]["max_depth"] == 2
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    bad = subprocess.run(rlm_cli + ["generate", "--recipe", str(recipe), "--dry-run", "rlm.max_iteratons=2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key 'rlm.max_iteratons'" in bad.stderr


def test_shards_split_the_tasks_and_share_one_run_directory(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 5)
    first = run_generate(config(tmp_path, tasks, policy="scripted", num_shards=2, shard_index=0))
    assert first["this_run"]["episodes"] == 3 and first["records"] == 3  # tasks 0, 2, 4
    second = run_generate(config(tmp_path, tasks, policy="scripted", num_shards=2, shard_index=1))
    assert second["this_run"]["episodes"] == 2 and second["records"] == 5  # the whole store
    assert set(pairs(tmp_path / "out")) == {(f"bench-{i}", 0) for i in range(5)}
    assert len(store.shard_files(tmp_path / "out")) == 2


def test_a_run_started_before_a_setting_existed_resumes_after_the_upgrade(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)
    first = run_generate(config(tmp_path, tasks, policy="scripted", num_shards=3, shard_index=0))
    assert first["records"] == 1
    manifest = tmp_path / "out" / store.MANIFEST
    old = json.loads(manifest.read_text())
    del old["rlm"]["child_max_tokens"]  # as written by a version without that setting
    del old["rlm"]["sandbox"]["timeout_s"]
    manifest.write_text(json.dumps(old))
    again = run_generate(config(tmp_path, tasks, policy="scripted"))
    assert again["records"] == 3 and again["this_run"]["episodes"] == 2
    old["rlm"]["max_iterations"] = 9  # a setting that did exist and differs: still a different run
    manifest.write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"rlm\.max_iterations is 9 there, 4 here"):
        run_generate(config(tmp_path, tasks, policy="scripted"))


def test_bench_generate_times_runs_with_and_without_the_sandbox_layers(capsys):
    """`rlm-train bench generate`, small: every timed run with the layers is paired with one
    without them, every episode finishes, and the sandbox has every layer back afterwards."""
    from rlm_train.bench.generate import TIMED_RUNS, bench_generate
    from rlm_train.repl import REPLSession

    results = bench_generate(episodes=4, concurrency=2, latency_s=0.01)
    assert len(results["walls_s"]) == len(results["without_layers_walls_s"]) == TIMED_RUNS
    assert results["outcomes"] == {"final": 4 * TIMED_RUNS}
    assert results["layers_ratio"] == pytest.approx(results["wall_s"] / results["without_layers_wall_s"], rel=0.01)
    assert "what the layers cost: with / without" in capsys.readouterr().out
    with REPLSession("") as session:
        assert session.isolation["seccomp"] and session.isolation["minimal_root"]
