"""`rlm-train eval`: methods over held-out tasks through the generation loop, one report."""

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rlm_train import cli
from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
from rlm_train.eval.config import EvalConfig
from rlm_train.eval.report import build_report, render_markdown
from rlm_train.eval.run import run_eval
from rlm_train.eval.stats import bootstrap_mean, paired_bootstrap
from rlm_train.models.base import CallablePolicy
from rlm_train.rollouts import store
from rlm_train.testing.mock_server import MockOpenAIServer

FAMILIES = ("niah", "oolong", "pairs", "multihop", "codeqa")


def wrong_policy():
    return CallablePolicy(lambda messages, call: "```repl\nFINAL('zzz wrong')\n```", name="wrong")


def run_pairs(run_dir: Path) -> Counter:
    return Counter((json.loads(line)["task_id"], json.loads(line)["sample"])
                   for path in store.shard_files(run_dir) for line in path.read_text().splitlines())


def md_rows(md: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under `## heading`, as cells."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def parse_ci(cell: str) -> tuple[float, float, float]:
    """A score cell's mean and interval ("0.750 [0.428, 0.945] (exact, n=12)", or a paired "+0.5 [-0.1, +1.0]")."""
    mean, lo, hi = re.fullmatch(r"([-+\d.]+) \[([-+\d.]+), ([-+\d.]+)\](?: \((?:exact|bootstrap), n=\d+\))?",
                                cell).groups()
    return float(mean), float(lo), float(hi)


def cell_kind(cell: str) -> tuple[str, int]:
    """Which interval a score cell says it uses, and its n."""
    kind, n = re.search(r"\((exact|bootstrap), n=(\d+)\)$", cell).groups()
    return kind, int(n)


def assert_markdown_matches_json(md: str, report: dict) -> None:
    families, lengths = report["families"], report["context_tokens"]
    rows = md_rows(md, "Scores by family")
    assert [r[0].split(" (")[0] for r in rows] == list(report["methods"])
    for row in rows:
        m = report["methods"][row[0].split(" (")[0]]
        assert row[0] == (f"{row[0].split(' (')[0]} ({m['label']})" if m["label"] else row[0])
        cis = [m["score"]["by_family"][f] for f in families] + [m["score"]["all"]]
        for cell, ci in zip(row[1:], cis):
            assert parse_ci(cell) == (ci["mean"], ci["lo"], ci["hi"])
            assert cell_kind(cell) == (ci["interval"], ci["n"])
        assert int(row[1 + len(cis)]) == m["errors"]
        costs = [m["cost"][k] for k in ("root_tokens", "sub_call_tokens", "sub_calls", "wall_s")]
        assert [float(c) for c in row[2 + len(cis):]] == costs
    for row in md_rows(md, "Scores by context length"):
        m = report["methods"][row[0].split(" (")[0]]
        for cell, key in zip(row[1:], lengths):
            ci = m["score"]["by_context_tokens"][key]
            assert parse_ci(cell) == (ci["mean"], ci["lo"], ci["hi"])
    paired = md_rows(md, "Paired comparisons")
    assert len(paired) == len(report["paired"])
    for row, p in zip(paired, report["paired"]):
        assert row[0] == f"{p['b']} - {p['a']}" and int(row[1]) == p["all"]["n"]
        assert parse_ci(f"{row[2]} {row[3]}") == (p["all"]["mean"], p["all"]["lo"], p["all"]["hi"])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Held-out tasks of every family at two small lengths, and a training file that
    holds one of them (an overlap to warn about)."""
    from rlm_train.tasks import make_tasks
    from rlm_train.tasks.generate import write_tasks

    root = tmp_path_factory.mktemp("suite")
    heldout = [t for f in FAMILIES for n in (2000, 3000) for t in make_tasks(f, 1, n, seed=5, split="heldout")]
    write_tasks(root / "heldout.jsonl", heldout)
    write_tasks(root / "train.jsonl", make_tasks("niah", 2, 2000, seed=5, split="train") + heldout[:1])
    return root


def test_teacher_scores_high_on_every_family_always_wrong_scores_zero_and_report_md_matches_json(
        suite, tmp_path, capsys):
    config = EvalConfig(tasks=[str(suite / "heldout.jsonl")], train_tasks=[str(suite / "train.jsonl")],
                        out=str(tmp_path / "eval"), concurrency=4, progress=False, rlm={"max_iterations": 6},
                        methods=[{"name": "teacher", "policy": "scripted", "sub_policy": "oracle"},
                                 {"name": "wrong", "policy": "wrong"}])
    report = run_eval(config, policies={"wrong": (wrong_policy(), None)})
    err = capsys.readouterr().err
    # The training file holds one held-out task: warned with the counts of what is shared.
    assert "warning: 1 eval task(s) overlap the training set" in err and "1 wording" in err and "1 id" in err
    assert report["overlap"]["tasks"] == 1 and report["overlap"]["shared"]["niah_key"] >= 1
    teacher, wrong = report["methods"]["teacher"], report["methods"]["wrong"]
    assert report["families"] == list(FAMILIES) and report["context_tokens"] == ["2000", "3000"]
    for family in FAMILIES:
        assert teacher["score"]["by_family"][family]["mean"] >= 0.9, (family, teacher["score"]["by_family"])
        # 0 of 2: the exact binomial interval, not a zero-width bootstrap one.
        assert wrong["score"]["by_family"][family] == {"mean": 0.0, "lo": 0.0, "hi": 0.842, "n": 2, "interval": "exact"}
    assert teacher["episodes"] == wrong["episodes"] == 10 and teacher["cost"]["sub_calls"] > 0
    assert wrong["cost"]["sub_calls"] == 0 and wrong["cost"]["sub_call_tokens"] == 0
    (diff,) = report["paired"]
    assert (diff["a"], diff["b"], diff["all"]["n"]) == ("teacher", "wrong", 10) and diff["all"]["mean"] <= -0.9
    out = tmp_path / "eval"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"] == report["methods"] and on_disk["paired"] == report["paired"]
    assert on_disk["config"]["methods"][0]["name"] == "teacher" and on_disk["versions"]["python"]
    assert_markdown_matches_json((out / "report.md").read_text(), on_disk)
    assert all((out / p).stat().st_size > 1000 for p in on_disk["plots"]) and len(on_disk["plots"]) == 2
    # A re-run finds every (method, task, sample) done: it runs nothing and adds no line.
    again = run_eval(config, policies={"wrong": (wrong_policy(), None)})
    assert again["methods"] == report["methods"]
    for name in ("teacher", "wrong"):
        assert max(run_pairs(out / "runs" / name).values()) == 1 and sum(run_pairs(out / "runs" / name).values()) == 10


def test_direct_method_reads_the_cut_context_in_its_prompt(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)  # "The answer is: keyI." in the middle of ~1600 characters

    def reader(messages, call):
        assert messages[0]["role"] == "system" and "Question: What is the answer?" in messages[-1]["content"]
        found = re.search(r"answer is: (\w+)", messages[-1]["content"])
        return found.group(1) if found else "no idea"

    config = EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), progress=False, methods=[
        {"name": "whole", "policy": "reader", "direct": True, "max_context_chars": 2000},
        {"name": "cut", "policy": "reader", "direct": True, "max_context_chars": 400}])
    report = run_eval(config, policies={"whole": (CallablePolicy(reader, "reader"), None),
                                        "cut": (CallablePolicy(reader, "reader"), None)})
    assert report["methods"]["whole"]["score"]["all"]["mean"] == 1.0
    assert report["methods"]["cut"]["score"]["all"]["mean"] == 0.0  # the needle was past the cut
    records = store.read_records(tmp_path / "eval" / "runs" / "whole")
    assert all(r["stats"]["turns"] == 1 and r["policy"] == "direct[2000]:reader" for r in records)
    # The root tokens are the wrapped model's, context included.
    assert report["methods"]["whole"]["cost"]["root_tokens"] > 400 > report["methods"]["cut"]["cost"]["root_tokens"] - 100


def _reimplemented_ci(values, resamples, confidence, seed, label):
    rng = random.Random(f"{seed}:{label}")
    n = len(values)
    means = sorted(sum(values[int(rng.random() * n)] for _ in range(n)) / n for _ in range(resamples))
    k = int(resamples * (1 - confidence) / 2)
    return means[k], means[resamples - 1 - k]


def test_bootstrap_intervals_and_paired_differences_match_hand_and_reimplemented_values():
    # By hand: constant scores have a zero-width interval; two tasks scoring 0 and 1 give
    # resample means 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the 2.5% and 97.5% points are 0 and 1.
    assert bootstrap_mean([0.5] * 4, resamples=2000, confidence=0.95, seed=0, label="c") == \
        {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 4}
    assert bootstrap_mean([0.0, 1.0], resamples=2000, confidence=0.95, seed=0, label="x") == \
        {"mean": 0.5, "lo": 0.0, "hi": 1.0, "n": 2}
    assert bootstrap_mean([], resamples=2000, confidence=0.95, seed=0, label="e")["mean"] is None
    values = [0.0, 1.0, 1.0, 0.5, 0.25, 1.0, 0.0]
    ci = bootstrap_mean(values, resamples=500, confidence=0.9, seed=7, label="m/all")
    assert (ci["lo"], ci["hi"]) == pytest.approx(_reimplemented_ci(values, 500, 0.9, 7, "m/all"), abs=1e-12)
    assert ci["mean"] == pytest.approx(sum(values) / len(values))
    # Paired: B - A per task, in sorted task order; tasks only one method scored are left out.
    a = {"t1": 0.0, "t2": 0.0, "t3": 1.0, "t4": 1.0, "t5": 0.5}
    b = {"t1": 1.0, "t2": 1.0, "t3": 1.0, "t4": 0.0, "t6": 1.0}
    diff = paired_bootstrap(a, b, resamples=1000, confidence=0.95, seed=3, label="p")
    assert diff["mean"] == pytest.approx(0.25) and diff["n"] == 4
    assert (diff["wins"], diff["losses"], diff["ties"]) == (2, 1, 1)
    assert (diff["lo"], diff["hi"]) == pytest.approx(_reimplemented_ci([1.0, 1.0, 0.0, -1.0], 1000, 0.95, 3, "p"))


def test_report_numbers_from_hand_made_rows():
    tasks = [{"id": "a", "family": "niah", "context_tokens": 8000}, {"id": "b", "family": "niah", "context_tokens": 32000},
             {"id": "c", "family": "oolong", "context_tokens": 8000}]

    def row(task, sample, score, root=100, sub=0, calls=0, wall=1.0):
        return {"task_id": task, "sample": sample, "score": score, "outcome": "final" if score is not None else "error",
                "root_tokens": root, "sub_call_tokens": sub, "sub_calls": calls, "wall_s": wall}

    rows = {
        # a: (1 + 0) / 2; b: 1; c: (0 + 0) / 2 (its error scores 0); a stray task and a third sample are ignored.
        "base": [row("a", 0, 1.0), row("a", 1, 0.0), row("b", 0, 1.0), row("b", 1, 1.0), row("c", 0, 0.0),
                 row("c", 1, None, root=0), row("zz", 0, 1.0), row("a", 2, 1.0)],
        "tuned": [row(t, k, 1.0, root=50, sub=300, calls=3, wall=2.0) for t in "abc" for k in range(2)],
    }
    report = build_report(tasks, rows, methods=["base", "tuned"], pairs=[("base", "tuned")],
                          bootstrap={"resamples": 200, "confidence": 0.95, "seed": 0}, samples=2)
    base, tuned = report["methods"]["base"], report["methods"]["tuned"]
    assert base["score"]["all"]["mean"] == 0.5 and base["score"]["all"]["n"] == 3
    assert base["score"]["by_family"]["niah"]["mean"] == 0.75 and base["score"]["by_family"]["oolong"]["mean"] == 0.0
    assert base["score"]["by_context_tokens"]["8000"]["mean"] == 0.25
    assert base["score"]["by_context_tokens"]["32000"] == {"mean": 1.0, "lo": 0.025, "hi": 1.0, "n": 1,
                                                          "interval": "exact"}
    assert base["score"]["by_family"]["niah"]["interval"] == "bootstrap"  # task a's mean of 1 and 0 is 0.5
    assert base["episodes"] == 6 and base["scored"] == 5 and base["outcomes"] == {"error": 1, "final": 5}
    assert base["errors"] == 1 and base["errors_by_family"] == {"niah": 0, "oolong": 1}
    assert base["cost"] == {"root_tokens": 83.3, "sub_call_tokens": 0.0, "sub_calls": 0.0, "wall_s": 1.0}
    assert tuned["cost"] == {"root_tokens": 50.0, "sub_call_tokens": 300.0, "sub_calls": 3.0, "wall_s": 2.0}
    (p,) = report["paired"]
    assert p["all"]["mean"] == 0.5 and (p["all"]["wins"], p["all"]["losses"], p["all"]["ties"]) == (2, 0, 1)
    assert (p["all"]["lo"], p["all"]["hi"]) == pytest.approx(
        _reimplemented_ci([0.5, 0.0, 1.0], 200, 0.95, 0, "paired/base/tuned/all"), abs=5e-4)
    assert_markdown_matches_json(render_markdown(report), report)


@pytest.mark.slow
def test_killing_eval_mid_run_then_rerunning_gives_every_method_task_sample_once(tmp_path, rlm_cli):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 12)
    out = tmp_path / "eval"
    with MockOpenAIServer(responder=scenario_responder, latency_s=0.05) as server:
        recipe = tmp_path / "eval.yaml"
        recipe.write_text(yaml.safe_dump({
            "tasks": [str(tasks)], "out": str(out), "samples": 2, "concurrency": 3, "progress": False,
            "methods": [{"name": "served", "policy": "openai:mock-model", "base_urls": [server.base_url]},
                        {"name": "teacher", "policy": "scripted"}]}))
        argv = rlm_cli + ["eval", "--recipe", str(recipe)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        served = out / "runs" / "served"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(run_pairs(served).values() if served.exists() else ()) < 6:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its REPL fork-server, mid-run
        proc.wait()
        first = sum(run_pairs(served).values())
        assert 6 <= first < 24, "the kill should land mid-run"
        assert not (out / "report.json").exists()
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{24 - first} of 24 episodes to run" in rerun.stderr
    expected = Counter({(f"bench-{i}", k): 1 for i in range(12) for k in range(2)})
    for name in ("served", "teacher"):
        assert run_pairs(out / "runs" / name) == expected, name
    report = json.loads((out / "report.json").read_text())
    assert {n: m["episodes"] for n, m in report["methods"].items()} == {"served": 24, "teacher": 24}
    assert report["methods"]["served"]["score"]["all"]["mean"] == 1.0
    assert "| served |" in rerun.stdout and "wrote " in rerun.stdout


def test_cli_bad_inputs_fail_before_anything_starts(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)
    out = tmp_path / "eval"
    base = ["eval", "--tasks", str(tasks), "--out", str(out)]
    # A model path that does not exist: refused before any method runs (the scripted one first here).
    assert cli.main(base + ["--method", "teacher=scripted", "--method", "tuned=hf:/no/such/model"]) == 2
    assert "method 'tuned': model /no/such/model: not found on this machine" in capsys.readouterr().err
    assert not out.exists()
    # ... while a dry run lists it and goes on.
    assert cli.main(base + ["--method", "tuned=hf:/no/such/model+adapter:/no/adapter", "--dry-run"]) == 0
    captured = capsys.readouterr()
    plan = yaml.safe_load(captured.out.split("\n", 1)[1])
    assert "adapter path /no/adapter does not exist (a real run stops here)" in plan["notes"]
    assert plan["config"]["methods"][0]["policy"] == "hf:/no/such/model+adapter:/no/adapter" and not out.exists()
    assert cli.main(base + ["--method", "served=openai:m"]) == 2
    assert "needs a server" in capsys.readouterr().err
    assert cli.main(base + ["--method", "x=scripted", "--method", "x=oracle"]) == 2
    assert "x appears twice" in capsys.readouterr().err


@pytest.mark.slow
def test_an_hf_model_runs_direct_and_as_an_rlm_through_the_policy_factory(tmp_path):
    pytest.importorskip("transformers")
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    model = build_tiny_qwen3(tmp_path / "model")
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)
    config = EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), progress=False,
                        rlm={"max_iterations": 1, "root_max_tokens": 8},
                        methods=[{"name": "direct", "policy": f"hf:{model}", "direct": True, "max_context_chars": 300},
                                 {"name": "rlm", "policy": f"hf:{model}"}])
    report = run_eval(config)  # each method loads the model from its spec, runs, and frees it
    direct, rlm = report["methods"]["direct"], report["methods"]["rlm"]
    assert direct["episodes"] == rlm["episodes"] == 2 and direct["outcomes"] == {"final": 2}
    # Real token counts from the model's tokenizer: the direct prompt holds the cut context,
    # the RLM's root prompt the system prompt (twice: the turn, then the answer-now turn).
    assert 0 < direct["cost"]["root_tokens"] < rlm["cost"]["root_tokens"]
    assert direct["policy"] == rlm["policy"] == f"hf:{model}"
