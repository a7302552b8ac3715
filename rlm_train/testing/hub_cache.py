"""A Hugging Face hub cache written offline, laid out as `hf download` leaves it, for tests and
rehearsals that name models by Hub id (`org/name`) with no hub to download from:

    HF_HUB_CACHE/models--org--name/blobs/<sha256 of each file>
                                  /snapshots/<commit>/<file> -> ../../blobs/<sha256>
                                  /refs/main                 (the commit)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def write_hub_snapshot(cache: Path, repo_id: str, model_dir: Path, revision: str = "main",
                       commit: str | None = None) -> Path:
    """Put `model_dir`'s files into `cache` as the snapshot of `repo_id` at `revision`; returns the
    snapshot directory. `commit` defaults to a hash of the files (40 hex digits, like a git commit)."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for file in files:
        digest.update(str(file.relative_to(model_dir)).encode() + file.read_bytes())
    commit = commit or digest.hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in files:
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
