"""Files written before the architecture pass (commit a736554) still load: a task file,
a generate run directory, and filter's SFT and RL datasets (tests/fixtures/a736554)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlm_train.records import CELL_RESULTS_NOTE, Outcome, check_task
from rlm_train.rollouts import store
from rlm_train.rollouts.tasks_file import load_tasks

FIXTURE = Path(__file__).parent / "fixtures" / "a736554"


def _copy(tmp_path: Path) -> Path:
    """The fixture under tmp_path, with the absolute paths it was written with pointing there."""
    root = tmp_path / "fx"
    shutil.copytree(FIXTURE, root)
    for path in [*root.glob("data/*.jsonl"), root / "run" / "manifest.json"]:
        path.write_text(path.read_text().replace("/tmp/fx", str(root)))
    return root


def test_old_task_file_loads_and_scores():
    from rlm_train.tasks import score

    tasks, problems = load_tasks(FIXTURE / "tasks.jsonl")
    assert len(tasks) == 2 and problems == []
    assert all(check_task(t) is None for t in tasks)
    assert [score(t, t["answer"]) for t in tasks] == [1.0, 1.0]


def test_old_trajectories_load_with_todays_records():
    stats = store.ReadStats()
    records = store.read_records(FIXTURE / "run", stats)
    assert len(records) == 4 and stats.bad_lines == [] and stats.torn_lines == 0
    assert {(r["task_id"], r["sample"]) for r in records} == {(t, k) for t in {r["task_id"] for r in records} for k in (0, 1)}
    for r in records:
        assert r["outcome"] == Outcome.FINAL and r["score"] == 1.0
        assert r["turns"][0]["executions"][0]["stdout"]  # the old execution records, without error_kind
        assert "error_kind" not in r["turns"][0]["executions"][0]


def test_old_run_filters_again_into_the_same_samples(tmp_path):
    from rlm_train.rollouts.filter import FilterConfig, run_filter

    root = _copy(tmp_path)
    report = run_filter(FilterConfig(trajectories=[str(root / "run")], out=str(tmp_path / "again")))
    old = json.loads((FIXTURE / "data" / "filter_report.json").read_text())
    for section in ("episodes", "turns", "sft"):
        assert json.dumps(report[section], sort_keys=True) == json.dumps(old[section], sort_keys=True), section
    # Since the RL set leaves out SFT's tasks, the old run's two tasks (both in SFT) give no RL prompt.
    assert old["rl"]["train"] + old["rl"]["validation"] == 2
    assert (report["rl"]["train"], report["rl"]["validation"], report["rl"]["dropped"]) == (0, 0, {"used_by_sft": 2})
    assert report["rl"]["task_files"] == [str(root / "tasks.jsonl")]  # the old one says /tmp/fx/tasks.jsonl
    assert report["cell_results"] == CELL_RESULTS_NOTE  # what the samples' cell outputs are (issue 24)
    new_lines = (tmp_path / "again" / "sft-train.jsonl").read_text().splitlines()
    old_lines = (FIXTURE / "data" / "sft-train.jsonl").read_text().splitlines()
    assert [json.loads(x)["messages"] for x in new_lines] == [json.loads(x)["messages"] for x in old_lines]


def test_old_sft_and_rl_datasets_load(tmp_path):
    from rlm_train.rlm import RLMConfig
    from rlm_train.rollouts.rl_prompts import load_prompt_set
    from rlm_train.rollouts.datasets import load_train_split
    from rlm_train.train.sft import read_sft_dataset

    root = _copy(tmp_path)
    for source in (root / "data" / "sft", root / "data" / "sft-train.jsonl"):
        rows = read_sft_dataset(source)
        assert len(rows) == 6 and rows[0][0]["role"] == "system"
    assert set(load_train_split(root / "data" / "rl").column_names) >= {"prompt", "task_id", "task_file"}
    prompts = load_prompt_set(root / "data" / "rl-train.jsonl", RLMConfig())
    assert len(prompts.rows) == 1 and set(prompts.tasks) == {prompts.rows[0]["task_id"]}
