"""Faults in the middle of a run: the model server killed and restarted, a REPL worker killed
mid-cell, SIGTERM / SIGINT to `generate` and `eval`, a disk that fills. Each time the run
either goes on or stops cleanly, and a re-run ends with every record exactly once."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.cli import main as cli_main
from rlm_train.eval.config import EvalConfig
from rlm_train.eval.run import run_eval
from rlm_train.models.base import CallablePolicy
from rlm_train.records import Outcome
from rlm_train.rlm import RLMConfig
from rlm_train.rollouts import store
from rlm_train.rollouts.generate import GenerateConfig, run_generate

RESPONDER = "rlm_train.bench.scenario:scenario_responder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, latency_ms: float = 50) -> subprocess.Popen:
    """The mock server in a process of its own, so that it can be killed like a real one."""
    proc = subprocess.Popen([sys.executable, "-m", "rlm_train.testing.mock_server", "--port", str(port),
                             "--latency-ms", str(latency_ms), "--responder", RESPONDER],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], 30)[0] or "mock OpenAI server" not in proc.stdout.readline():
        proc.kill()
        pytest.fail("the mock server process did not start")
    return proc


def records_in(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in store.shard_files(out)) if out.exists() else 0


def assert_exactly_once(out: Path, tasks: int, samples: int = 1) -> list[dict]:
    lines = [line for p in store.shard_files(out) for line in p.read_text().splitlines()]
    records = [json.loads(line) for line in lines]  # every line whole
    assert Counter((r["task_id"], r["sample"]) for r in records) == Counter(
        {(f"bench-{i}", k): 1 for i in range(tasks) for k in range(samples)})
    return records


def kill_and_restart_when(out: Path, at: int, port: int, box: dict) -> threading.Thread:
    """Once `at` records exist, SIGKILL the server, and start a new one on the same port 1 s later."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while records_in(out) < at and time.monotonic() < deadline:
            time.sleep(0.01)
        box["server"].kill()
        box["server"].wait()
        box["killed_at"] = records_in(out)
        time.sleep(1.0)
        box["server"] = start_server(port)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stage", ["generate", "eval"])
def test_the_model_server_killed_and_restarted_mid_run(tmp_path, stage):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 16)
    port = free_port()
    box = {"server": start_server(port)}
    url = f"http://127.0.0.1:{port}/v1"
    client = {"max_retries": 8, "request_timeout_s": 10}
    try:
        if stage == "generate":
            out = tmp_path / "gen"
            watcher = kill_and_restart_when(out, 4, port, box)
            summary = run_generate(GenerateConfig(tasks=str(tasks), out=str(out), policy="openai:mock-model",
                                                  base_urls=[url], concurrency=4, client=client, progress=False,
                                                  rlm=RLMConfig(max_iterations=4)))
            assert summary["records"] == 16
        else:
            out = tmp_path / "eval" / "runs" / "base"
            watcher = kill_and_restart_when(out, 4, port, box)
            report = run_eval(EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), progress=False,
                                         concurrency=4, client=client, rlm=RLMConfig(max_iterations=4),
                                         methods=[{"name": "base", "policy": "openai:mock-model", "base_urls": [url]}]))
            assert report["methods"]["base"]["episodes"] == report["methods"]["base"]["expected_episodes"] == 16
        watcher.join(timeout=30)
    finally:
        box["server"].kill()
        box["server"].wait()
    assert 4 <= box["killed_at"] < 16, "the kill should land mid-run"
    records = assert_exactly_once(out, 16)
    # The outage cost retries, not episodes: every episode answered once the server was back.
    assert all(r["outcome"] == Outcome.FINAL and r["score"] == 1.0 for r in records), \
        [(r["task_id"], r["outcome"], r["error"]) for r in records if r["outcome"] != Outcome.FINAL]


