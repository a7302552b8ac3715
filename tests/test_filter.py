"""`rlm-train filter`: each rule on hand-made trajectories, then the whole stage on disk."""

import json
import re
from collections import Counter

import pytest

from rlm_train.formats import append_jsonl
from rlm_train.records import TRAJECTORY_SCHEMA, Outcome
from rlm_train.rollouts import filter as flt
from rlm_train.rollouts.filter import FilterConfig


def block(code):
    return f"```repl\n{code}\n```"


def make_traj(texts, task_id="t1", sample=0, score=1.0, outcome=Outcome.FINAL, finals=None, final_from_code=True, **extra):
    """A trajectory shaped like the loop's: system, user, then per turn the assistant text
    and (except after the last) the REPL feedback. The last turn answers."""
    messages = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": f"Query about {task_id}"}]
    turns = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        final = (finals or {}).get(i, "42" if last and outcome == Outcome.FINAL else None)
        codes = [c.split("\n", 1)[1].rsplit("\n```", 1)[0] for c in text.split("```repl")[1:]] if "```repl" in text else []
        executions = [{"code": c, "stdout": f"out{i}\n", "stderr": "", "error": None, "final": None} for c in codes]
        if final is not None and final_from_code and executions:
            # The loop stops running blocks after the one that called FINAL.
            answering = next(j for j, c in enumerate(codes) if "FINAL" in c)
            executions = executions[: answering + 1]
            executions[-1]["final"] = final
        messages.append({"role": "assistant", "content": text})
        turns.append({"index": i, "assistant": text, "forced": False, "code_blocks": codes,
                      "executions": executions, "sub_calls": [], "final": final, "parse_error": None})
        if not last:
            messages.append({"role": "user", "content": f"REPL output:\nout{i}"})
    traj = {"schema": TRAJECTORY_SCHEMA, "id": f"{task_id}-{sample}", "task_id": task_id, "sample": sample,
            "family": "niah", "policy": "scripted", "messages": messages, "turns": turns,
            "final": "42" if outcome == Outcome.FINAL else None, "outcome": outcome, "error": None, "score": score,
            "stats": {"turns": len(turns), "sub_calls": 0, "wall_s": 0.1}}
    traj.update(extra)
    return traj


THREE_TURNS = [block("print(len(context))"), block("hits = [l for l in context.splitlines() if 'key' in l]\nprint(hits)"),
               block("FINAL(hits[0])")]


def samples_of(traj, **cfg):
    dropped = Counter()
    return flt.turn_samples(traj, FilterConfig(**cfg), dropped), dropped


def test_sample_i_trains_exactly_turn_i_with_the_history_before_it_as_input():
    traj = make_traj(THREE_TURNS)
    samples, dropped = samples_of(traj)
    assert len(samples) == 3 and not dropped
    for i, s in enumerate(samples):
        assert s.turn == i
        assert s.messages[-1] == {"role": "assistant", "content": traj["turns"][i]["assistant"]}
        position = [j for j, m in enumerate(traj["messages"]) if m["role"] == "assistant"][i]
        assert s.messages[:-1] == traj["messages"][:position]
        # The only assistant message a sample trains on is its last; earlier ones are history.
        assert [m["content"] for m in s.messages if m["role"] == "assistant"] == THREE_TURNS[: i + 1]
    assert samples[0].messages[:-1] == traj["messages"][:2]
    assert samples[2].messages[-2] == {"role": "user", "content": "REPL output:\nout1"}


@pytest.mark.parametrize("traj, reason", [
    (make_traj(THREE_TURNS, outcome=Outcome.ERROR), "outcome_error"),
    (make_traj(THREE_TURNS, outcome=Outcome.MAX_ITERATIONS), "outcome_max_iterations"),
    (make_traj(THREE_TURNS, outcome=Outcome.BUDGET), "outcome_budget_exhausted"),
    (make_traj(THREE_TURNS, score=0.0), "zero_score"),
    (make_traj(THREE_TURNS, score=None), "unscored"),
    (make_traj([block("FINAL(42)")]), "single_turn"),
    (make_traj(THREE_TURNS, messages=[{"role": "system", "content": "x"}]), "malformed"),
    (make_traj(THREE_TURNS, score=0.5), None),
])
def test_episode_rules(traj, reason):
    assert flt.trajectory_drop_reason(traj, FilterConfig()) == reason


def test_episode_rules_are_configurable():
    assert flt.trajectory_drop_reason(make_traj(THREE_TURNS, score=0.5), FilterConfig(min_score=0.5)) == "low_score"
    assert flt.trajectory_drop_reason(make_traj(THREE_TURNS, score=None), FilterConfig(drop_unscored=False)) is None
    cfg = FilterConfig(keep_outcomes=[Outcome.FINAL, Outcome.MAX_ITERATIONS])
    assert flt.trajectory_drop_reason(make_traj(THREE_TURNS, outcome=Outcome.MAX_ITERATIONS), cfg) is None


