"""GRPO with two training processes on CPU (torchrun, gloo): the weight push to the vLLM server is
ordered before any rank generates and its prefix-cache reset is checked (against a mock of TRL's vLLM
server endpoints on 127.0.0.1 that records the order of calls), and a real run writes one set of
outputs, from the main process only, with each metric record once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class MockVLLM(ThreadingHTTPServer):
    """TRL's server-mode endpoints, recording (time, endpoint, details). The prefix-cache reset after
    the second push is refused once ({"success": false}, as vLLM answers while requests run)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), MockHandler)
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.resets = 0

    def note(self, **event) -> None:
        with self.lock:
            self.events.append({"t": time.monotonic(), **event})


class MockHandler(BaseHTTPRequestHandler):
    server: MockVLLM

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        path = self.path
        if path == "/v1/completions":
            self.server.note(kind="generate", rank=body["rank"], step=body["step"])
            time.sleep(0.05)
            reply = {"choices": [{"prompt_token_ids": p, "token_ids": [5, 7], "logprobs": None} for p in body["prompt"]]}
        elif path == "/reset_prefix_cache":
            with self.server.lock:
                self.server.resets += 1
                refused = self.server.resets == 2
            self.server.note(kind="reset", success=not refused)
            reply = {"success": not refused}
        else:  # start_weight_update, update_weights, finish_weight_update
            self.server.note(kind=path.strip("/"), **body)
            reply = {}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed in this environment")
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    root = tmp_path_factory.mktemp("ranks")
    model = build_tiny_qwen3(root / "model")
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({
        "schema": "rlm-train/task/v1", "id": f"needle-{k}", "family": "niah", "query": f"What is the special magic "
        f"number for {k}?", "context": f"Filler. The special magic number for {k} is: {v}. More.", "answer": [v],
        "scorer": "all_strings", "meta": {}}) + "\n" for k, v in {"harbor": "7421", "meadow": "3906"}.items()))
    server = MockVLLM()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_free_port()),
         str(REPO / "tests" / "grpo_worker.py"), str(out), str(model), str(tasks),
         f"http://127.0.0.1:{server.server_address[1]}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    server.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"out": out, "events": server.events, "stdout": proc.stdout}


@pytest.mark.slow
def test_push_is_ordered_before_generation_on_every_rank(two_rank_run):
    events = two_rank_run["events"]
    pushes = [e for e in events if e["kind"] == "finish_weight_update"]
    assert [e["step"] for e in pushes] == [0, 1, 2]  # rank 0 alone pushes, once a step
    for step, push in enumerate(pushes):
        generated = [e for e in events if e["kind"] == "generate" and e["step"] == step]
        assert {e["rank"] for e in generated} == {0, 1}
        # Every rank's generation of a step starts after that step's push finished and its reset succeeded.
        reset_ok = [e for e in events if e["kind"] == "reset" and e["success"] and e["t"] > push["t"]][0]
        assert all(e["t"] > reset_ok["t"] for e in generated), (step, push, generated)
    resets = [e["success"] for e in events if e["kind"] == "reset"]
    assert resets == [True, False, True, True]  # the refused reset was tried again, not ignored
    # The same weights went out each time: the LoRA merge was out of place, the base never written.
    sums = [e["sum"] for e in events if e["kind"] == "update_weights"]
    assert len(set(sums)) == 1
    for rank in (0, 1):
        assert json.loads((two_rank_run["out"] / f"push-rank{rank}.json").read_text())["base_unchanged"]


@pytest.mark.slow
def test_two_ranks_write_one_set_of_outputs(two_rank_run):
    out, run = two_rank_run["out"], two_rank_run["out"] / "run"
    for rank in (0, 1):
        assert json.loads((out / f"summary-rank{rank}.json").read_text())["global_step"] == 2
    writes = [line.split("\t") for rank in (0, 1) if (out / f"audit-rank{rank}.txt").is_file()
              for line in (out / f"audit-rank{rank}.txt").read_text().splitlines()]
    assert writes and {rank for rank, _, _ in writes} == {"0"}  # rank 1 wrote nothing at all
    records = [json.loads(line) for line in (run / "rollouts.jsonl").open()]
    # Both ranks' episodes (one group of 3 each per step), gathered and written once.
    assert Counter(r["grpo_step"] for r in records) == {0: 6, 1: 6} and len({r["id"] for r in records}) == 12
    assert Counter(r["task_id"] for r in records) == {"needle-harbor": 6, "needle-meadow": 6}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert all(m["rlm/answered_frac"] == 1.0 for m in metrics if "loss" in m)  # summed over both ranks
    step_lines = [line for line in two_rank_run["stdout"].splitlines() if line.startswith("[grpo] step 0:")]
    assert len(step_lines) == 1 and "6 episodes" in step_lines[0]
    assert (run / "summary.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
