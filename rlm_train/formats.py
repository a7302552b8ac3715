"""On-disk formats shared by every stage (JSON Lines, one object a line, each with `schema`).

Kept at the bottom of the import graph: no heavy imports, no dependency on other stages.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from rlm_train.errors import UserError
from rlm_train.records import check_task



# --------------------------------------------------------------------------- reading JSON Lines
FAIL, SKIP = "fail", "skip"  # what a bad line does: stop with its line number, or warn and go on


class LineProblemKind(enum.StrEnum):
    """Why the reader left a line out."""

    TORN = "torn"  # the last line has no newline: a write cut off by a crash
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    REFUSED = "refused"  # valid JSON, refused by the caller's `check`


@dataclass(frozen=True)
class LineProblem:
    """One bad line: where, what kind, and why in words. str() is `path:line: why`."""

    path: Path
    line: int
    kind: LineProblemKind
    why: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


def iter_jsonl(path: str | Path, *, bad_lines: str = FAIL, check: Callable[[dict[str, Any]], str | None] | None = None,
               problems: list[LineProblem] | None = None, fix: str = "fix or delete the line",
               warn: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file: the one reader every
    stage uses. A bad line (not JSON, not an object, refused by `check`, or a last line
    cut off without its newline by a crash) is `path:line: why`: with bad_lines="fail" a
    UserError that ends with `fix`; with "skip" a warning on stderr, the line is left out
    and its `LineProblem` appended to `problems` (`warn=False`: no warning, for a file an
    earlier stage already reported)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a JSONL file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" after a final newline; anything else was cut off mid-write
    numbered = list(enumerate(lines, 1)) + ([(len(lines) + 1, None)] if torn.strip() else [])
    for lineno, raw in numbered:
        if raw is not None and not raw.strip():
            continue
        kind, why, obj = _parse_line(raw, check)
        if kind is None:
            yield lineno, obj
            continue
        problem = LineProblem(path, lineno, kind, why)
        if bad_lines == FAIL:
            raise UserError(f"{problem}; {fix}")
        if warn:
            print(f"warning: skipping {problem}", file=sys.stderr)
        if problems is not None:
            problems.append(problem)


def _parse_line(raw: bytes | None, check: Callable[[dict[str, Any]], str | None] | None
                ) -> tuple[LineProblemKind | None, str, Any]:
    """(None, "", object) for a good line, else (kind, why, None)."""
    if raw is None:
        return LineProblemKind.TORN, "the last line has no newline (a write was cut off)", None
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        return LineProblemKind.NOT_JSON, f"not valid JSON ({msg})", None
    if not isinstance(obj, dict):
        return LineProblemKind.NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}", None
    why = check(obj) if check is not None else None
    if why is not None:
        return LineProblemKind.REFUSED, why, None
    return None, "", obj


def read_jsonl(path: str | Path, **options: Any) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path, **options)]


def dumps_line(obj: Mapping[str, Any]) -> str:
    """One JSON line (no embedded newlines), UTF-8 kept readable."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_jsonl_atomic(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write a whole JSONL file so that readers see the old file or the new one, never half."""
    write_text_atomic(path, "".join(dumps_line(r) for r in records))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole file so that readers see the old file or the new one, never half. It gets
    the mode any new file gets (0666 less the umask), so teammates on shared storage can read
    what a run wrote; secrets are written elsewhere, 0600 (serve/vllm_auth.py: write_private).
    A path that cannot be written is one UserError naming it, not the temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp_file(path)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise disk_full(path, "it was not written; the old file, if any, is unchanged") from None
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """A new file beside `path` to write it through: created 0666 so that the umask decides its
    mode (mkstemp's are 0600), and exclusively, so no existing file is ever opened."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def _cannot_write(path: Path, exc: OSError) -> UserError:
    return UserError(f"{path}: cannot write it ({exc.strerror or exc}); pass a path in a directory you can write to")


# No space, or over the user's quota: the same thing to whoever runs the job.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: str | Path, what: str) -> UserError:
    """The one-line error for a full disk: which file, which file system, how much is free."""
    path = Path(path)
    mount = path.resolve().parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        st = os.statvfs(path.parent)
        free = f"{st.f_bavail * st.f_frsize:,} bytes free"
    except OSError:
        free = "free space unknown"
    return UserError(f"{path}: no space left on the disk ({mount}, {free}): {what}. Free space there (or write "
                     "elsewhere), then re-run the same command: it resumes")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record with a single write() so a crash leaves no torn line.

    O_APPEND makes each write land at the end atomically with respect to other
    appenders; readers should still skip a final line without a newline. A disk that
    fills mid-line (a short write, or ENOSPC) is cut back to the last whole line and
    reported as a UserError naming the disk.
    """
    data = dumps_line(record).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # the umask decides, as for any new file
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            written = -1
        if written != len(data):
            os.ftruncate(fd, size)  # no torn line: the file ends with its last whole record
            raise disk_full(path, "the last record was not written (the file ends with the one before it)")
    finally:
        os.close(fd)


def load_task_context(task: Mapping[str, Any], task_file: str | Path) -> Any:
    """A task's context: inline `context`, or `context_path` relative to the task file."""
    if "context" in task:
        return task["context"]
    why = check_task(task, task_file)
    if why is not None:
        raise UserError(f"{task_file}: {why}")
    path = Path(task_file).parent / task["context_path"]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return path.read_text(encoding="utf-8")


def read_context_file(path: str | Path) -> Any:
    """A context from disk: `.json` is parsed (str, list or dict); anything else is UTF-8 text.
    An empty context (no file content, only whitespace, or an empty JSON value) is refused:
    an episode over it could only answer from nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass the context as one file to --context-file")
    if not path.is_file():
        raise UserError(f"{path}: context file not found; pass an existing file to --context-file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8) or pass a .json file"
        ) from None
    if not text.strip():
        raise UserError(f"{path}: the context file is empty{' (only whitespace)' if text else ''}; "
                        "pass a file holding the text the query is about")
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg}); fix it or rename to .txt") from None
        if value in ("", [], {}, None) or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{path}: holds an empty JSON value ({text.strip()[:20]}); "
                            "pass a file holding the context the query is about")
        return value
    return text
