"""Read a model's turn: its ```repl``` code blocks and any FINAL / FINAL_VAR outside them."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

# ```repl (our format) and ```python (what small models often write instead).
CODE_FENCE_RE = re.compile(r"```[ \t]*(repl|python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_FINAL_START_RE = re.compile(r"^[ \t>*]*(FINAL_VAR|FINAL)\(", re.MULTILINE)


@dataclass
class FinalCall:
    kind: str  # "FINAL" or "FINAL_VAR"
    argument: str  # FINAL: the answer text; FINAL_VAR: the variable name


def extract_code_blocks(text: str) -> list[str]:
    """Code of every ```repl``` / ```python``` block, in order. An unterminated last
    block (the model hit its token limit or a stop string) still counts."""
    blocks = []
    for match in CODE_FENCE_RE.finditer(text):
        code = match.group(2).strip("\n")
        if code.strip():
            blocks.append(code)
    return blocks


def strip_code_blocks(text: str) -> str:
    return CODE_FENCE_RE.sub("", text)


def find_final(text: str) -> FinalCall | None:
    """The last FINAL(...) or FINAL_VAR(...) that starts a line outside code blocks.

    Parentheses are matched, so FINAL(f(x) + (y)) keeps its inner calls; a quoted
    argument is unquoted. Returns None when there is none or it is unterminated.
    """
    prose = strip_code_blocks(text)
    matches = list(_FINAL_START_RE.finditer(prose))
    for match in reversed(matches):
        inner = _balanced_argument(prose, match.end())
        if inner is None:
            continue
        kind = match.group(1)
        argument = _unquote(inner.strip())
        if kind == "FINAL_VAR":
            argument = argument.strip()
        return FinalCall(kind=kind, argument=argument)
    return None


def _balanced_argument(text: str, start: int) -> str | None:
    depth = 1
    quote: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _unquote(argument: str) -> str:
    if len(argument) >= 2 and argument[0] == argument[-1] and argument[0] in "\"'":
        try:
            value = ast.literal_eval(argument)
        except (SyntaxError, ValueError):
            return argument[1:-1]
        return str(value)
    return argument
