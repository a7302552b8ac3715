"""The data half of the loop through the CLI: tasks -> generate -> filter -> the SFT set
and the RL prompt set that `rlm-train grpo` reads."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def cli(*args):
    res = subprocess.run([sys.executable, "-m", "rlm_train.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, f"rlm-train {args[0]} failed:\n{res.stderr[-2000:]}"
    return res


@pytest.mark.slow
def test_tasks_generate_filter_feed_sft_and_grpo(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    cli("tasks", "make", "--family", "niah", "--n", "6", "--context-tokens", "8000", "--seed", "3", "--out", str(tasks))
    run_dir = tmp_path / "gen"
    cli("generate", "--tasks", str(tasks), "--policy", "scripted", "--samples", "2", "--out", str(run_dir), "--no-progress")
    data_dir = tmp_path / "data"
    cli("filter", "--trajectories", str(run_dir), "--tasks", str(tasks), "--out", str(data_dir), "validation_fraction=0.34")

    # Every SFT sample ends with the one assistant turn it trains on.
    sft_rows = [json.loads(line) for path in sorted(data_dir.glob("sft-*.jsonl")) for line in path.read_text().splitlines()]
    assert sft_rows and all(row["messages"][-1]["role"] == "assistant" for row in sft_rows)
    assert all(row["messages"][0]["role"] == "system" for row in sft_rows)

    # The RL prompt set: RL-split tasks sampled again (by the SFT model in a real pipeline), filtered
    # rl_only against the SFT set. It resolves back to the task records and their contexts.
    rl_tasks = tmp_path / "rl-tasks.jsonl"
    cli("tasks", "make", "--family", "niah", "--n", "4", "--context-tokens", "8000", "--seed", "3", "--split", "rl",
        "--out", str(rl_tasks))
    cli("generate", "--tasks", str(rl_tasks), "--policy", "scripted", "--samples", "2", "--out", str(tmp_path / "gen-rl"),
        "--no-progress")
    cli("filter", "--trajectories", str(tmp_path / "gen-rl"), "--out", str(data_dir / "rl-set"), "rl_only=true",
        f"sft_data=[{data_dir / 'sft'}]", "validation_fraction=0")
    from rlm_train.rlm import RLMConfig
    from rlm_train.train.grpo import load_context, load_prompt_set, sft_overlap

    prompt_set = load_prompt_set(data_dir / "rl-set" / "rl", RLMConfig())
    assert sft_overlap(prompt_set, str(tmp_path / "model")) == []
    task_ids = {json.loads(line)["id"] for line in rl_tasks.read_text().splitlines()}
    assert prompt_set.rows and {row["task_id"] for row in prompt_set.rows} <= task_ids
    some_id = prompt_set.rows[0]["task_id"]
    task = prompt_set.tasks[some_id]
    assert isinstance(load_context(task, prompt_set.base_dirs[some_id]), str)
    assert prompt_set.rows[0]["prompt"][1]["content"].startswith("Query: " + task["query"])
