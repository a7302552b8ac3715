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


# `make test` converts the real Gemma-3-270m once into a cache kept between runs (it takes minutes)
# and names it here; every other test keeps the fresh, empty cache above.
GEMMA_CACHE_ENV = "RLM_TRAIN_TEST_GEMMA_CACHE"
NO_GEMMA = "real Gemma-3-270m not converted for tests (`make test` converts it once into .cache/rlm-train)"
NO_CHROMIUM = "no Chromium on PATH"


@pytest.fixture
def real_gemma(monkeypatch):
    """The model cache holding the converted Gemma-3-270m (`make test` sets RLM_TRAIN_TEST_GEMMA_CACHE),
    made this test's RLM_TRAIN_CACHE; skips, saying how to get it, where there is none."""
    cache = os.environ.get(GEMMA_CACHE_ENV)
    if not cache or not (Path(cache) / "models" / "gemma3-270m-bf16" / "rlm_train_source.json").is_file():
        pytest.skip(NO_GEMMA)
    monkeypatch.setenv("RLM_TRAIN_CACHE", cache)
    return Path(cache)


def pytest_terminal_summary(terminalreporter):
    """Say in the summary which real-world tests did not run here, and how to run them."""
    reasons = [str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
               for report in terminalreporter.stats.get("skipped", [])]
    browser = sum(NO_CHROMIUM in reason for reason in reasons)
    if browser:
        terminalreporter.write_line(f"viewer browser tests skipped ({browser}): no Chromium (`make test` installs it "
                                    "when run as root with apt-get; or apt-get install -y chromium)", yellow=True)
    if any(NO_GEMMA in reason for reason in reasons):
        terminalreporter.write_line(f"real Gemma-3-270m test skipped: {NO_GEMMA}", yellow=True)


@pytest.fixture
def rlm_cli():
    """argv prefix that runs the CLI of this checkout in a fresh interpreter."""
    return [sys.executable, "-m", "rlm_train.cli"]
