"""Categories are typed values, not matched text: the JSONL reader's problem kinds, a root call
the server refused (ErrorKind.REFUSED), an empty dataset split (EmptySplit). Each test rewords
or fakes the English message to show that nothing downstream reads it."""

from __future__ import annotations

import json

import pytest

from rlm_train.errors import UserError
from rlm_train.formats import SKIP, LineProblem, LineProblemKind, iter_jsonl
from rlm_train.records import TRAJECTORY_SCHEMA, ErrorKind, Outcome


def test_the_reader_gives_every_bad_line_a_kind(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"ok": 1}\nnot json\n[1, 2]\n{"refuse": true}\n\n{"ok": 2}\n{"torn": ')
    problems: list[LineProblem] = []
    rows = list(iter_jsonl(path, bad_lines=SKIP, check=lambda o: "refused by the check" if "refuse" in o else None,
                           problems=problems, warn=False))
    assert [n for n, _ in rows] == [1, 6]
    assert [(p.line, p.kind) for p in problems] == [
        (2, LineProblemKind.NOT_JSON), (3, LineProblemKind.NOT_OBJECT), (4, LineProblemKind.REFUSED),
        (7, LineProblemKind.TORN)]
    assert str(problems[2]) == f"{path}:4: refused by the check" and problems[2].where == f"{path}:4"
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: not valid JSON .*; fix it$"):
        list(iter_jsonl(path, fix="fix it"))


def test_the_store_counts_a_torn_line_by_its_kind_whatever_a_check_says(tmp_path):
    """A record refused with a message that reads like the torn-line one is a bad line, not a torn one."""
    from rlm_train.rollouts.store import ReadStats, read_records

    good = {"schema": TRAJECTORY_SCHEMA, "task_id": "t", "sample": 0}
    impostor = {"schema": "the last line has no newline (a write was cut off)"}
    path = tmp_path / "shard-1.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(impostor) + "\n" + '{"schema": "rlm-tr')
    stats = ReadStats()
    assert len(read_records(tmp_path, stats)) == 1
    assert stats.torn_lines == 1 and stats.bad_lines == [f"{path}:2"]


def test_a_run_the_server_refuses_stops_with_the_refusal_message(tmp_path):
    """Every root turn over the server's window: the episodes are REFUSED (not MODEL) errors, held back
    as a streak, and the run stops saying the requests do not fit (not that the server is down)."""
    from rlm_train.bench.scenario import write_scenario_tasks
    from rlm_train.rlm import RLMConfig
    from rlm_train.rollouts.generate import GenerateConfig, ServerDown, run_generate
    from rlm_train.testing.mock_server import MockOpenAIServer

    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)
    rows = [json.loads(line) for line in tasks.read_text().splitlines()]
    for row in rows:
        row["query"] = "q " * 2500  # the first root prompt alone is over the 2,000-token window
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with MockOpenAIServer(responder=lambda messages, body: "never", max_model_len=2000) as server:
        with pytest.raises(ServerDown, match=r"the server refused 3 episodes in a row.*--max-model-len"):
            run_generate(GenerateConfig(
                tasks=str(tasks), out=str(tmp_path / "out"), policy="openai:mock-model", base_urls=[server.base_url],
                max_consecutive_failures=3, progress=False, rlm=RLMConfig(max_iterations=2, root_max_tokens=64)))
        assert server.counts["error_400"] == 3


def test_a_refused_root_call_is_recorded_as_refused():
    import asyncio

    from rlm_train.models.base import CallablePolicy, RequestRefused
    from rlm_train.rlm import run_episode

    def refuse(messages, call):
        raise RequestRefused("HTTP 400: this model's maximum context length is 2000 tokens")

    traj = asyncio.run(run_episode("q", "ctx", CallablePolicy(refuse)))
    assert traj["outcome"] == Outcome.ERROR and traj["error_kind"] == ErrorKind.REFUSED
    assert json.loads(json.dumps(traj))["error_kind"] == "refused"  # on disk: the plain string


def test_an_empty_validation_split_is_none_by_its_type(tmp_path):
    from rlm_train.train.sft_data import EmptySplit, read_sft_dataset, read_validation

    train = tmp_path / "sft-train.jsonl"
    train.write_text("")
    with pytest.raises(EmptySplit, match=r"sft-train\.jsonl: the dataset's train split is empty \(0 samples\)"):
        read_sft_dataset(train)
    assert read_validation(train) == []
    broken = tmp_path / "sft-validation.jsonl"
    broken.write_text('{"no_messages": 1}\n')
    with pytest.raises(UserError, match="no 'messages' field") as caught:
        read_validation(broken)  # any other problem with the split still stops the run
    assert not isinstance(caught.value, EmptySplit)
