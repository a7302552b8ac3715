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
