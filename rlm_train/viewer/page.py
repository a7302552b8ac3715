"""The viewer page: one self-contained HTML file (no network at view time).

The data sits in two `<script type="application/json">` tags:

- `rlm-index`: one compact row per episode (what the list, its filters, its sorting and
  the score table need) plus the string table, the sources and the skipped lines;
- `rlm-details`: one JSON line per episode, in index order. The page parses a line
  only when its episode is opened, so a 10,000-episode file opens at once.

Every field of a record is treated as hostile: the data is JSON that cannot end its
<script> element (`_script_json`), the page's script builds the DOM with textContent and
setAttribute only (no HTML strings), and the page's Content-Security-Policy (`csp`) lets
only the page's own script and style run (by their sha256 hashes, computed as the page is
written), so an inline handler or a markup sink is refused even if that rule is broken.

Episodes are slimmed, not changed: `messages` (the turns again, as chat) become the
system prompt (interned once in the string table) and the first user message; a
turn's `feedback` is taken from `messages` when an old record lacks it; strings longer
than `max_chars` are clipped with a note. Everything else is the record's own fields.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from importlib import resources
from typing import Any, Mapping, NamedTuple
from urllib.parse import quote

from rlm_train.errors import UserError
from rlm_train.records import CELL_RESULTS_NOTE
from rlm_train.viewer.load import Loaded

INDEX_COLUMNS = ("id", "method", "family", "task", "sample", "score", "outcome", "tags",
                 "turns", "subcalls", "tokens", "wall", "query", "final")
FRAGMENT_KEYS = ("method", "family", "outcome", "score", "error", "q", "sort", "desc", "ep")
QUERY_CHARS = 160
FINAL_CHARS = 80


def fragment(**filters: Any) -> str:
    """`#method=M&family=F...`: the page fragment that opens the viewer with those
    filters applied (keys: FRAGMENT_KEYS; a value is matched exactly, see docs in
    rlm_train/viewer/__init__.py). Values are percent-encoded as encodeURIComponent does."""
    unknown = set(filters) - set(FRAGMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown viewer fragment key(s) {sorted(unknown)}; use {', '.join(FRAGMENT_KEYS)}")
    parts = [f"{key}={quote(str(value), safe='')}" for key, value in filters.items() if value is not None]
    return "#" + "&".join(parts)


class _Strings:
    """Interned long strings (system prompts, configs): one copy in the page."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._ids: dict[str, int] = {}

    def add(self, text: str) -> int:
        index = self._ids.get(text)
        if index is None:
            index = self._ids[text] = len(self.items)
            self.items.append(text)
        return index


