"""recipes/demo-rl-cpu.yaml, scaled down: its own stage graph (RL-split and held-out tasks, START's pass
rate, GRPO from an SFT checkpoint, the matched SFT control, eval with paired differences) run by
`rlm-train pipeline` on a tiny random Gemma-3-shaped model in place of Gemma-3-270m, with in-process
`hf:` policies in place of the vLLM servers. The "demo" it starts from (an SFT run with a checkpoint,
its data and training tasks) is made here with the demo's own SFT stage keys. GRPO is interrupted once
and the rerun resumes it; a GRPO run on SFT's tasks is warned with counts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENS = {"root_max_tokens": 24, "answer_max_tokens": 12}


def _stage(recipe: dict, name: str) -> dict:
    return next(s for s in recipe["stages"] if s["name"] == name)


def _flatten(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _flatten(f"{prefix}{key}.", sub)]
    return [f"{prefix.rstrip('.')}={json.dumps(value)}"]


def _make_demo(root: Path, model: Path) -> Path:
    """What `make demo` leaves that demo-rl reads: training tasks, the SFT data (task ids of those tasks),
    and an SFT run (the demo's sft stage keys, 2 steps) with checkpoint-2 as START."""
    from datasets import Dataset, DatasetDict

    from rlm_train.tasks.generate import make_tasks, write_tasks
    from rlm_train.testing.tiny_models import rlm_sample

    demo = root / "demo"
    train = make_tasks("niah", 2, 4000, 0, split="train") + make_tasks("oolong", 2, 4000, 0, split="train")
    write_tasks(demo / "tasks" / "train.jsonl", train)
    rows = [{**rlm_sample(i), "task_id": task["id"]} for i, task in enumerate(train)]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(demo / "data" / "sft"))

    sft = _stage(yaml.safe_load((REPO / "recipes" / "demo-cpu.yaml").read_text()), "sft")
    keys = {**sft["with"], "model": str(model), "dataset": str(demo / "data" / "sft"),
            "output_dir": str(demo / "sft"), "num_threads": 1, "save_merged": False}
    keys["training"] = {**keys["training"], "max_steps": 2, "save_steps": 2}
    result = subprocess.run([sys.executable, "-m", "rlm_train.cli", "sft", "--recipe", str(REPO / sft["recipe"]),
                             *_flatten("", keys)], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (demo / "sft" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    return demo


def _scaled_recipe(root: Path, demo: Path, model: Path) -> tuple[Path, dict]:
    """demo-rl-cpu.yaml with its paths under `root`, START = checkpoint-2, a few tasks and steps, the tiny
    model, and hf: policies instead of the vLLM serve stages."""
    real = yaml.safe_load((REPO / "recipes" / "demo-rl-cpu.yaml").read_text())
    grpo_steps = _stage(real, "grpo")["with"]["training"]["max_steps"]
    start_step = int(_stage(real, "grpo")["with"]["adapter"].rsplit("-", 1)[1])
    # The shipped recipe's control makes as many updates as its GRPO.
    assert _stage(real, "sft-control")["with"]["training"]["max_steps"] - start_step == grpo_steps >= 30

    text = yaml.safe_dump(real, sort_keys=False)
    text = text.replace("runs/demo-rl", str(root / "demo-rl")).replace("runs/demo/", f"{demo}/")
    text = text.replace(f"checkpoint-{start_step}", "checkpoint-2")
    recipe = yaml.safe_load(text)
    recipe["out_dir"] = str(root / "demo-rl")
    recipe["stages"] = [s for s in recipe["stages"] if s["run"] != "serve"]
    for stage in recipe["stages"]:
        if "recipe" in stage:
            stage["recipe"] = str(REPO / stage["recipe"])
    out = root / "demo-rl"
    start = f"hf:{model}+adapter:{demo}/sft/checkpoint-2"
    policies = {"start": start, "grpo": f"hf:{model}+adapter:{out}/grpo/adapter",
                "sft-control": f"hf:{model}+adapter:{out}/sft-control/adapter"}

    _stage(recipe, "tasks-rl")["with"]["families"] = {"niah": {"rl": 2}, "oolong": {"rl": 2}}
    _stage(recipe, "tasks-eval")["with"]["families"] = {"niah": {"heldout": 1}, "oolong": {"heldout": 1}}
    for name in ("pass-rate", "eval"):
        stage = _stage(recipe, name)
        stage["after"] = [a for a in stage["after"] if not a.startswith("serve")]
        stage["with"]["rlm"].update(TINY_TOKENS)
        stage["with"]["samples"] = 1
        for method in stage["with"]["methods"]:
            method["policy"] = policies[method["name"]]
            method.pop("base_urls")
    _stage(recipe, "eval")["after"] += ["sft-control"]
    grpo = _stage(recipe, "grpo")["with"]
    grpo.update(model=str(model), num_threads=1)
    grpo["training"].update(max_steps=3, num_generations=2, batch_size=4)
    grpo["rollout"]["concurrency"] = 4
    grpo["rlm"].update(TINY_TOKENS, max_wall_s=120)
    control = _stage(recipe, "sft-control")["with"]
    control.update(model=str(model), num_threads=1)
    control["training"]["max_steps"] = 2 + 3
    path = root / "demo-rl.yaml"
    path.write_text("# rlm-train pipeline --recipe demo-rl.yaml\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path, recipe


def _pipeline(root: Path, recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlm_train.cli", "pipeline", "--recipe", str(recipe)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scaled_demo_rl_runs_resumes_and_matches_the_control(tmp_path):
    from rlm_train.testing.tiny_models import build_tiny_gemma3

    model = build_tiny_gemma3(tmp_path / "gemma")
    demo = _make_demo(tmp_path, model)
    recipe, _ = _scaled_recipe(tmp_path, demo, model)
    out = tmp_path / "demo-rl"

    # Interrupted (Ctrl-C) once GRPO has checkpointed its first step.
    proc = _pipeline(tmp_path, recipe)
    try:
        deadline = time.monotonic() + 600
        while not (out / "grpo" / "checkpoint-1" / "trainer_state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted during stage grpo" in err
    assert not (out / "grpo" / "checkpoint-3").exists()

    resumed = _pipeline(tmp_path, recipe)
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    grpo = json.loads((out / "grpo" / "summary.json").read_text())
    assert grpo["global_step"] == 3 and "checkpoint-" in (grpo["resumed_from"] or "")

    # The reward curve: one CSV row per step, and the plot.
    with (out / "grpo" / "rewards.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(0.0 <= float(r["reward"]) <= 1.0 for r in rows)
    assert (out / "grpo" / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The matched control: as many updates of SFT, from the same checkpoint.
    control = json.loads((out / "sft-control" / "summary.json").read_text())
    assert control["resumed_from"].endswith("checkpoint-2")
    assert control["global_step"] - 2 == grpo["global_step"]

    # START's pass rate and the eval's paired differences, on the same held-out tasks.
    assert json.loads((out / "pass-rate" / "report.json").read_text())["methods"]["start"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["methods"]) == {"start", "grpo", "sft-control"}
    assert [(p["a"], p["b"]) for p in report["paired"]] == [("start", "grpo"), ("start", "sft-control"),
                                                           ("sft-control", "grpo")]
    assert all(p["all"]["n"] == 2 for p in report["paired"])  # both held-out tasks, paired

    # Bad input: GRPO prompts that are SFT's tasks are warned with counts before training.
    grpo_recipe = out / "pipeline" / "grpo.yaml"
    warned = subprocess.run([sys.executable, "-m", "rlm_train.cli", "grpo", "--recipe", str(grpo_recipe),
                             f"prompts={demo / 'tasks' / 'train.jsonl'}", f"output_dir={tmp_path / 'grpo-on-sft'}",
                             "training.max_steps=1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert warned.returncode == 0, warned.stderr[-3000:]
    shown = warned.stdout + warned.stderr
    assert f"warning: 4 of 4 prompt tasks (4 of 4 prompts) are SFT tasks of {demo / 'data' / 'sft'}" in shown
    assert shown.index("are SFT tasks") < shown.index("step 1/1")


def test_reward_curve_has_one_row_per_step_after_a_resume(tmp_path):
    """metrics.jsonl as a resumed run leaves it (a step logged twice, a torn last line, records without a
    reward): rewards.csv gets one row per step, the last record of each, in step order, and the plot."""
    from rlm_train.train.grpo_curve import write_reward_curve

    records = [{"step": 1, "time": 10.0, "reward": 0.25, "reward_std": 0.1, "loss": 0.5},
               {"step": 2, "time": 20.0, "reward": 0.5, "reward_std": 0.2},
               {"step": 2, "time": 35.0, "reward": 0.75, "reward_std": 0.3, "rlm/answered_frac": 1.0},
               {"step": 2, "train_runtime": 40.0},
               {"step": 3, "time": 50.0, "reward": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "rew')
    assert write_reward_curve(tmp_path) == ["rewards.csv", "reward.png"]
    with (tmp_path / "rewards.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["reward"], r["time"]) for r in rows] == [("1", "0.25", "10.0"), ("2", "0.75", "35.0"),
                                                                     ("3", "1.0", "50.0")]
    assert rows[1]["rlm/answered_frac"] == "1.0" and rows[2]["reward_std"] == ""
    assert (tmp_path / "reward.png").read_bytes()[:4] == b"\x89PNG"
    assert write_reward_curve(tmp_path / "nothing-logged") == []