def test_a_repl_worker_killed_mid_cell_is_a_sandbox_error_and_the_run_goes_on(tmp_path, monkeypatch):
    from rlm_train import repl

    sessions: list = []
    real = repl.REPLSession

    class Tracked(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    monkeypatch.setattr(repl, "REPLSession", Tracked)

    def policy(messages, call):
        turn = sum(1 for m in messages if m["role"] == "assistant")
        code = "import time\ntime.sleep(2)\nprint('slept')" if turn == 0 else "FINAL('ok')"
        return f"```repl\n{code}\n```"

    def killer() -> None:
        deadline = time.monotonic() + 30
        while not sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.8)  # inside the first cell's sleep
        signal.pidfd_send_signal(sessions[0]._pidfd, signal.SIGKILL)

    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_generate(GenerateConfig(tasks=str(tasks), out=str(tmp_path / "out"), policy="cells",
                                          concurrency=3, progress=False, rlm=RLMConfig(max_iterations=3)),
                           policy=CallablePolicy(policy, name="cells"))
    thread.join()
    assert summary["records"] == 3
    records = assert_exactly_once(tmp_path / "out", 3)
    executions = [r["turns"][0]["executions"][0] for r in records]
    killed = [e for e in executions if e["error_kind"] == "sandbox"]
    assert len(killed) == 1 and "killed by SIGKILL" in killed[0]["error"]
    assert sum(e["stdout"] == "slept\n" for e in executions) == 2
    # The killed episode went on in a fresh worker and answered; so did the others.
    assert all(r["outcome"] == Outcome.FINAL and r["final"] == "ok" for r in records)


@pytest.mark.parametrize("stage,sig", [("generate", signal.SIGTERM), ("eval", signal.SIGINT),
                                       pytest.param("generate", signal.SIGINT, marks=pytest.mark.slow),
                                       pytest.param("eval", signal.SIGTERM, marks=pytest.mark.slow)])
def test_sigterm_and_sigint_stop_within_seconds_and_the_next_run_resumes(tmp_path, rlm_cli, stage, sig):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 24)
    port = free_port()
    server = start_server(port, latency_ms=150)
    url = f"http://127.0.0.1:{port}/v1"
    if stage == "generate":
        out = tmp_path / "gen"
        argv = rlm_cli + ["generate", "--tasks", str(tasks), "--policy", "openai:mock-model", "--base-url", url,
                          "--concurrency", "3", "--out", str(out), "--no-progress"]
    else:
        out = tmp_path / "eval" / "runs" / "base"
        argv = rlm_cli + ["eval", "--tasks", str(tasks), "--method", "base=openai:mock-model", "--base-url", url,
                          "--concurrency", "3", "--out", str(tmp_path / "eval"), "--no-progress"]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while records_in(out) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - sent
        saved = records_in(out)
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 128 + sig, err
    assert stopped_in < 5, stopped_in
    assert f"{signal.Signals(sig).name}: stopping" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err and left == []  # no process of the run is left behind
    assert 3 <= saved < 24
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {saved} episodes already recorded" in rerun.stderr
    assert_exactly_once(out, 24)
    if stage == "generate":
        assert json.loads((out / "summary.json").read_text())["records"] == 24


def test_a_full_disk_stops_cleanly_naming_the_disk_and_a_rerun_resumes(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        tasks = tmp_path / "tasks.jsonl"
        write_scenario_tasks(tasks, 30)
        argv = ["generate", "--tasks", str(tasks), "--policy", "scripted", "--out", str(disk / "run"),
                "--no-progress", "--concurrency", "4"]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no space left on the disk" in err[0] and str(disk) in err[0]
        assert "re-run the same command" in err[0]
        (shard,) = store.shard_files(disk / "run")
        data = shard.read_bytes()
        assert data.endswith(b"\n")  # no torn line: the file ends with a whole record
        saved = [json.loads(line) for line in data.splitlines()]
        assert 0 < len(saved) < 30
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert cli_main(argv) == 0
        assert_exactly_once(disk / "run", 30)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
