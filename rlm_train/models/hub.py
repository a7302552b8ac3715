"""Hugging Face Hub ids (`org/name[@revision]`) and the local Hugging Face cache they resolve in.

`loading.resolve_model` is the one resolver; this module only parses ids and reads the cache
(never the network): `hf download ID` is what fills it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


# A Hub model id: org/name (letters, digits, - _ .), optionally @revision (a branch, tag or commit).
_HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w.-][\w./-]*))?$")
# Weight files a snapshot must hold besides config.json (a download of single files leaves none).
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


@dataclass(frozen=True)
class HubModel:
    """A model named by its Hugging Face Hub id, read from the local Hugging Face cache."""

    repo_id: str
    """`org/name`."""
    revision: str | None = None
    """A branch, tag or commit (None: the default branch, `main`)."""

    @property
    def download_command(self) -> str:
        """What puts it in the cache: the `hf` CLI of huggingface_hub (`huggingface-cli` is gone)."""
        return f"hf download {self.repo_id}" + (f" --revision {self.revision}" if self.revision else "")


def hub_model(spec: str | os.PathLike) -> HubModel | None:
    """The Hub model a spec names, or None when it names a local path: one that exists, one
    that starts with `.`, `/` or `~`, one whose first directory exists here (`runs/model`),
    or anything not shaped `org/name[@revision]`."""
    text = str(spec)
    match = hub_id_match(text)
    if not match or Path(text).exists() or Path(match["repo"].split("/", 1)[0]).is_dir():
        return None
    return HubModel(match["repo"], match["revision"])


def hub_id_match(text: str) -> re.Match[str] | None:
    """The match of a text shaped as a Hub id (the Hub also refuses `--` and `..` in names)."""
    match = _HUB_ID_RE.match(text)
    return None if not match or ".." in text or "--" in match["repo"] else match


def repo_id_of_snapshot(path: str | os.PathLike) -> str | None:
    """`org/name` of a snapshot directory in a Hugging Face cache (`models--org--name/snapshots/<commit>`),
    else None: what a resolved model directory is called on the Hub (a Hub name never holds `--`)."""
    parts = Path(path).expanduser().absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and "--" in part[len("models--"):]:
            return part[len("models--"):].replace("--", "/", 1)
    return None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment when asked (huggingface_hub reads
    it once, at import): `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(os.path.expandvars(hub)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_snapshot(hub: HubModel) -> tuple[Path | None, str]:
    """(snapshot directory, "") of a Hub model in the cache, or (None, why not). Reads only the
    cache (local_files_only), whatever HF_HUB_OFFLINE says: rlm-train never downloads weights."""
    cache = hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
    except ImportError:
        return None, ("is a Hugging Face Hub id, and reading the Hub cache needs the huggingface_hub package: "
                      "pip install -e '.[train]'")
    try:
        folder = Path(snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=True))
    except IncompleteSnapshotError:
        return None, f"its snapshot in the Hugging Face cache ({cache}) is incomplete; download it again: {hub.download_command}"
    except (LocalEntryNotFoundError, HFValidationError):
        return None, f"not in the Hugging Face cache ({cache}) and no such directory here; download it: {hub.download_command}"
    if not (folder / "config.json").is_file() or not any(any(folder.glob(g)) for g in _WEIGHT_GLOBS):
        return None, (f"its snapshot in the Hugging Face cache ({folder}) has no config.json or no weights; "
                      f"download the whole model: {hub.download_command}")
    return folder, ""
