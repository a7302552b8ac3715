"""Files rlm-train writes get the user's umask, like any file a tool writes, so teammates on
shared cluster storage can read task files, datasets, reports and viewer pages; secrets (a
server's token, a job's netrc) stay readable by their owner alone. A path that cannot be
written is one line naming that path, never the temporary file written through."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rlm_train.cli import main as cli_main
from rlm_train.errors import UserError
from rlm_train.formats import append_jsonl, write_text_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_of_a_pipeline_run_is_readable_by_the_group_under_umask_022(tmp_path, umask, capsys):
    umask(0o022)
    tasks = tmp_path / "tasks.jsonl"
    run, data, ev, page = tmp_path / "run", tmp_path / "data", tmp_path / "eval", tmp_path / "viewer.html"
    # Contexts this long go to files beside the task file (--inline-max-tokens): those too.
    assert cli_main(["tasks", "make", "--family", "niah", "--n", "3", "--context-tokens", "8000",
                     "--inline-max-tokens", "1000", "--out", str(tasks)]) == 0
    assert cli_main(["generate", "--tasks", str(tasks), "--policy", "scripted", "--out", str(run),
                     "--no-progress"]) == 0
    assert cli_main(["filter", "--trajectories", str(run), "--out", str(data)]) == 0
    assert cli_main(["eval", "--tasks", str(tasks), "--method", "teacher=scripted", "--out", str(ev),
                     "--no-progress"]) == 0
    assert cli_main(["view", str(run), "-o", str(page)]) == 0
    capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    named = {p.relative_to(tmp_path).as_posix() for p in written}
    for must in ("tasks.jsonl", "run/manifest.json", "run/summary.json", "data/filter_report.json",
                 "eval/report.json", "eval/report.md", "viewer.html"):
        assert must in named, sorted(named)
    assert any(n.startswith("tasks.contexts/") for n in named)  # a context file
    assert any(n.startswith("data/sft-") and n.endswith(".jsonl") for n in named)  # a dataset file
    assert any(n.startswith("run/shard-") for n in named)  # appended, not written whole
    wrong = {p.relative_to(tmp_path).as_posix(): oct(_mode(p)) for p in written if _mode(p) != 0o644}
    assert not wrong, wrong


@pytest.mark.parametrize("mask,expected", [(0o002, 0o664), (0o077, 0o600), (0o022, 0o644)])
def test_the_writers_follow_the_umask_whatever_it_is(tmp_path, umask, mask, expected):
    umask(mask)
    write_text_atomic(tmp_path / "whole.json", "{}\n")
    append_jsonl(tmp_path / "appended.jsonl", {"a": 1})
    write_text_atomic(tmp_path / "whole.json", "{}\n")  # replacing a file: the new one gets the umask too
    assert _mode(tmp_path / "whole.json") == expected
    assert _mode(tmp_path / "appended.jsonl") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appended.jsonl", "whole.json"]  # no temporary left


def test_secrets_stay_readable_by_their_owner_alone_whatever_the_umask(tmp_path, umask):
    from rlm_train.serve.vllm_auth import write_job_token

    umask(0)
    write_job_token("127.0.0.1", tmp_path / "token", tmp_path / "netrc")
    assert _mode(tmp_path / "token") == 0o600 and _mode(tmp_path / "netrc") == 0o600


@pytest.mark.parametrize("where", ["under-a-file", "onto-a-directory", "in-proc"])
def test_a_path_that_cannot_be_written_is_one_error_naming_it_not_the_temporary(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    path = {"under-a-file": tmp_path / "afile" / "out.json", "onto-a-directory": tmp_path / "adir",
            "in-proc": Path("/proc/rlm-train-test.jsonl")}[where]
    with pytest.raises(UserError) as info:
        write_text_atomic(path, "{}\n")
    message = str(info.value)
    assert message.startswith(f"{path}: cannot write it (") and ".tmp" not in message, message
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir", "afile"]  # nothing left behind
