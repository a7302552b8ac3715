import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def remove_sandbox_cgroup_parents() -> list[str]:
    """Put the machine's cgroups back to what a fresh machine has: no `rlm_repl` parent in
    any hierarchy (groups of dead fork-servers are emptied first). Returns the parents that
    could not go (a live run elsewhere still uses them)."""
    from rlm_train.repl import cgroups

    left = []
    roots = [os.path.join(cgroups.ROOT, name) for name in sorted(os.listdir(cgroups.ROOT))] if os.path.isdir(cgroups.ROOT) else []
    for root in [cgroups.ROOT, *roots]:
        parent = os.path.join(root, cgroups.PARENT)
        if not os.path.isdir(parent):
            continue
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(fd):
                if os.path.isdir(os.path.join(parent, name)) and not cgroups._owner_alive(name.partition(".")[0]):
                    cgroups._empty_and_remove(fd, name)
        finally:
            os.close(fd)
        try:
            os.rmdir(parent)
        except OSError:
            left.append(parent)
    return left


def pytest_configure(config):
    # Start from what a fresh machine has, not from what this one kept between sessions:
    # no sandbox cgroup parents, no model cache, no Hugging Face cache.
    if os.geteuid() == 0:
        left = remove_sandbox_cgroup_parents()
        if left:
            print(f"conftest: cgroup parents still in use elsewhere, kept: {', '.join(left)}", file=sys.stderr)
    fresh = tempfile.mkdtemp(prefix="rlm-train-test-cache-")
    os.environ.setdefault("RLM_TRAIN_CACHE", os.path.join(fresh, "rlm-train"))
    os.environ.setdefault("HF_HOME", os.path.join(fresh, "huggingface"))


@pytest.fixture
def rlm_cli():
    """argv prefix that runs the CLI of this checkout in a fresh interpreter."""
    return [sys.executable, "-m", "rlm_train.cli"]
