"""The task-family registry and the scripted teacher's strategy registry: a sixth family
is one `Family` and one strategy, registered, and nothing else in the project changes.

These tests need no corpus package: the toy family brings its own text."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest

from rlm_train.errors import UserError
from rlm_train.tasks import FAMILIES, make_tasks, score
from rlm_train.tasks.family import Family
from rlm_train.tasks.registry import BUILTIN, family_names, get_family, register_family, unregister_family

# ---------------------------------------------------------------- a sixth family, all in this file

_WORDS = "amber basil cedar delta ember fjord grove heron iris juniper kestrel lilac".split()


def toy_generate(rng: random.Random, target_chars: int, split: str) -> dict:
    """Lines of `item <n>: <word> <word>` with one `the toy code is <code>` line among them."""
    code = f"{rng.choice(_WORDS)}-{rng.randrange(1000, 10000)}"
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < target_chars:
        lines.append(f"item {len(lines)}: {rng.choice(_WORDS)} {rng.choice(_WORDS)}")
    lines.insert(rng.randrange(len(lines) + 1), f"note: the toy code is {code}")
    return {"query": "What is the toy code in the text?", "context": "\n".join(lines), "answer": code,
            "meta": {"lines": len(lines), "split_code": f"{split}:{code}"}}


def toy_score(task: dict, answer) -> float:
    return 1.0 if str(answer).strip().lower() == str(task["answer"]).lower() else 0.0


TOY = Family(name="toy", generate=toy_generate, scorer="toy_exact", score=toy_score, min_tokens=50,
             corpus_version=lambda: "toy-corpus/1", split_keys=lambda task: {"toy_code": [task["answer"]]})


def toy_next_turn(view) -> str:
    """The toy family's teacher: grep for the code line, then submit what it printed."""
    from rlm_train.policies.scripted import repl_block

    if "CODE " in view.last_output or view.last_turn:
        return "Submitting the code.\n" + repl_block("FINAL_VAR('code')")
    return "Search the lines for the code.\n" + repl_block(
        "import re\nm = re.search(r'the toy code is (\\S+)', context)\ncode = m.group(1) if m else 'unknown'\n"
        "print('CODE', code)"
    )


@pytest.fixture
def toy_family():
    from rlm_train.policies.scripted.registry import register_strategy, unregister_strategy

    register_family(TOY)
    register_strategy("toy", toy_next_turn)
    try:
        yield TOY
    finally:
        unregister_strategy("toy")
        unregister_family("toy")


def test_a_sixth_family_is_generated_written_and_scored_through_the_registry(toy_family, tmp_path):
    from rlm_train.tasks.generate import write_tasks
    from rlm_train.tasks.scorefile import score_files

    assert "toy" in family_names() and get_family("toy") is TOY
    tasks = make_tasks("toy", 3, 400, seed=5)
    assert tasks == make_tasks("toy", 3, 400, seed=5)  # deterministic
    assert [t["id"] for t in tasks] == [f"toy-train-400-s5-{i:05d}" for i in range(3)]
    for task in tasks:
        assert task["family"] == "toy" and task["scorer"] == "toy_exact"
        assert task["meta"]["corpus"] == "toy-corpus/1" and task["meta"]["requested_tokens"] == 400
        assert score(task, task["answer"]) == 1.0 and score(task, "nope") == 0.0
    path = write_tasks(tmp_path / "toy.jsonl", tasks)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": t["id"], "answer": t["answer"]}) + "\n" for t in tasks))
    rows, summary = score_files(path, preds)
    assert summary["mean"] == 1.0 and summary["families"] == {"toy": (3, 1.0)}
    with pytest.raises(UserError, match="smaller than one toy task"):
        make_tasks("toy", 1, 10)


def test_a_sixth_family_takes_part_in_suites_and_the_split_check(toy_family, tmp_path):
    from rlm_train.tasks.suite import TaskSuiteConfig, build_suite, check_disjoint, split_keys

    config = TaskSuiteConfig(out_dir=str(tmp_path / "suite"), context_tokens=[300],
                             families={"toy": {"train": 2, "heldout": 2}})
    manifest = build_suite(config, progress=lambda *_: None)
    assert manifest["counts"] == {"train": {"toy": 2}, "heldout": {"toy": 2}}
    train = make_tasks("toy", 2, 300, seed=0)
    assert split_keys(train)["toy_code"] == {t["answer"] for t in train}
    with pytest.raises(RuntimeError, match="share"):
        check_disjoint(train, train[:1])


