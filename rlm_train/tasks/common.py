"""Helpers shared by the task families: token estimates, seeds, text assembly."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

CHARS_PER_TOKEN = 4  # the stated estimate when no tokenizer is given
TOKEN_ESTIMATE = f"estimate: {CHARS_PER_TOKEN} characters per token"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same on every machine (no Python hash())."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def token_counter(tokenizer: Any) -> tuple[Callable[[str], int], str]:
    """(count(text) -> tokens, description) for a tokenizer object, a callable, or None."""
    if tokenizer is None:
        return (lambda text: len(text) // CHARS_PER_TOKEN), TOKEN_ESTIMATE
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if hasattr(tokenizer, "encode"):
        try:
            tokenizer.encode("probe", add_special_tokens=False)

            def count(text: str) -> int:
                return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:

            def count(text: str) -> int:
                return len(tokenizer.encode(text))

        return count, f"tokenizer: {name}"
    if callable(tokenizer):

        def count_callable(text: str) -> int:
            out = tokenizer(text)
            return out if isinstance(out, int) else len(out)

        return count_callable, f"tokenizer: {name}"
    raise TypeError(f"tokenizer must have .encode() or be callable, got {type(tokenizer).__name__}")


def insert_at_sentence(text: str, position: int, sentence: str) -> str:
    """Insert `sentence` at the first sentence end at or after `position` (or at the end)."""
    cut = text.find(". ", position)
    if cut < 0:  # no sentence end after `position`: append, never glue to the last word
        return f"{text.rstrip()} {sentence}"
    return f"{text[:cut + 2]}{sentence} {text[cut + 2:]}"


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]
