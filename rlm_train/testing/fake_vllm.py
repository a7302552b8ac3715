"""An interpreter under which `python -m vllm.entrypoints.openai.api_server` runs a stand-in
server, so the vLLM launcher and the pipeline's background serve stages are tested without vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import rlm_train

REPO = Path(rlm_train.__file__).resolve().parents[1]


def fake_vllm_python(root: Path, server_source: str) -> Path:
    """Write a `vllm` package whose api_server module is `server_source` under `root`, and a
    `python` wrapper that finds it (and this checkout) first; returns the wrapper."""
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(server_source)
    wrapper = root / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{root}:{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# A stand-in for vLLM's CPU build that checks what the real one checks at start, and fails as it
# does: the engine's traceback, then the API server's "See root cause above". Its answers are the
# mock server's (rlm_train/bench/scenario.py).
#   - --max-model-len above the model's max_position_embeddings (vLLM's default window is those);
#   - VLLM_CPU_KVCACHE_SPACE GiB of KV cache more than the memory available; without it,
#     --gpu-memory-utilization (default 0.92) of the machine's memory more than is available.
VLLM_CPU_STAND_IN = '''
import argparse, json, os, sys, time
import psutil
from rlm_train.bench.scenario import scenario_responder
from rlm_train.testing.mock_server import MockOpenAIServer

ap = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--chat-template", "--max-loras", "--max-lora-rank"):
    ap.add_argument(flag)
ap.add_argument("--port", type=int)
ap.add_argument("--max-model-len", type=int)
ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
ap.add_argument("--enable-lora", action="store_true")
ap.add_argument("--lora-modules", nargs="*", default=[])
args, rest = ap.parse_known_args()
kv_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
print("INFO stand-in vLLM args " + json.dumps(sys.argv[1:]), flush=True)
print("INFO stand-in vLLM VLLM_CPU_KVCACHE_SPACE=" + str(kv_space), flush=True)
GiB = 1024 ** 3


def die(error: str) -> None:
    pid = os.getpid() + 1
    for line in ("EngineCore failed to start.", "Traceback (most recent call last):",
                 '  File "vllm/v1/engine/core.py", line 700, in run_engine_core', error):
        print(f"(EngineCore_DP0 pid={pid}) ERROR 12-07 12:00:00 [core.py:708] {line}", flush=True)
    print("Traceback (most recent call last):", flush=True)
    print('  File "vllm/entrypoints/openai/api_server.py", line 1900, in <module>', flush=True)
    print("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}", flush=True)
    sys.exit(1)


positions = json.load(open(os.path.join(args.model, "config.json"))).get("max_position_embeddings")
window = args.max_model_len or positions
if positions and window > positions:
    die(f"ValueError: User-specified max_model_len ({window}) is greater than the derived max_model_len "
        f"(max_position_embeddings={positions} in model's config.json).")
memory = psutil.virtual_memory()
if kv_space is not None and int(kv_space) * GiB > memory.available:
    die(f"ValueError: Available memory on node 0 ({memory.available / GiB:.2f}/{memory.total / GiB:.2f} GiB) on kv "
        f"cache allocation is less than requested memory for kv ({int(kv_space):.2f} GiB).")
if kv_space is None and memory.total * args.gpu_memory_utilization > memory.available:
    die(f"ValueError: Available memory on node 0 ({memory.available / GiB:.2f}/{memory.total / GiB:.2f} GiB) on "
        f"startup is less than desired CPU memory utilization ({args.gpu_memory_utilization}, "
        f"{memory.total * args.gpu_memory_utilization / GiB:.2f} GiB).")
MockOpenAIServer(responder=scenario_responder, host=args.host, port=args.port, model=args.served_model_name).start()
print("INFO Application startup complete.", flush=True)
while True:
    time.sleep(1)
'''
