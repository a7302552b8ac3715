"""`rlm-train eval`'s honest baselines and statistics: exact binomial intervals for 0/1
scores, errored episodes scored 0 and counted, the constant-answer floor, the one-shot row,
and the oracle refused on tasks it cannot answer."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from rlm_train import cli
from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig
from rlm_train.eval.one_shot import EXAMPLE_CHARS, EXAMPLE_HEADER, render_example
from rlm_train.eval.run import run_eval
from rlm_train.eval.stats import binomial_cdf, clopper_pearson, score_interval, sign_test_p
from rlm_train.models.base import CallablePolicy, PolicyError, Role
from rlm_train.policies.baselines import answer_form, answer_text
from rlm_train.rollouts import store
from rlm_train.rollouts.generate import GenerateConfig, run_generate
from rlm_train.tasks import corpora, make_tasks, score
from rlm_train.tasks.generate import write_tasks


def md_section(md: str, heading: str) -> str:
    return md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def table_rows(section: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k, n, lo, hi", [(0, 12, 0.0, 0.2646), (12, 12, 0.7354, 1.0), (5, 10, 0.1871, 0.8129),
                                          (3, 7, 0.0990, 0.8159), (1, 1, 0.025, 1.0)])
def test_clopper_pearson_matches_published_values(k, n, lo, hi):
    got = clopper_pearson(k, n, 0.95)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    # Its defining equations: each tail holds exactly alpha/2 at the bound.
    if k > 0:
        assert 1 - binomial_cdf(k - 1, n, got[0]) == pytest.approx(0.025, abs=1e-9)
    if k < n:
        assert binomial_cdf(k, n, got[1]) == pytest.approx(0.025, abs=1e-9)


def test_score_interval_is_exact_for_0_1_scores_and_bootstrap_for_graded_ones():
    exact = score_interval([1.0] * 12, resamples=500, confidence=0.95, seed=0, label="x")
    assert exact["interval"] == "exact" and exact["mean"] == 1.0 and exact["n"] == 12
    assert round(exact["lo"], 3) == 0.735 and exact["hi"] == 1.0  # a bootstrap would say [1, 1]
    graded = score_interval([1.0, 0.5, 0.0, 1.0], resamples=500, confidence=0.95, seed=0, label="x")
    assert graded["interval"] == "bootstrap" and graded["lo"] <= graded["mean"] <= graded["hi"]
    assert score_interval([], resamples=500, confidence=0.95, seed=0, label="x")["interval"] is None
    # 90% is narrower than 95%, both exact.
    assert clopper_pearson(5, 10, 0.9)[0] > clopper_pearson(5, 10, 0.95)[0]
    # The sign test: 5 wins of 5 is 2 / 32; even wins and losses is 1; no untied task, no test.
    assert sign_test_p(5, 0) == pytest.approx(0.0625) and sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) is None
    assert sign_test_p(9, 1) == pytest.approx(2 * (1 + 10) / 1024)


# --------------------------------------------------------------------------- errors
def test_an_errored_episode_scores_zero_and_is_counted(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 4)  # the answer of bench-i is keyi

    def answer(messages, call):
        if call.hints["task_id"] == "bench-1":
            raise PolicyError("the model server went away")
        return f"```repl\nFINAL('key{call.hints['task_id'].split('-')[1]}')\n```"

    config = EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), concurrency=1, progress=False,
                        methods=[{"name": "flaky", "policy": "flaky"}])
    report = run_eval(config, policies={"flaky": (CallablePolicy(answer, "flaky"), None)})
    records = {r["task_id"]: r for r in store.read_records(tmp_path / "eval" / "runs" / "flaky")}
    assert records["bench-1"]["outcome"] == "error" and records["bench-1"]["score"] is None
    m = report["methods"]["flaky"]
    # Scored 0 and counted: 3 of 4, not 3 of 3.
    assert m["score"]["all"]["mean"] == 0.75 and m["score"]["all"]["n"] == 4 and m["tasks_scored"] == 4
    lo, hi = clopper_pearson(3, 4, 0.95)
    assert m["score"]["all"] == {"mean": 0.75, "lo": round(lo, 3), "hi": round(hi, 3), "n": 4, "interval": "exact"}
    assert m["errors"] == 1 and m["errors_by_family"] == {"niah": 1}
    md = (tmp_path / "eval" / "report.md").read_text()
    head, *rows = [line for line in md_section(md, "Scores by family").splitlines() if line.startswith("|")]
    errors_column = [c.strip() for c in head.strip("|").split("|")].index("errors")
    (row,) = table_rows(md_section(md, "Scores by family"))
    assert row[errors_column] == "1" and row[1] == f"0.750 [{lo:.3f}, {hi:.3f}] (exact, n=4)"
    assert "scores 0 and is counted in `errors`" in md


# --------------------------------------------------------------------------- constant floor
@pytest.fixture(scope="module")
def oolong_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("oolong")
    train = make_tasks("oolong", 16, 1200, seed=11, split="train") + make_tasks("niah", 3, 600, seed=11, split="train")
    heldout = make_tasks("oolong", 8, 1200, seed=12, split="heldout") + make_tasks("niah", 2, 600, seed=12,
                                                                                     split="heldout")
    write_tasks(root / "train.jsonl", train)
    write_tasks(root / "heldout.jsonl", heldout)
    return root, train, heldout


def test_constant_floor_answers_one_fitted_constant_per_family_and_form(oolong_files, tmp_path):
    root, train, heldout = oolong_files
    config = EvalConfig(tasks=[str(root / "heldout.jsonl")], train_tasks=[str(root / "train.jsonl")],
                        out=str(tmp_path / "eval"), progress=False, methods=[{"name": "floor", "policy": "constant"}])
    report = run_eval(config)
    records = store.read_records(tmp_path / "eval" / "runs" / "floor")
    by_id = {t["id"]: t for t in heldout}
    answers: dict[tuple[str, str], set[str]] = {}
    for r in records:
        task = by_id[r["task_id"]]
        answers.setdefault((task["family"], answer_form(task["query"])), set()).add(r["final"])
        assert r["stats"]["turns"] == 1 and r["score"] == score(task, r["final"])
    # One constant per (family, answer form): a label for label questions, a number for number questions.
    assert all(len(finals) == 1 for finals in answers.values()), answers
    label = answers.get(("oolong", "one label from the list"))
    number = answers.get(("oolong", "a single number"))
    assert label and next(iter(label)) in corpora.LABELS
    assert number and next(iter(number)).isdigit()
    # Each is the best constant on the training tasks of its form: no training answer and no label scores higher.
    for (family, form), finals in answers.items():
        group = [t for t in train if t["family"] == family and answer_form(t["query"]) == form]
        mean = lambda a: sum(score(t, a) for t in group) / len(group)  # noqa: E731
        rivals = {answer_text(t["answer"]) for t in group} | (set(corpora.LABELS) if family == "oolong" else set())
        assert mean(next(iter(finals))) >= max(mean(a) for a in rivals) - 1e-12, (family, form)
    floor = report["methods"]["floor"]
    assert floor["label"] == "constant-answer floor, fit on training tasks" and floor["cost"]["sub_calls"] == 0
    assert floor["score"]["all"]["mean"] == pytest.approx(
        sum(r["score"] for r in records) / len(records), abs=1e-3)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| floor (constant-answer floor, fit on training tasks) |" in md
    assert "The constant-answer floor (fit on training tasks) reads nothing of the context" in md


def test_constant_without_train_tasks_and_outside_eval_is_one_line(oolong_files, tmp_path, capsys):
    root, _, _ = oolong_files
    out = tmp_path / "eval"
    assert cli.main(["eval", "--tasks", str(root / "heldout.jsonl"), "--out", str(out),
                     "--method", "floor=constant"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_tasks is empty" in err and "'floor'" in err and len(err.splitlines()) == 1 and not out.exists()
    gen = tmp_path / "gen"
    assert cli.main(["generate", "--tasks", str(root / "heldout.jsonl"), "--out", str(gen), "--policy", "constant"]) == 2
    err = capsys.readouterr().err.strip()
    assert "constant-answer floor" in err and "train_tasks" in err and len(err.splitlines()) == 1 and not gen.exists()


# --------------------------------------------------------------------------- one-shot
@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory):
    """A scripted-teacher generate run on niah training tasks: the one-shot examples."""
    root = tmp_path_factory.mktemp("teacher")
    write_tasks(root / "train.jsonl", make_tasks("niah", 4, 600, seed=21, split="train"))
    write_tasks(root / "heldout.jsonl", make_tasks("niah", 2, 600, seed=22, split="heldout"))
    run_generate(GenerateConfig(tasks=str(root / "train.jsonl"), out=str(root / "gen"), policy="scripted",
                                sub_policy="oracle", progress=False, rlm={"max_iterations": 6}))
    return root


def test_one_shot_puts_the_best_solved_teacher_trajectory_in_the_root_system_prompt(teacher_store, tmp_path):
    root = teacher_store
    seen: list[tuple[str, str]] = []

    def model(messages, call):
        seen.append((call.role, messages[0]["content"] if messages[0]["role"] == "system" else ""))
        return "```repl\nFINAL('1234567')\n```"

    config = EvalConfig(tasks=[str(root / "heldout.jsonl")], out=str(tmp_path / "eval"), progress=False,
                        methods=[{"name": "shot", "policy": "model", "one_shot": str(root / "gen")}])
    report = run_eval(config, policies={"shot": (CallablePolicy(model, "model"), None)})
    # The chosen example: the highest score, then the shortest rendering.
    solved = [r for r in store.read_records(root / "gen") if r["final"] is not None and r["score"]]
    top = max(r["score"] for r in solved)
    best = min((r for r in solved if r["score"] == top), key=lambda r: len(render_example(r)))
    saved = json.loads((tmp_path / "eval" / "one_shot" / "shot.json").read_text())
    assert saved["niah"]["trajectory_id"] == best["id"] and saved["niah"]["score"] == top
    example = saved["niah"]["text"]
    assert len(example) <= EXAMPLE_CHARS + 200 and example.startswith(EXAMPLE_HEADER)
    # The turns and the REPL output as the teacher's model saw them.
    first_reply = best["messages"][2]["content"].strip()
    repl_output = best["messages"][3]["content"].strip()
    assert first_reply[:300] in example and repl_output[:200] in example and best["query"] in example
    assert len(seen) == 2 and all(role == Role.ROOT and system.endswith(example) for role, system in seen)
    records = store.read_records(tmp_path / "eval" / "runs" / "shot")
    assert {r["policy"] for r in records} == {f"one-shot[{root / 'gen'}]:model"}
    assert report["methods"]["shot"]["one_shot"] == str(root / "gen")
    assert f"rlm, one-shot from `{root / 'gen'}`" in (tmp_path / "eval" / "report.md").read_text()


def test_one_shot_bad_stores_are_one_line_naming_the_path_and_family(teacher_store, oolong_files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "no-such-run"
    for store_dir, tasks, message in (
            (missing, teacher_store / "heldout.jsonl", f"one_shot {missing}: no such trajectory directory or file"),
            (empty, teacher_store / "heldout.jsonl", f"one_shot {empty}: holds no trajectories"),
            (teacher_store / "gen", oolong_files[0] / "heldout.jsonl",
             f"one_shot {teacher_store / 'gen'}: no solved trajectory of family 'oolong'")):
        config = EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), progress=False,
                            methods=[{"name": "shot", "policy": "scripted", "one_shot": str(store_dir)}])
        with pytest.raises(UserError, match=re.escape(message)) as raised:
            run_eval(config)
        assert "\n" not in str(raised.value) and not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------- the oracle
def test_the_oracle_on_tasks_without_gold_metadata_is_refused_naming_the_file(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)  # hand-made tasks: no meta.corpus
    out = tmp_path / "eval"
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"tasks": [str(tasks)], "out": str(out), "progress": False,
                                      "methods": [{"name": "teacher", "policy": "scripted"},
                                                  {"name": "tuned", "policy": "scripted", "sub_policy": "oracle"}]}))
    assert cli.main(["eval", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tasks) in err and "'bench-0'" in err and "'tuned'" in err
    assert "oracle (gold-label lookup)" in err and "meta.corpus" in err and not out.exists()
    gen = tmp_path / "gen"
    assert cli.main(["generate", "--tasks", str(tasks), "--out", str(gen), "--policy", "scripted",
                     "--sub-policy", "oracle"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tasks) in err and "'bench-0'" in err and "sub_policy" in err
    assert not gen.exists()
    # Tasks `rlm-train tasks make` built pass: the same command runs.
    made = tmp_path / "made.jsonl"
    write_tasks(made, make_tasks("niah", 1, 600, seed=3, split="heldout"))
    assert cli.main(["generate", "--tasks", str(made), "--out", str(gen), "--policy", "scripted",
                     "--sub-policy", "oracle", "--no-progress"]) == 0
    (record,) = store.read_records(gen)
    assert math.isclose(record["score"], 1.0)
    assert Path(gen).is_dir()
