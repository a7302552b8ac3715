"""How an rlm_query context reaches the child RLM's sandbox, and how a context is
described in the prompts.

The parent cell's worker encodes the context as JSON text and describes it (it holds the
object); the host passes the text on without decoding it (`EncodedContext`); the child's
pooled worker decodes it as its first frame and says `loaded`. So a child's context is
built inside the child session's cgroups, where its memory_mb and CPU time pay for it,
never in the host or a zygote; the host keeps only the encoded text, to restart the
child's worker with it.

Imported by every worker: standard library and protocol only.
"""

from __future__ import annotations

import os

import orjson

from rlm_train.repl import protocol

MAX_DEPTH = 100  # nesting of an rlm_query context
TYPE_CHARS = 200  # what the host keeps of the parent's description of a context
DESCRIPTION_CHARS = 2000


class EncodedContext:
    """An rlm_query context as the JSON text the parent cell's worker sent, with its short
    type and description for the child's prompts (`describe_context`). The description is
    the parent episode's own text, like the rlm_query prompt beside it."""

    __slots__ = ("text", "context_type", "description")

    def __init__(self, text: str, context_type: str, description: str):
        self.text, self.context_type, self.description = text, context_type, description

    def __getstate__(self):
        return self.text, self.context_type, self.description

    def __setstate__(self, state) -> None:
        self.text, self.context_type, self.description = state

    def __str__(self) -> str:
        """The context as prompt text (rlm_query at the depth limit inlines it): a JSON
        string's own text, else the JSON."""
        if self.text.startswith('"'):
            try:
                value = orjson.loads(self.text)
            except orjson.JSONDecodeError:
                return self.text
            if isinstance(value, str):
                return value
        return self.text

    def decode(self):
        """The context itself: plain data, nesting bounded by the JSON decoder (ValueError
        for text that is not JSON). No value count here: the session decoding it pays."""
        return orjson.loads(self.text)

    @classmethod
    def from_wire(cls, value) -> EncodedContext | None:
        """What the host accepts as an rlm_query context from a worker's request frame."""
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 3 and all(type(v) is str for v in value)):
            raise ValueError("malformed rlm_query request: a context is sent as [json, type, description]")
        return cls(value[0], value[1][:TYPE_CHARS], value[2][:DESCRIPTION_CHARS])


def encode(context) -> list[str] | None:
    """In the parent's worker: the wire form of an rlm_query context (`from_wire` reads it).
    TypeError for what is not plain data, ValueError for nesting past MAX_DEPTH."""
    if context is None:
        return None
    try:  # first: the encoder refuses cycles and objects
        text = orjson.dumps(context).decode()
    except orjson.JSONEncodeError:  # the frame's encoder says why (or repairs lone surrogates)
        text = protocol.dumps_data(context).decode()
    if not _depth_within(context, MAX_DEPTH):
        raise ValueError(f"an rlm_query context may nest at most {MAX_DEPTH} levels deep")
    return [text, *describe_context(context)]


def load(sock, encoded: EncodedContext):
    """In the child's worker, as its first frame arrived: the context decoded here, in the
    session's own cgroups, then `loaded` to the host (or `load_failed` with why, and exit)."""
    try:
        context = encoded.decode()
    except (ValueError, MemoryError) as exc:
        why = "it does not fit in the session's memory_mb" if isinstance(exc, MemoryError) else str(exc)
        protocol.send_data(sock, {"op": "load_failed", "error": f"the rlm_query context could not be loaded: {why}"})
        os._exit(0)
    protocol.send_data(sock, {"op": "loaded"})
    return context


def _depth_within(value, limit: int) -> bool:
    """Nesting of plain data at most `limit` levels: one level of containers at a time."""
    level = [value]
    for _ in range(limit + 1):
        level = [v for item in level if isinstance(item, (list, tuple, dict))
                 for v in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return True
    return False


def describe_context(context) -> tuple[str, str]:
    """(short type, longer description with sizes) for the prompts."""
    if isinstance(context, EncodedContext):
        return context.context_type, context.description
    if isinstance(context, str):
        chars = len(context)
        return "a string", f"a string of {chars:,} characters (about {chars // 4:,} tokens)"
    if isinstance(context, list):
        lengths = [len(str(item)) for item in context[:10_000]]
        total = sum(lengths)
        shown = ", ".join(f"{n:,}" for n in lengths[:8]) + (", ..." if len(lengths) > 8 else "")
        return (
            f"a list of {len(context):,} items",
            f"a list of {len(context):,} items, {total:,} characters in all (item lengths: {shown})",
        )
    if isinstance(context, dict):
        keys = list(context)[:12]
        more = ", ..." if len(context) > 12 else ""
        return (
            f"a dict with {len(context):,} keys",
            f"a dict with {len(context):,} keys ({', '.join(repr(k)[:60] for k in keys)}{more})",
        )
    return type(context).__name__, f"a {type(context).__name__} object"