def test_a_sixth_family_is_solved_by_its_registered_teacher_strategy(toy_family):
    from rlm_train.policies.oracle import OraclePolicy
    from rlm_train.policies.scripted import ScriptedTeacher
    from rlm_train.rlm import RLMConfig, run_episode

    task = make_tasks("toy", 1, 2000, seed=9)[0]
    hints = {"family": "toy", "task_id": task["id"], "sample": 0, "meta": task["meta"]}
    traj = asyncio.run(run_episode(task["query"], task["context"], ScriptedTeacher(), OraclePolicy(),
                                   RLMConfig(max_iterations=4), hints=hints))
    assert traj["final"] == task["answer"] and score(task, traj["final"]) == 1.0
    assert "the toy code is" in traj["turns"][0]["assistant"]  # the toy strategy wrote it, not generic


# ---------------------------------------------------------------- the registries themselves


def test_the_builtin_families_are_registered_each_with_a_teacher_strategy():
    from rlm_train.policies.scripted.registry import FALLBACK, strategy_for

    assert tuple(f.name for f in BUILTIN) == FAMILIES == family_names()
    for name in FAMILIES:
        assert strategy_for(name) is not FALLBACK, name
    assert {get_family(n).scorer for n in FAMILIES} == {"all_strings", "oolong", "pairs_f1", "multihop_f1", "mcq"}
    assert get_family("niah").min_tokens == 500 and get_family("multihop").min_tokens == 1500


def test_unknown_families_fall_back_to_the_generic_strategy():
    from rlm_train.policies.scripted import generic
    from rlm_train.policies.scripted.registry import strategy_for

    assert strategy_for(None) is strategy_for("no_such_family") is strategy_for("../x") is generic.next_turn


def test_registering_twice_or_reusing_a_scorer_name_is_an_error():
    from rlm_train.policies.scripted.registry import register_strategy

    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family("niah"))
    with pytest.raises(ValueError, match="scorer name 'mcq' is already taken by family 'codeqa'"):
        register_family(Family(name="toy2", generate=toy_generate, scorer="mcq", score=toy_score, min_tokens=1))
    assert "toy2" not in family_names()
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("niah", toy_next_turn)
    with pytest.raises(UserError, match="unknown task family 'toy2'; choose one of niah, oolong"):
        make_tasks("toy2", 1, 1000)
    with pytest.raises(UserError, match="unknown scorer 'toy_exact'"):
        score({"id": "t", "scorer": "toy_exact", "answer": "x"}, "x")


def test_replacing_a_family_keeps_its_place_and_frees_an_unused_scorer():
    register_family(TOY)
    register_family(Family(name="toy_b", generate=toy_generate, scorer="toy_exact", score=toy_score, min_tokens=5))
    try:
        register_family(Family(name="toy", generate=toy_generate, scorer="toy_other", score=toy_score, min_tokens=5),
                        replace=True)
        assert family_names()[-2:] == ("toy", "toy_b") and get_family("toy").scorer == "toy_other"
        assert score({"id": "t", "scorer": "toy_exact", "answer": "x"}, "x") == 1.0  # toy_b still uses it
        unregister_family("toy_b")
        with pytest.raises(UserError, match="unknown scorer 'toy_exact'"):
            score({"id": "t", "scorer": "toy_exact", "answer": "x"}, "x")
    finally:
        for name in ("toy", "toy_b"):
            if name in family_names():
                unregister_family(name)
    assert family_names() == FAMILIES


@pytest.mark.parametrize("bad, match", [
    ({"name": "to-y"}, "lower-case letters"),
    ({"scorer": ""}, "scorer must be"),
    ({"min_tokens": 0}, "min_tokens must be a positive integer"),
    ({"generate": "toy_generate"}, "generate must be callable"),
])
def test_a_family_is_checked_when_it_is_built(bad, match):
    fields = {"name": "toy", "generate": toy_generate, "scorer": "toy_exact", "score": toy_score, "min_tokens": 5}
    with pytest.raises(ValueError, match=re.escape(match)):
        Family(**{**fields, **bad})
