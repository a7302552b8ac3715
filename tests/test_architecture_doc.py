"""docs/architecture.md stays true: every path it names exists, the README links it, and
nothing in the repository points outside it (a clone has no ../shared)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def _named_paths() -> set[str]:
    """Backticked names that are paths: `rlm_train/x.py`, `repl/cgroups.py`, `tests/...`."""
    names = set()
    for raw in re.findall(r"`([^`\s]+)`", DOC.read_text()):
        path = raw.split(":")[0].rstrip("/")
        if "/" in path and not path.startswith(("/", "http", "rlm-train/", "-")) and "*" not in path:
            names.add(path)
    return names


def test_every_path_the_document_names_exists():
    names = _named_paths()
    assert len(names) > 20
    missing = [n for n in names if not (REPO / n).exists() and not (REPO / "rlm_train" / n).exists()]
    assert missing == [], missing


def test_readme_links_the_document():
    assert "docs/architecture.md" in (REPO / "README.md").read_text()


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = REPO / name
        if name == "tests/test_architecture_doc.py" or not path.is_file():
            continue
        if path.suffix not in (".py", ".md", ".yaml", ".sbatch", ".toml", ".cfg", ""):
            continue
        text = path.read_text(errors="replace")
        if "../shared" in text or "DESIGN.md" in text:
            offenders.append(name)
    assert offenders == [], offenders


def test_no_source_file_over_500_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    long = {name: n for name in tracked if (n := len((REPO / name).read_text().splitlines())) > 500}
    assert long == {}, long