def last_sample(texts, **kw):
    samples, _ = samples_of(make_traj(texts, **kw))
    return samples[-1]


def test_repair_final_written_in_prose_becomes_a_repl_block():
    s = last_sample([block("x = 6 * 7\nprint(x)"), "The answer is clear.\nFINAL(42)\nThanks!"], final_from_code=False)
    assert s.messages[-1]["content"] == "The answer is clear.\n\n" + block("FINAL('42')")
    assert s.repairs == ["final_outside_code"]


def test_repair_final_var_written_in_prose_becomes_a_repl_block():
    s = last_sample([block("answer = 6 * 7"), "FINAL_VAR(answer)"], final_from_code=False)
    assert s.messages[-1]["content"] == block("FINAL_VAR('answer')")
    assert s.repairs == ["final_var_outside_code"]


def test_repair_final_var_given_a_value_is_given_the_name():
    s = last_sample([block("answer = 6 * 7"), "Done.\n" + block("FINAL_VAR(answer)")])
    assert s.messages[-1]["content"] == "Done.\n" + block('FINAL_VAR("answer")')
    assert s.repairs == ["final_var_unquoted"]


def test_repair_cuts_what_follows_the_answering_block():
    text = block("FINAL(x)") + "\nLet me also check:\n" + block("print(x)")
    s = last_sample([block("x = 42"), text])
    assert s.messages[-1]["content"] == block("FINAL(x)")
    assert s.repairs == ["text_after_final"]


def test_canonical_final_turns_are_not_touched_and_repair_can_be_switched_off():
    s = last_sample(THREE_TURNS)
    assert s.repairs == [] and s.messages[-1]["content"] == THREE_TURNS[-1]
    raw = "FINAL_VAR(answer)"
    samples, _ = samples_of(make_traj([block("answer = 1"), raw], final_from_code=False), repair_final=False)
    assert samples[-1].messages[-1]["content"] == raw and samples[-1].repairs == []


def test_long_turns_long_samples_and_code_free_turns_are_dropped_one_by_one():
    long_turn = block("print('" + "x" * 300 + "')")
    samples, dropped = samples_of(make_traj([block("a = 1"), long_turn, block("FINAL(a)")]), max_turn_chars=200)
    assert [s.turn for s in samples] == [0, 2] and dropped == {"turn_too_long": 1}
    # The third sample's history holds the long turn: over a whole-sample limit, it goes.
    samples, dropped = samples_of(make_traj([block("a = 1"), long_turn, block("FINAL(a)")]), max_sample_chars=400)
    assert [s.turn for s in samples] == [0, 1] and dropped == {"sample_too_long": 1}
    samples, dropped = samples_of(make_traj([block("a = 1"), "Hmm, let me think.", block("FINAL(a)")]))
    assert [s.turn for s in samples] == [0, 2] and dropped == {"no_code": 1}


def test_forced_answer_turns_and_error_turns():
    traj = make_traj(THREE_TURNS)
    traj["turns"][2]["forced"] = True
    samples, dropped = samples_of(traj)
    assert [s.turn for s in samples] == [0, 1] and dropped == {"forced_turn": 1}
    samples, dropped = samples_of(traj, keep_forced_turns=True)  # a model evaluated under a turn budget
    assert [s.turn for s in samples] == [0, 1, 2] and not dropped
    traj = make_traj(THREE_TURNS)
    traj["turns"][1]["executions"][0]["error"] = "NameError: name 'hits' is not defined"
    assert len(samples_of(traj)[0]) == 3
    samples, dropped = samples_of(traj, drop_error_turns=True)
    assert [s.turn for s in samples] == [0, 2] and dropped == {"code_error": 1}


def test_dedupe_drops_exact_repeats_only():
    a, _ = samples_of(make_traj(THREE_TURNS, sample=0))
    b, _ = samples_of(make_traj(THREE_TURNS[:1] + [block("print(2)"), THREE_TURNS[2]], sample=1))
    dropped = Counter()
    kept = flt.dedupe(a + b, dropped)
    # Sample 1 repeats sample 0's first turn exactly; its other turns differ (different history).
    assert len(kept) == 5 and dropped == {"duplicate": 1}
    assert [(s.sample, s.turn) for s in kept] == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]


