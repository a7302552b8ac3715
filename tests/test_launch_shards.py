"""Sharded generation: every (task, sample) in exactly one shard; shard outputs merge with no
loss and no duplicates, whether the shards share one run directory or write their own."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.errors import UserError
from rlm_train.rlm import RLMConfig
from rlm_train.rollouts import store
from rlm_train.rollouts.generate import GenerateConfig, run_generate
from rlm_train.rollouts.shards import check_run, merge_runs, shard_of, shard_pairs


@pytest.mark.parametrize("num_tasks,samples,num_shards", [(10, 1, 3), (10, 4, 4), (2, 8, 5), (1, 3, 8), (7, 2, 7), (0, 2, 3)])
def test_every_pair_belongs_to_exactly_one_shard_and_shards_are_balanced(num_tasks, samples, num_shards):
    tasks = [f"t{i}" for i in range(num_tasks)]
    taken = Counter(pair for i in range(num_shards) for pair in shard_pairs(tasks, samples, i, num_shards))
    assert set(taken) == {(t, k) for t in tasks for k in range(samples)}
    assert set(taken.values()) <= {1}
    sizes = [len(shard_pairs(tasks, samples, i, num_shards)) for i in range(num_shards)]
    # Whole tasks when there are enough of them, single pairs otherwise: never more than one
    # task's worth (or one pair) between the busiest and the idlest shard.
    assert max(sizes) - min(sizes) <= (samples if num_tasks >= num_shards else 1)


def test_assignment_is_a_pure_function_and_keeps_a_tasks_samples_together():
    assert [shard_of(i, k, 9, 3, 4) for i in range(9) for k in range(3)] == \
           [shard_of(i, k, 9, 3, 4) for i in range(9) for k in range(3)]
    assert {shard_of(5, k, 9, 3, 4) for k in range(3)} == {1}  # 5 % 4, all samples of task 5
    assert {shard_of(0, k, 2, 4, 8) for k in range(4)} == {0, 1, 2, 3}  # few tasks: samples spread
    with pytest.raises(UserError, match="index must be in 0..1"):
        shard_pairs(["a"], 1, 2, 2)


def _config(tasks: Path, out: Path, **kw) -> GenerateConfig:
    return GenerateConfig(tasks=str(tasks), out=str(out), policy="scripted", progress=False,
                          rlm=RLMConfig(max_iterations=4), **kw)


def _pairs(out: Path) -> Counter:
    return Counter((json.loads(line)["task_id"], json.loads(line)["sample"])
                   for path in store.shard_files(out) for line in path.read_text().splitlines())


def test_shards_in_separate_directories_merge_to_exactly_one_record_per_pair(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)  # fewer tasks than shards: samples are spread
    dirs = [tmp_path / f"shard-{i}" for i in range(3)]
    for i, out in enumerate(dirs):
        run_generate(_config(tasks, out, samples=3, num_shards=3, shard_index=i))
    assert all(sum(_pairs(d).values()) == 2 for d in dirs)  # 6 pairs over 3 shards
    alone = check_run([dirs[0]])
    assert not alone.complete and len(alone.missing) == 4
    joint = check_run(dirs)
    assert joint.complete and joint.records == 6 and joint.expected == 6

    merged = merge_runs(dirs, tmp_path / "merged")
    assert merged["added"] == 6 and merged["duplicates_dropped"] == 0
    assert _pairs(tmp_path / "merged") == Counter({(f"bench-{i}", k): 1 for i in range(2) for k in range(3)})
    assert check_run([tmp_path / "merged"]).complete
    # Merging again (a shard re-copied by hand) adds nothing and drops the repeats.
    again = merge_runs(dirs, tmp_path / "merged")
    assert again["added"] == 0 and again["duplicates_dropped"] == 6
    assert sum(_pairs(tmp_path / "merged").values()) == 6
    # The merged directory is a run directory: generate resumes it with nothing to do.
    summary = run_generate(_config(tasks, tmp_path / "merged", samples=3))
    assert summary["this_run"]["episodes"] == 0 and summary["records"] == 6


def test_merge_refuses_directories_of_different_runs(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)
    run_generate(_config(tasks, tmp_path / "a", samples=1))
    run_generate(_config(tasks, tmp_path / "b", samples=2))
    with pytest.raises(UserError, match="a different run .*samples differs"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(UserError, match="is one of the sources"):
        merge_runs([tmp_path / "a"], tmp_path / "a")
    assert not (tmp_path / "m").exists()


def test_shards_started_together_share_one_fresh_directory(tmp_path, rlm_cli):
    """Two shard processes on a new run directory at the same moment (a Slurm array): both
    start (neither mistakes the other's manifest being written for a foreign run) and the
    directory ends with exactly one record per (task, sample)."""
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 6)
    out = tmp_path / "shared"
    procs = [subprocess.Popen([*rlm_cli, "generate", "--tasks", str(tasks), "--out", str(out), "--policy", "scripted",
                               "--samples", "2", "--shard", f"{i}/2", "--no-progress", "rlm.max_iterations=4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert _pairs(out) == Counter({(f"bench-{i}", k): 1 for i in range(6) for k in range(2)})
    assert len(store.shard_files(out)) == 2
    assert check_run([out]).complete


def test_a_manifest_another_shard_is_writing_is_not_a_foreign_file(tmp_path):
    """The moment the race above can hit: shard B looks while shard A's manifest is still its
    temp file. B must start (and write the same manifest), not refuse the directory."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{store.MANIFEST}.abc123.tmp").write_text("{")
    assert store.open_run(out, {"schema": store.MANIFEST_SCHEMA, "samples": 1}) is False
    # Any other file still marks a directory that is not a run.
    (out / store.MANIFEST).unlink()
    (out / "stray.txt").write_text("x")
    with pytest.raises(UserError, match="not empty and has no manifest.json .holds stray.txt"):
        store.open_run(out, {"samples": 1})
