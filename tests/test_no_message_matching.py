"""No control flow is decided by matching the English text of an error, note, problem or message:
a reworded message must never change what the code does (the class of bug behind `bf16` vs
`bfloat16`). Categories travel as types instead: ErrorKind, formats.LineProblemKind,
sft_data.EmptySplit, typed plan notes.

The test greps rlm_train/ for the patterns that did it before: `msg.startswith(PREFIX)`,
`problem.endswith(TORN_LINE)`, `"split is empty" in str(exc)`, `"not found" in note`. Prefix tests
on paths, flags, specs and parsed machine formats are fine; the names below are the ones that
hold human-readable text."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlm_train"

# Names that hold a message: an exception's text, a note, a problem, a plan link's description.
SINGULAR = r"(?:note|error|err|message|msg|problem|reason|why|detail|warning|stderr|stdout|source|exc)"
ANY = rf"(?:{SINGULAR}|notes|errors|messages|problems|reasons|warnings)"
PATTERNS = {
    "a prefix or suffix test on a message":
        re.compile(rf"(?:\b{SINGULAR}|\[[\"']{SINGULAR}[\"']\]|\bstr\((?:exc|e|err|error)\))\.(?:startswith|endswith)\("),
    "a substring test on an exception's text": re.compile(r"\bin\s+str\(\s*(?:exc|e|err|error)\s*\)"),
    "a literal looked for in a message": re.compile(rf"[\"'][^\"'\n]*[\"']\s+(?:not\s+)?in\s+(?:\w+\.)*{ANY}\b(?!\s*[(\[.])"),
    "a text looked for in a message": re.compile(rf"\b\w+\s+(?:not\s+)?in\s+(?:\w+\.)*{SINGULAR}\b(?!\s*[(\[.])"),
}
# `for x in messages` is iteration, not a test.
LOOP_TARGET = re.compile(r"\bfor\s+[\w\s,()\[\]]+?\s+in\s+")

# (file, code on the line): legitimate matches, each with why.
ALLOWED = {
    # pydantic's error dict: a key lookup, not text.
    ("config.py", '"ctx" in err'),
}


def offending_lines(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = LOOP_TARGET.sub("", line.split("  #", 1)[0])
            if code.lstrip().startswith("#"):
                continue
            for what, pattern in PATTERNS.items():
                if pattern.search(code) and not any(relative == f and snippet in line for f, snippet in ALLOWED):
                    found.append(f"rlm_train/{relative}:{number}: {what}: {line.strip()}")
    return found


def test_no_control_flow_is_decided_by_message_text():
    found = offending_lines()
    assert not found, "decide by a typed kind, not by the message's words:\n" + "\n".join(found)


def test_the_grep_finds_the_patterns_it_is_for(tmp_path):
    """The patterns the third architecture review found, and legitimate look-alikes it must pass."""
    bad = [
        'if error.startswith(REFUSED):',
        'if problem.endswith(TORN_LINE):',
        'if "split is empty" in str(exc):',
        'notes = [n for n in notes if not ("not found" in note or "does not exist" in note)]',
        'if any(path in note for path in made):',
        'if row["detail"].startswith("never runs"):',
        'if link.source.startswith("stage "):',
    ]
    good = [
        'if path.startswith(made.rstrip("/") + "/"):',
        'if arg.startswith("--max-model-len="):',
        'for note in notes:',
        'for _, problem in enumerate(problems):',
        'if problem.kind == LineProblemKind.TORN:',
        'if not name.endswith(".py"):',
        'if stage.name in errors_by_stage:',
        'message = f"{kind} in {where}"  # a comment that says "x" in note',
    ]
    (tmp_path / "bad.py").write_text("\n".join(bad) + "\n")
    (tmp_path / "good.py").write_text("\n".join(good) + "\n")
    found = offending_lines(tmp_path)
    assert [line.split(":")[1] for line in found] == [str(n) for n in range(1, len(bad) + 1)], found