class _Compactor:
    def __init__(self, strings: _Strings, max_chars: int) -> None:
        self.strings = strings
        self.max_chars = max_chars

    def clip(self, value: Any) -> Any:
        if not isinstance(value, str) or not self.max_chars or len(value) <= self.max_chars:
            return value
        return value[:self.max_chars] + f"\n... [{len(value) - self.max_chars:,} more chars clipped by rlm-train view]"

    def episode(self, ep: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in ep.items():
            if key in ("messages", "turns", "config", "schema", "system", "user"):  # system, user: ours, below
                continue
            out[key] = self.clip(value)
        if isinstance(ep.get("config"), dict):
            out["config"] = self.strings.add(json.dumps(ep["config"], sort_keys=True))  # C encoder: no indent
        messages = [m for m in ep.get("messages") or [] if isinstance(m, dict)]
        system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
        if isinstance(system, str):
            out["system"] = self.strings.add(system)
        user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        if user is not None:
            out["user"] = self.clip(user if isinstance(user, str) else json.dumps(user))
        feedback = _feedback_from_messages(messages)
        turns = []
        for k, turn in enumerate(ep.get("turns") or []):
            t = {key: self.clip(value) for key, value in turn.items()
                 if key not in ("executions", "sub_calls", "code_blocks")}
            executions = [{key: self.clip(value) for key, value in ex.items()} for ex in turn.get("executions") or []]
            t["executions"] = executions
            blocks = turn.get("code_blocks") or []
            if blocks != [ex.get("code") for ex in executions]:
                t["code_blocks"] = [self.clip(b) for b in blocks]  # blocks the loop never ran
            t["sub_calls"] = [self.sub_call(sc) for sc in turn.get("sub_calls") or []]
            if "feedback" not in t and k < len(feedback) and feedback[k] is not None:
                t["feedback"] = self.clip(feedback[k])
            turns.append(t)
        out["turns"] = turns
        return out

    def sub_call(self, sc: Mapping[str, Any]) -> dict[str, Any]:
        out = {key: self.clip(value) for key, value in sc.items() if key != "child"}
        if isinstance(sc.get("child"), dict):
            out["child"] = self.episode(sc["child"])
        return out


def _feedback_from_messages(messages: list[dict[str, Any]]) -> list[str | None]:
    """For each assistant message, the user message right after it (old records keep
    a turn's feedback only there)."""
    out: list[str | None] = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            nxt = messages[i + 1] if i + 1 < len(messages) else None
            content = nxt.get("content") if nxt and nxt.get("role") == "user" else None
            out.append(content if isinstance(content, str) else None)
    return out


def _num(value: Any) -> float | int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def tags(ep: Mapping[str, Any]) -> list[str]:
    """The error kinds an episode shows, for the error filter: its own `error_kind`
    (model / sandbox / internal), `cell:<kind>` for cells the sandbox ended (timeout,
    limit, sandbox), `exception` for cells that raised, `parse` for turns that could
    not be read, `subcall` for failed sub-calls, `score` when the scorer raised, and
    `forced` when the episode needed the answer-now turn. Sub-calls' child episodes
    count too."""
    found: set[str] = set()
    if ep.get("error_kind"):
        found.add(str(ep["error_kind"]))
    elif ep.get("error"):
        found.add("error")
    if ep.get("score_error"):
        found.add("score")
    _turn_tags(ep, found)
    return sorted(found)


def _turn_tags(ep: Mapping[str, Any], found: set[str]) -> None:
    for turn in ep.get("turns") or []:
        if turn.get("parse_error"):
            found.add("parse")
        if turn.get("forced"):
            found.add("forced")
        for ex in turn.get("executions") or []:
            if ex.get("error_kind"):
                found.add(f"cell:{ex['error_kind']}")
            elif ex.get("timed_out"):
                found.add("cell:timeout")
            elif ex.get("error"):
                found.add("exception")
        for sc in turn.get("sub_calls") or []:
            if sc.get("error"):
                found.add("subcall")
            if isinstance(sc.get("child"), dict):
                _turn_tags(sc["child"], found)


def _label(value: Any) -> str:
    """A record's field as the list's text: a string as it is, any other JSON value as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def index_row(ep: Mapping[str, Any], method: int) -> list[Any]:
    """The list's row: text columns are strings and number columns numbers or null,
    whatever types the record holds."""
    stats = ep.get("stats") if isinstance(ep.get("stats"), dict) else {}
    assert isinstance(stats, dict)
    tokens = _num(stats.get("tokens_total"))
    if tokens is None:
        tokens = (_num(stats.get("prompt_tokens")) or 0) + (_num(stats.get("completion_tokens")) or 0)
    wall = _num(stats.get("wall_s", stats.get("episode_wall_s")))
    subcalls = stats.get("subcalls_total", stats.get("sub_calls"))
    sample = ep.get("sample")
    final = ep.get("final")
    return [
        _label(ep.get("id")), method, _label(ep.get("family")), _label(ep.get("task_id")),
        sample if sample is None or _num(sample) is not None else _label(sample),
        _num(ep.get("score")), _label(ep.get("outcome")), tags(ep),
        len(ep.get("turns") or []), _num(subcalls), tokens, None if wall is None else round(wall, 3),
        _label(ep.get("query"))[:QUERY_CHARS], None if final is None else _label(final)[:FINAL_CHARS],
    ]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _script_json(obj: Any) -> str:
    """JSON that can sit inside a <script> element and be written as UTF-8: `<` and lone
    surrogates (a record may hold them) only ever occur inside JSON strings, where their
    \\uXXXX escapes mean the same."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or Infinity (Python's json reads them): null, as JSON.parse needs
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c")
    if _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _asset(name: str) -> str:
    return resources.files("rlm_train.viewer").joinpath("assets", name).read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    """A CSP hash source for an inline element whose text is exactly `text`."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def csp(script: str, style: str) -> str:
    """The page's Content-Security-Policy: nothing loads from anywhere; the only script
    and style that run are the page's own (matched by hash, so no inline handler, no
    javascript: URL, no eval and no style attribute); Trusted Types make every HTML sink
    (innerHTML and the like) refuse strings."""
    return "; ".join([
        "default-src 'none'",
        f"script-src {_sha256_source(script)}",
        f"style-src {_sha256_source(style)}",
        "base-uri 'none'",
        "form-action 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ])


class Page(NamedTuple):
    html: str
    episodes: int  # shown in the page
    problems: list[str]  # bad lines, and records of a shape the page cannot show


def build_html(loaded: Loaded, *, title: str | None = None, max_chars: int = 20_000) -> str:
    """The whole page for what `load` read."""
    return render_page(loaded, title=title, max_chars=max_chars).html


def render_page(loaded: Loaded, *, title: str | None = None, max_chars: int = 20_000) -> Page:
    """The page, how many episodes it shows and what it lists as skipped. A UserError
    when no episode can be shown."""
    strings = _Strings()
    compactor = _Compactor(strings, max_chars)
    rows: list[list[Any]] = []
    details: list[str] = []
    methods = [src.method for src in loaded.sources]
    problems = list(loaded.problems)
    for m, src in enumerate(loaded.sources):
        for record in src.records:
            try:
                detail = _script_json(compactor.episode(record))
                row = index_row(record, m)
                _script_json(row)  # a NaN in a count would break the whole index
            except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a record of the wrong shape
                problems.append(f"{src.method}: episode {record.get('id')!r}: not shown ({type(exc).__name__}: {exc})")
                continue
            rows.append(row)
            details.append(detail)
    sources = [{"method": s.method, "path": s.path, "files": s.files, "episodes": len(s.records),
                "duplicates": s.duplicates,
                "manifest": {k: s.manifest.get(k) for k in ("policy", "sub_policy", "samples", "created", "tasks_file")}
                if s.manifest else None} for s in loaded.sources]
    index = {"v": 1, "title": title or f"rlm-train view: {loaded.root}", "cols": list(INDEX_COLUMNS),
             "methods": methods, "rows": rows, "strings": strings.items, "sources": sources,
             "problems": problems, "report": loaded.report}
    if not rows:
        raise UserError(f"{loaded.root}: no trajectory could be shown ({len(problems)} problem(s), the first: {problems[0]})")
    page_title = index["title"]
    assert isinstance(page_title, str)
    script, style = _asset("viewer.js.txt"), _asset("viewer.css.txt")
    values = {
        "CSP": csp(script, style),
        "TITLE": html.escape(page_title, quote=True),
        "CSS": style,
        "JS": script,
        "INDEX": _script_json(index),
        "DETAILS": "\n".join(details),
        "CELLS": html.escape(CELL_RESULTS_NOTE, quote=True),
    }
    template = _asset("page.html.txt")
    # One pass, so nothing in the data is ever taken for a placeholder.
    text = re.sub(r"@@(CSP|TITLE|CSS|JS|INDEX|DETAILS|CELLS)@@", lambda m: values[m.group(1)], template)
    return Page(text, len(rows), problems)
