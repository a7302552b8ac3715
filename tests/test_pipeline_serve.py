"""Background `serve` stages of `rlm-train pipeline`, against a stand-in for vLLM: a fake
`vllm.entrypoints.openai.api_server` (found through `vllm.python`) that starts an "engine" child
ignoring SIGTERM and serves the mock OpenAI server on its port. The server is started only for
the stage that needs it, waited for, used, and stopped with nothing left running; a server that
dies or never answers /health is one line naming the stage and the last line of its log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from rlm_train.serve.launcher import free_port
from rlm_train.testing.tiny_models import build_tokenizer
from rlm_train.testing import fake_vllm

REPO = Path(__file__).resolve().parents[1]

FAKE_SERVER = '''
import argparse, os, subprocess, sys, time

ap = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--chat-template"):
    ap.add_argument(flag)
ap.add_argument("--port", type=int)
args, rest = ap.parse_known_args()
engine = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                           f"time.sleep(600)  # fake engine of port {args.port}"])
print(f"INFO fake vLLM pid {os.getpid()} engine pid {engine.pid} port {args.port}", flush=True)
if os.environ.get("FAKE_VLLM_NEVER_READY"):
    print("INFO still loading weights, forever", flush=True)
    time.sleep(600)
from rlm_train.bench.scenario import scenario_responder
from rlm_train.testing.mock_server import MockOpenAIServer

MockOpenAIServer(responder=scenario_responder, host=args.host, port=args.port, model=args.served_model_name).start()
print("INFO Application startup complete.", flush=True)
while True:
    time.sleep(1)
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A Qwen3-shaped model directory (config + tokenizer; the fake vLLM loads no weights)."""
    path = tmp_path_factory.mktemp("serve") / "tiny-qwen3"
    path.mkdir()
    tok = build_tokenizer(path)
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id}))
    return path


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake-vllm")
    return fake_vllm.fake_vllm_python(root, FAKE_SERVER)


def write_pipeline(tmp_path: Path, model: Path, python: Path, port: int, start_timeout_s: float = 120) -> Path:
    from rlm_train.bench.scenario import write_scenario_tasks

    write_scenario_tasks(tmp_path / "tasks.jsonl", 4)
    stages = [
        {"name": "serve", "run": "serve", "background": True,
         "with": {"vllm": {"model": str(model), "served_model_name": "tiny", "port": port, "python": str(python),
                           "start_timeout_s": start_timeout_s, "stop_timeout_s": 1, "log_file": "vllm.log"}}},
        {"name": "generate", "run": "generate", "after": ["serve"],
         "with": {"tasks": "tasks.jsonl", "out": "gen", "policy": "openai:tiny", "progress": False,
                  "base_urls": [f"http://127.0.0.1:{port}/v1"], "concurrency": 2}},
        {"name": "filter", "run": "filter", "recipe": str(REPO / "recipes/filter-paper.yaml"),
         "with": {"trajectories": ["gen"], "out": "data", "validation_fraction": 0.0}},
    ]
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump({"name": "serve-test", "out_dir": "out", "stages": stages}, sort_keys=False))
    return recipe


def run_pipeline(cwd: Path, recipe: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlm_train.cli", "pipeline", "--recipe", str(recipe)], cwd=cwd,
                          capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})})


def pids_in(log: Path) -> list[int]:
    match = re.search(r"fake vLLM pid (\d+) engine pid (\d+)", log.read_text())
    assert match, log.read_text()
    return [int(match.group(1)), int(match.group(2))]


def left_running(port: int) -> list[str]:
    """Processes of the fake vLLM for `port` (its server or its engine) still alive."""
    import psutil

    left = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (f"fake engine of port {port}" in cmdline or (
                "vllm.entrypoints.openai.api_server" in cmdline and f"--port {port}" in cmdline)):
            left.append(cmdline)
    return left


def running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        return True
    except OSError:
        return False


def test_background_serve_starts_for_the_stage_that_needs_it_and_stops_after(tmp_path, model, fake_python):
    port = free_port()
    recipe = write_pipeline(tmp_path, model, fake_python, port)
    result = run_pipeline(tmp_path, recipe)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    up = out.index("serve is up after")
    assert out.index("starting in the background: rlm-train serve") < up < out.index("=== [2/3] generate")
    # Stopped as soon as generate (the last stage that needs it) is done, before filter runs.
    assert out.index("=== [2/3] generate") < out.index("stopping background stage serve") < out.index("=== [3/3] filter")
    gen = [json.loads(line) for shard in (tmp_path / "gen").glob("shard-*.jsonl") for line in shard.read_text().splitlines()]
    assert len(gen) == 4 and all(t["policy"] == "openai:tiny" for t in gen)
    assert [t["score"] for t in gen] == [1.0] * 4, [(t["outcome"], t.get("error")) for t in gen]  # answered through the served model (the scenario finds each key)
    assert not any(running(pid) for pid in pids_in(tmp_path / "vllm.log"))  # engine that ignored SIGTERM too
    assert left_running(port) == [] and not port_open(port)
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())["stages"]
    assert timings["serve"]["status"] == "served" and timings["serve"]["healthy_after_s"] > 0

    again = run_pipeline(tmp_path, recipe)  # every stage finished: no server is started
    assert again.returncode == 0, again.stderr
    assert "starting in the background" not in again.stdout and again.stdout.count("skipped (finished") == 2


def test_a_server_that_dies_while_starting_is_one_line_naming_the_stage(tmp_path, model, fake_python):
    broken = tmp_path / "python"
    broken.write_text(f'#!/bin/sh\ncase "$*" in *api_server*) echo "ERROR no GPU found, pretending"; exit 3;; esac\n'
                      f'exec "{fake_python}" "$@"\n')
    broken.chmod(0o755)
    recipe = write_pipeline(tmp_path, model, broken, free_port())
    result = run_pipeline(tmp_path, recipe)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("rlm-train pipeline:")]
    assert len(lines) == 1, result.stderr
    assert "background stage serve: the server exited with status 2" in lines[0]
    assert lines[0].endswith("ERROR no GPU found, pretending")
    assert not (tmp_path / "out" / "pipeline" / "generate.state.json").exists()  # the stage never started


def test_a_server_that_never_answers_health_is_stopped_with_one_line(tmp_path, model, fake_python):
    port = free_port()
    recipe = write_pipeline(tmp_path, model, fake_python, port, start_timeout_s=3)
    result = run_pipeline(tmp_path, recipe, env={"FAKE_VLLM_NEVER_READY": "1"})
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("rlm-train pipeline:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rlm-train pipeline: background stage serve: ")
    # Either the serve command gave up (3 s after vLLM started) or, on a machine so loaded that its
    # checks outlast the bound, the pipeline's own bound (start_timeout_s + 60 s) did.
    assert "last line of its log" in lines[0]
    assert left_running(port) == []


def test_a_port_already_served_by_another_server_is_refused(tmp_path, model, fake_python):
    from rlm_train.testing.mock_server import MockOpenAIServer

    with MockOpenAIServer() as other:  # answers /health on the port the serve stage wants
        port = int(other.base_url.rsplit(":", 1)[1].split("/")[0])
        result = run_pipeline(tmp_path, write_pipeline(tmp_path, model, fake_python, port))
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("rlm-train pipeline:")]
    assert len(lines) == 1 and "already answers before it started" in lines[0], result.stderr
    assert not (tmp_path / "vllm.log").exists() and not (tmp_path / "gen").exists()
