"""`rlm-train filter` with `sub_calls.enabled`: sub-call samples beside the root turns, exactly
as the sub-policy saw them, clipped and errored calls dropped and counted, dedupe, caps, the
split by task, the one-line refusal, and one tiny adapter trained on both kinds."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from rlm_train.formats import append_jsonl
from rlm_train.rlm.loop import _clip
from rlm_train.rlm.recording import Recording
from rlm_train.rollouts import filter as flt
from rlm_train.rollouts.filter import FilterConfig
from rlm_train.rollouts.rl_prompts import sft_task_ids
from rlm_train.rollouts.subcall_samples import (ROOT_TURN, SUB_CALL, SubCallCounts, select_subcall_samples,
                                                subcall_samples)
from rlm_train.train.sft_data import read_sample_kinds

from test_filter import THREE_TURNS, make_traj


def call(prompt, response, *, kind="llm", error=None, limit=None, child=None):
    """A sub-call record as the loop writes it: texts clipped to `limit` (rlm.record_chars) by
    the loop's own clip, the prompt's full length kept."""
    record = {"kind": kind, "depth": 1, "prompt": _clip(prompt, limit) if limit else prompt, "prompt_chars": len(prompt),
              "response": _clip(response, limit) if limit and response is not None else response,
              "prompt_tokens": 5, "completion_tokens": 3, "latency_s": 0.0, "error": error}
    if child is not None:
        record["child"] = child
    return record


def with_calls(traj, calls_by_turn):
    for turn, calls in calls_by_turn.items():
        traj["turns"][turn]["sub_calls"] = calls
    return traj


def oolong_traj(task_id, sample=0, n_calls=3, **kw):
    prompts = [f"Label each question of {task_id} batch {k} (one per line):\nQ{k}a?\nQ{k}b?" for k in range(n_calls)]
    traj = make_traj(THREE_TURNS, task_id=task_id, sample=sample, family="oolong", sub_policy="oracle", **kw)
    return with_calls(traj, {1: [call(p, f"science\nhistory  # {k}") for k, p in enumerate(prompts)]})


def sub_samples(trajs, **cfg):
    config = FilterConfig(sub_calls={"enabled": True, **cfg.pop("sub_calls", {})}, **cfg)
    counts = SubCallCounts()
    samples = [s for t in trajs for s in subcall_samples(t, config, counts)]
    return select_subcall_samples(samples, config, counts), counts


def test_a_sub_call_sample_is_exactly_the_prompt_and_reply_the_sub_policy_saw():
    child = make_traj(THREE_TURNS, task_id="child")
    child["turns"][0]["sub_calls"] = [call("child's own llm_query", "its reply")]
    traj = oolong_traj("t1")
    traj["turns"][0]["sub_calls"] = [call("rlm_query prompt", "the child RLM's answer", kind="rlm", child=child)]
    samples, counts = sub_samples([traj])
    recorded = [c for t in traj["turns"] for c in t["sub_calls"] if c["kind"] == "llm"]
    # The child's llm_query sits under root turn 0, before turn 1's three.
    assert [s.messages for s in samples] == (
        [[{"role": "user", "content": "child's own llm_query"}, {"role": "assistant", "content": "its reply"}]]
        + [[{"role": "user", "content": c["prompt"]}, {"role": "assistant", "content": c["response"]}] for c in recorded])
    assert [s.turn for s in samples] == [0, 1, 1, 1]
    assert {(s.kind, s.task_id, s.family, s.policy, s.sub_policy, s.trajectory_id) for s in samples} == {
        (SUB_CALL, "t1", "oolong", "scripted", "oracle", "t1-0")}
    assert counts.recorded == 5 and counts.dropped == {"rlm_query_answer": 1}
    assert all(s.repairs == [] for s in samples)


def test_samples_from_a_real_episode_are_the_messages_the_sub_policy_received():
    """A real loop and REPL: what the sub-policy was sent and answered is what the samples hold;
    the prompt past rlm.record_chars is dropped as clipped."""
    import asyncio

    from rlm_train.models.base import CallablePolicy
    from rlm_train.rlm import RLMConfig, run_episode

    received: list[tuple[list[dict], str]] = []

    def sub_model(messages, call):
        reply = f"label for {len(messages[0]['content'])} chars: é\n1. science"
        received.append(([dict(m) for m in messages], reply))
        return reply

    prompts = ["Classify:\n1. What is DNA?", "Tabs\tand  spaces, ünïcode, trailing newline\n", "long " * 100]
    code = f"replies = llm_query_batched({prompts!r})\nprint(len(replies))"
    turns = [f"```repl\n{code}\n```", "```repl\nFINAL('done')\n```"]
    root = CallablePolicy(lambda messages, call: turns[sum(m["role"] == "assistant" for m in messages)], name="mock-root")
    episode = asyncio.run(run_episode("q", "context", root, CallablePolicy(sub_model, name="mock-sub"),
                                      RLMConfig(record_chars=200)))
    traj = {**episode, "schema": "rlm-train/trajectory/v1", "id": "e-0", "task_id": "e", "policy": "mock-root",
            "sub_policy": "mock-sub", "score": 1.0, "config": {}}
    samples, counts = sub_samples([traj])
    sent = {m[0]["content"]: (m, reply) for m, reply in received}
    assert len(sent) == 3 and counts.dropped == {"clipped": 1} and counts.longest_text == 500
    by_prompt = {s.messages[0]["content"]: s.messages for s in samples}  # calls of a batch may end in any order
    assert by_prompt == {p: sent[p][0] + [{"role": "assistant", "content": sent[p][1]}] for p in prompts[:2]}
    assert [m["role"] for m in received[0][0]] == ["user"]  # no system prompt: the sample has none either


def test_clipped_unrecorded_and_errored_sub_calls_are_dropped_and_counted():
    long_prompt, long_reply = "p" * 300, "r" * 300
    budget = Recording(budget_chars=10)  # the trajectory budget's own marker
    past_budget = call("short prompt", "short reply")
    past_budget["prompt"], past_budget["response"] = budget.text("short prompt"), budget.text("short reply")
    traj = with_calls(make_traj(THREE_TURNS, sub_policy="oracle"), {0: [
        call(long_prompt, "fine", limit=100),             # prompt clipped by rlm.record_chars
        call("fine prompt", long_reply, limit=100),       # reply clipped
        call("x" * 100, "y" * 100, limit=100),           # exactly at the limit: whole, kept
        call("errored", None, error="PolicyError: 500"),  # the sub-model failed
        call("refused " * 20, None, error="llm_query prompt has 160 characters; ..."),
        past_budget,
    ]})
    samples, counts = sub_samples([traj])
    assert [s.messages[0]["content"] for s in samples] == ["x" * 100]
    assert counts.dropped == {"clipped": 2, "error": 2, "past_trajectory_chars": 1}
    assert counts.longest_text == 300  # clipped texts counted at their full length


def test_over_long_sub_calls_follow_the_turn_length_rules():
    traj = with_calls(make_traj(THREE_TURNS), {0: [call("q", "a" * 50), call("q" * 80, "a"), call("ok", "ok")]})
    samples, counts = sub_samples([traj], max_turn_chars=40, max_sample_chars=60)
    assert [s.messages[0]["content"] for s in samples] == ["ok"]
    assert counts.dropped == {"turn_too_long": 1, "sample_too_long": 1}


def test_identical_prompts_are_kept_once_and_caps_are_deterministic_by_split_seed():
    trajs = [oolong_traj(f"t{i}", sample=k, n_calls=4) for i in range(5) for k in range(2)]
    samples, counts = sub_samples(trajs)
    # Both samples of a task sent the same four prompts: the second episode's are duplicates.
    assert len(samples) == 20 and counts.dropped == {"duplicate_prompt": 20}
    assert {s.sample for s in samples} == {0}

    capped, counts = sub_samples(trajs, sub_calls={"max_per_episode": 2, "max_samples": 7})
    assert len(capped) == 7 and counts.dropped == {"duplicate_prompt": 20, "over_max_per_episode": 10,
                                                   "over_max_samples": 3}
    assert max(Counter(s.trajectory_id for s in capped).values()) <= 2
    again, _ = sub_samples(list(reversed(trajs)), sub_calls={"max_per_episode": 2, "max_samples": 7})
    key = lambda s: s.messages[0]["content"]  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, capped))  # the same choice whatever the input order
    other_seed = [sub_samples(trajs, split_seed=seed, sub_calls={"max_samples": 7})[0] for seed in range(1, 4)]
    assert any(sorted(map(key, s)) != sorted(map(key, capped)) for s in other_seed)


def write_run(tmp_path, trajs, n_tasks):
    run = tmp_path / "run"
    run.mkdir()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"schema": "rlm-train/task/v1", "id": f"t{i}", "family": "oolong",
                                         "query": f"q{i}", "context": "c", "answer": ["42"],
                                         "scorer": "all_strings", "meta": {}}) + "\n" for i in range(n_tasks)))
    (run / "manifest.json").write_text(json.dumps({"schema": "rlm-train/generate-run/v1", "tasks_file": str(tasks),
                                                   "policy": "scripted", "sub_policy": "oracle"}))
    for traj in trajs:
        append_jsonl(run / "shard-20260101T000000-0of1-1.jsonl", traj)
    return run


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory, rlm_cli_module):
    """A filter run over ten tasks' episodes (3 root turns and 3 sub-calls each, plus a clipped one)."""
    tmp_path = tmp_path_factory.mktemp("subcalls")
    trajs = [oolong_traj(f"t{i}") for i in range(10)]
    trajs[0]["turns"][2]["sub_calls"] = [call("p" * 500, "r", limit=100)]
    run = write_run(tmp_path, trajs, 10)
    out = tmp_path / "data"
    result = subprocess.run(rlm_cli_module + ["filter", "--trajectories", str(run), "--out", str(out),
                                              "sub_calls.enabled=true"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {"out": out, "stdout": result.stdout, "tmp": tmp_path, "run": run}


@pytest.fixture(scope="module")
def rlm_cli_module():
    import sys

    return [sys.executable, "-m", "rlm_train.cli"]


def test_filter_stage_writes_both_kinds_into_one_dataset_split_by_task(mixed_dataset):
    from datasets import load_from_disk

    out = mixed_dataset["out"]
    report = json.loads((out / "filter_report.json").read_text())
    assert report["turns"]["samples"] == 30
    assert report["sub_calls"] == {"enabled": True, "samples": 30, "recorded": 31, "dropped": {"clipped": 1},
                                   "sub_policies": {"oracle": 30}, "sft": {"train": 27, "validation": 3}}
    assert report["sft"] == {"train": {"samples": 54, "tasks": 9}, "validation": {"samples": 6, "tasks": 1}}
    sft = load_from_disk(str(out / "sft"))
    for split in ("train", "validation"):
        rows = sft[split].to_list()
        # Every task sits in one split with both its kinds: no task's sub-calls leak across.
        for task in {r["task_id"] for r in rows}:
            assert {r["kind"] for r in rows if r["task_id"] == task} == {ROOT_TURN, SUB_CALL}
    assert not {r["task_id"] for r in sft["train"]} & {r["task_id"] for r in sft["validation"]}
    sub = [r for r in sft["train"] if r["kind"] == SUB_CALL][0]
    assert [m["role"] for m in sub["messages"]] == ["user", "assistant"] and sub["sub_policy"] == "oracle"
    # The RL prompt set leaves out every SFT task (the sub-calls' tasks are SFT tasks too).
    assert report["rl"]["dropped"] == {"used_by_sft": 10}
    assert sft_task_ids([str(out / "sft")]) == sft_task_ids([str(out / "sft-train.jsonl"),
                                                            str(out / "sft-validation.jsonl")]) == {f"t{i}" for i in range(10)}
    # SFT reads the kinds row for row, from the directory or the JSONL.
    assert read_sample_kinds(out / "sft") == read_sample_kinds(out / "sft-train.jsonl") == sft["train"]["kind"]

    stdout = mixed_dataset["stdout"]
    assert "SFT samples (one per turn)               30" in stdout
    assert "sub-call: clipped                         1" in stdout
    assert "SFT samples (one per sub-call)           30  (of 31 recorded; replies by sub_policy oracle)" in stdout
    assert "SFT train 54 samples (27 root turns, 27 sub-calls) / 9 tasks" in stdout
    card = (out / "README.md").read_text()
    assert "SFT rows by kind: train: 27 root turns, 27 sub-calls" in card
    assert "30 by `oracle`: the oracle (gold-label lookup): gold labels from the task's reference data, standing in " \
           "for a teacher sub-model" in card


def test_sub_calls_off_leaves_the_root_turn_dataset_as_it_was(mixed_dataset):
    report = flt.run_filter(FilterConfig(trajectories=[str(mixed_dataset["run"])],
                                         out=str(mixed_dataset["tmp"] / "roots-only")))
    assert report["sub_calls"]["samples"] == 0 and report["sub_calls"]["recorded"] == 0
    assert report["sft"]["train"] == {"samples": 27, "tasks": 9} and report["sub_calls"]["sft"]["train"] == 0
    assert "Sub-call samples" not in (mixed_dataset["tmp"] / "roots-only" / "README.md").read_text()


@pytest.mark.parametrize("case, expected", [
    ("clipped", "(3 seen, 3 clipped, 0 errored); the recorder clipped them: re-run `rlm-train generate` with "
                "rlm.record_chars=500 or more"),
    ("errored", "(3 seen, 0 clipped, 3 errored)"),
    ("none", "(0 seen, 0 clipped, 0 errored); the episodes made no sub-calls"),
])
def test_no_usable_sub_call_is_one_line_exit_2_and_nothing_written(tmp_path, rlm_cli, case, expected):
    trajs = []
    for i in range(3):
        traj = make_traj(THREE_TURNS, task_id=f"t{i}")
        if case == "clipped":
            with_calls(traj, {1: [call("p" * 500, "r" * 40, limit=100)]})
        elif case == "errored":
            with_calls(traj, {1: [call("prompt", None, error="sub-model unreachable")]})
        trajs.append(traj)
    run = write_run(tmp_path, trajs, 3)
    out = tmp_path / "data"
    result = subprocess.run(rlm_cli + ["filter", "--trajectories", str(run), "--out", str(out),
                                       "sub_calls.enabled=true"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and str(run) in line and expected in line, line
    assert "kept episodes recorded no usable llm_query sub-call" in line
    assert not out.exists()


def test_dry_run_counts_the_sub_call_samples(mixed_dataset, rlm_cli):
    result = subprocess.run(rlm_cli + ["filter", "--trajectories", str(mixed_dataset["run"]), "--out",
                                       str(mixed_dataset["tmp"] / "dry"), "sub_calls.enabled=true", "--dry-run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "60 SFT samples (30 of them sub-calls)" in result.stdout
    assert not (mixed_dataset["tmp"] / "dry").exists()


# ---------------------------------------------------------------------------------------
# One adapter on both kinds


def test_sub_call_samples_train_only_the_reply_under_gemma_and_qwen_templates(tmp_path):
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.testing.tiny_models import build_tiny_gemma3, build_tiny_qwen3
    from rlm_train.train.sft_data import check_sample, tokenize_sample

    messages = [{"role": "user", "content": "Label each question:\nWhat is DNA?\nWho was Caesar?"},
                {"role": "assistant", "content": "science\nhistory"}]
    check_sample(messages, "sub-call sample")
    for build, end in ((build_tiny_gemma3, "<end_of_turn>\n"), (build_tiny_qwen3, "<|im_end|>\n")):
        tokenizer = load_tokenizer(build(tmp_path / build.__name__))
        ids, labels = tokenize_sample(tokenizer, messages)
        trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        prompt = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == -100])
        assert trained.replace("<think>\n\n</think>\n\n", "") == "science\nhistory" + end, trained
        assert "What is DNA?" in prompt and "system" not in prompt and "science" not in prompt


@pytest.mark.slow
def test_one_adapter_trains_on_root_turns_and_sub_calls_together(mixed_dataset):
    from rlm_train.config import load_config
    from rlm_train.testing.tiny_models import build_tiny_qwen3
    from rlm_train.train.sft import SFTConfig, run_sft

    root = mixed_dataset["tmp"]
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu-sft.yaml"
    cfg = load_config(SFTConfig, recipe, [f"model={build_tiny_qwen3(root / 'model')}",
                                          f"dataset={mixed_dataset['out'] / 'sft'}", f"output_dir={root / 'sft'}",
                                          "training.max_steps=3", "save_merged=false"])
    summary = run_sft(cfg, source=str(recipe), quiet=True)
    assert summary["global_step"] == 3 and len(summary["losses"]) == 3
    assert summary["samples_by_kind"] == {ROOT_TURN: 27, SUB_CALL: 27}
    assert (root / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((root / "sft" / "summary.json").read_text())["samples_by_kind"] == summary["samples_by_kind"]
