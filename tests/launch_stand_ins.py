"""What tests of `rlm-train launch` share: stand-ins for what a GPU cluster's environment has and this
machine lacks, and the reading of a dry run's list of what the jobs would lack."""

import os
import re
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="session")
def cluster_software(tmp_path_factory) -> tuple[Path, Path]:
    """What the cluster's environment has and this machine lacks, as stand-ins: (a Hugging Face
    cache holding Qwen/Qwen3-8B, there a tiny random Qwen3 with Qwen3-8B's 40,960 positions; a
    folder with a stand-in `vllm` package, found by importlib but serving nothing)."""
    from cluster_stand_ins import write_tiny_qwen3_8b
    from rlm_train.testing.fake_vllm import fake_vllm_python

    root = tmp_path_factory.mktemp("cluster-software")
    write_tiny_qwen3_8b(root / "tiny-qwen3-8b", root / "hub")
    fake_vllm_python(root / "vllm-stand-in", "")
    return root / "hub", root / "vllm-stand-in"


@pytest.fixture
def cluster_environment(cluster_software, monkeypatch) -> Path:
    """This process and its children see the stand-ins of `cluster_software` (HF_HUB_CACHE; the
    stand-in vllm first on sys.path and PYTHONPATH); returns the hub cache."""
    hub, vllm_root = cluster_software
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", f"{vllm_root}{os.pathsep}{REPO}")
    monkeypatch.syspath_prepend(str(vllm_root))
    return hub


def lacks_of(code: int, err: str) -> list[str]:
    """What a dry run says the jobs would lack (one line each), checked against its exit code and last line."""
    lines = err.strip().splitlines()
    lacks = [line for line in lines if re.match(r"rlm-train launch: stages? [\w, -]+: ", line)]
    assert lines and lines[-1].startswith("dry run: ") and code == (1 if lacks else 0), err
    assert ("which a real launch refuses to submit on" in lines[-1]) == bool(lacks), err
    return lacks