def test_split_is_by_task_stable_and_never_empty():
    ids = [f"task-{i}" for i in range(40)]
    val = flt.split_tasks(ids, 0.1, seed=0)
    assert len(val) == 4 and val <= set(ids)
    assert flt.split_tasks(list(reversed(ids)), 0.1, seed=0) == val
    assert flt.split_tasks(ids, 0.1, seed=1) != val
    assert len(flt.split_tasks(ids[:3], 0.1, seed=0)) == 1
    assert flt.split_tasks(ids[:1], 0.5, seed=0) == set() and flt.split_tasks(ids, 0.0, seed=0) == set()


@pytest.mark.slow
def test_filter_stage_writes_datasets_jsonl_rl_set_and_report(tmp_path, rlm_cli):
    import subprocess

    from datasets import load_from_disk

    run = tmp_path / "run"
    run.mkdir()
    tasks = tmp_path / "tasks.jsonl"
    with tasks.open("w") as fh:
        for i in range(10):
            fh.write(json.dumps({"schema": "rlm-train/task/v1", "id": f"t{i}", "family": "niah", "query": f"q{i}",
                                 "context": "c", "answer": ["42"], "scorer": "all_strings", "meta": {}}) + "\n")
    (run / "manifest.json").write_text(json.dumps({"schema": "rlm-train/generate-run/v1", "tasks_file": str(tasks)}))
    shard = run / "shard-20260101T000000-0of1-1.jsonl"
    for i in range(10):
        append_jsonl(shard, make_traj(THREE_TURNS, task_id=f"t{i}", sample=0))
        append_jsonl(shard, make_traj(THREE_TURNS, task_id=f"t{i}", sample=1, score=0.0))
    append_jsonl(shard, make_traj([block("FINAL(42)")], task_id="t0", sample=2))
    append_jsonl(shard, make_traj(THREE_TURNS, task_id="t0", sample=0))  # a duplicate record
    with shard.open("a") as fh:
        fh.write('{"schema": "rlm-train/trajectory/v1", "task_id": "t9", "sam')  # torn by a crash
    out = tmp_path / "data"
    result = subprocess.run(rlm_cli + ["filter", "--trajectories", str(run), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "episode: zero_score" in result.stdout and "samples repaired" in result.stdout

    report = json.loads((out / "filter_report.json").read_text())
    assert report["inputs"] == {**report["inputs"], "trajectories": 21, "torn_lines": 1, "duplicate_records": 1}
    assert report["episodes"] == {"kept": 10, "dropped": {"single_turn": 1, "zero_score": 10}}
    # Every task's episode is the same conversation except the user query: nothing else repeats.
    assert report["turns"]["samples"] == 30 and report["turns"]["dropped"] == {}
    assert report["sft"] == {"train": {"samples": 27, "tasks": 9}, "validation": {"samples": 3, "tasks": 1}}

    sft = load_from_disk(str(out / "sft"))
    assert sft["train"].num_rows == 27 and sft["validation"].num_rows == 3
    row = sft["train"][0]
    assert row["messages"][-1]["role"] == "assistant" and row["turn"] in (0, 1, 2) and row["score"] == 1.0
    jsonl = [json.loads(line) for line in (out / "sft-train.jsonl").read_text().splitlines()]
    assert jsonl == sft["train"].to_list()
    val_tasks = {r["task_id"] for r in sft["validation"]}
    assert not val_tasks & {r["task_id"] for r in sft["train"]}

    # Every task has SFT samples, so none is an RL prompt: GRPO on SFT's own tasks learns little.
    rl = load_from_disk(str(out / "rl"))
    assert rl["train"].num_rows == 0 and "task_file" in rl["train"].column_names
    assert report["rl"]["dropped"] == {"used_by_sft": 10} and report["rl"]["sft_data"] == [str((out / "sft").resolve())]

    # The RL tasks, sampled by the SFT model: rl_only writes the RL set alone, with each task's pass rate
    # from these episodes, leaving out SFT's tasks (t0 again here) and tasks outside the window.
    scores = {"t0": [1.0, 0.0], "r1": [1.0, 0.0, 0.0, 0.0], "r2": [1.0] * 4, "r3": [0.0] * 4, "r4": [1.0, 1.0, 0.0, 1.0]}
    rl_tasks = tmp_path / "rl-tasks.jsonl"
    rl_tasks.write_text("".join(json.dumps({"schema": "rlm-train/task/v1", "id": t, "family": "niah", "query": f"q{t[1:]}",
                                            "context": "c", "answer": ["42"], "scorer": "all_strings", "meta": {}}) + "\n"
                                for t in scores))
    rl_run = tmp_path / "rl-run"
    rl_run.mkdir()
    (rl_run / "manifest.json").write_text(json.dumps({"schema": "rlm-train/generate-run/v1", "tasks_file": str(rl_tasks)}))
    for task_id, task_scores in scores.items():
        for k, score in enumerate(task_scores):
            append_jsonl(rl_run / "shard-20260101T000000-0of1-1.jsonl",
                         make_traj([block("FINAL(42)")], task_id=task_id, sample=k, score=score))
    rl_out = tmp_path / "rl-data"
    result = subprocess.run(rlm_cli + ["filter", "--trajectories", str(rl_run), "--out", str(rl_out), "rl_only=true",
                                       f"sft_data=[{out / 'sft'}]", "rl_min_pass_rate=0.01", "rl_max_pass_rate=0.9",
                                       "validation_fraction=0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in rl_out.iterdir()) == ["README.md", "filter_report.json", "rl", "rl-train.jsonl",
                                                        "rl-validation.jsonl"]  # README.md: the dataset card
    assert re.search(r"RL task: pass_rate_out_of_range +2\n", result.stdout) and "SFT samples" not in result.stdout
    rl = load_from_disk(str(rl_out / "rl"))
    assert {r["task_id"]: r["pass_rate"] for r in rl["train"]} == {"r1": 0.25, "r4": 0.75}
    prompt_row = rl["train"][0]
    assert [m["role"] for m in prompt_row["prompt"]] == ["system", "user"] and prompt_row["episodes"] == 4
    assert prompt_row["task_file"] == str(rl_tasks.resolve()) and json.loads(prompt_row["answer_json"]) == ["42"]
    assert prompt_row["scorer"] == "all_strings"
    rl_report = json.loads((rl_out / "filter_report.json").read_text())
    assert rl_report["rl"]["dropped"] == {"used_by_sft": 1, "pass_rate_out_of_range": 2}
    assert rl_report["rl"]["sft_data"] == [str((out / "sft").resolve())] and rl_report["rl"]["sft_tasks"] == 10

    # A window no task falls in: one line, nothing written.
    result = subprocess.run(rlm_cli + ["filter", "--trajectories", str(rl_run), "--out", str(tmp_path / "none"),
                                       "rl_only=true", "rl_min_pass_rate=0.3", "rl_max_pass_rate=0.4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no RL prompt kept (pass_rate_out_of_range 5)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "none").exists()


def test_grpo_is_warned_when_its_prompts_are_sft_tasks(tmp_path):
    """GRPO's prompts checked against the SFT data the RL set names and the data the model was tuned on."""
    from rlm_train.rlm import RLMConfig
    from rlm_train.rollouts.rl_prompts import load_prompt_set, sft_overlap

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"schema": "rlm-train/task/v1", "id": f"t{i}", "family": "niah", "query": "q",
                                         "context": "c", "answer": ["42"], "scorer": "all_strings", "meta": {}}) + "\n"
                             for i in range(4)))
    sft_rows = tmp_path / "sft-train.jsonl"
    sft_rows.write_text("".join(json.dumps({"messages": [], "task_id": t}) + "\n" for t in ("t1", "t2", "t9")))
    model = tmp_path / "sft-out" / "merged"
    model.mkdir(parents=True)
    (model.parent / "sft_config.json").write_text(json.dumps({"dataset": str(sft_rows)}))
    prompt_set = load_prompt_set(tasks, RLMConfig())
    [warning] = sft_overlap(prompt_set, str(model))
    assert warning.startswith(f"2 of 4 prompt tasks (2 of 4 prompts) are SFT tasks of {sft_rows}")
    assert sft_overlap(prompt_set, str(tmp_path / "base-model")) == []


def test_nothing_kept_still_writes_empty_datasets_with_their_columns(tmp_path, capsys):
    """A run where every episode fails (a base model's first trajectories): a warning says so
    before anything is written, the report says why each was dropped, and the datasets exist,
    empty, with the columns training expects."""
    from datasets import load_from_disk

    run = tmp_path / "run"
    run.mkdir()
    shard = run / "shard-20260101T000000-0of1-1.jsonl"
    for i in range(4):
        append_jsonl(shard, make_traj(THREE_TURNS, task_id=f"t{i}", score=0.0))
    report = flt.run_filter(FilterConfig(trajectories=[str(run)], out=str(tmp_path / "data")))
    assert report["episodes"] == {"kept": 0, "dropped": {"zero_score": 4}}
    warning = capsys.readouterr().err
    assert "warning:" in warning and "nothing to keep: all 4 episodes were dropped (zero_score 4)" in warning
    assert "Loosen the filter" in warning and report["warning"] in warning
    sft = load_from_disk(str(tmp_path / "data" / "sft"))
    assert sft["train"].num_rows == 0 and "messages" in sft["train"].column_names
    assert (tmp_path / "data" / "sft-train.jsonl").read_text() == ""
