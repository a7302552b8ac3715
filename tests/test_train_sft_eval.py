"""Evaluation during SFT, end to end on a tiny random model on this CPU: held-out RLM episodes (the
model being trained is the root policy, through rlm_train.eval) are scored every N steps, the score
per family is logged, and the adapter the next stage reads is the best-scoring checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm_train.config import load_config
from rlm_train.records import TASK_SCHEMA
from rlm_train.testing.tiny_models import build_tiny_qwen3, write_jsonl
from rlm_train.train.sft import SFTConfig, run_sft

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu-sft.yaml"

TASK = {"schema": TASK_SCHEMA, "id": "heldout-0", "family": "niah", "query": "What is the magic number for harbor?",
        "context": "Notes.\nThe magic number for harbor is 7421.\nMore notes.", "answer": ["7421"],
        "scorer": "all_strings", "meta": {"keys": ["harbor"]}}
EPISODE = {"max_iterations": 1, "root_max_tokens": 12, "temperature": 0.0, "prompt_style": "compact", "max_wall_s": 120}


def load_adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_held_out_score_is_logged_and_the_best_checkpoint_is_kept(tmp_path):
    import torch

    from rlm_train.rlm.loop import RLMConfig
    from rlm_train.rollouts.rl_prompts import initial_messages

    model = build_tiny_qwen3(tmp_path / "model")
    tasks = write_jsonl(tmp_path / "heldout.jsonl", [TASK])
    prompt = initial_messages(TASK, TASK["context"], RLMConfig(**EPISODE))
    # First the right answer to the held-out prompt, then a wrong one: the score rises, then falls,
    # so the best checkpoint is not the last one.
    right = {"messages": prompt + [{"role": "assistant", "content": "FINAL(7421)"}]}
    wrong = {"messages": prompt + [{"role": "assistant", "content": "FINAL(1111)"}]}
    data = write_jsonl(tmp_path / "sft.jsonl", [right] * 6 + [wrong] * 6)
    out = tmp_path / "out"
    overrides = [f"model={model}", f"dataset={data}", f"output_dir={out}", "save_merged=false",
                 "training.max_steps=12", "training.batch_size=1", "training.shuffle=false",
                 "training.save_steps=2", "evaluation.every_steps=2", f"evaluation.tasks=[{tasks}]",
                 "evaluation.sub_policy=scripted", *[f"evaluation.rlm.{k}={v}" for k, v in EPISODE.items()]]
    summary = run_sft(load_config(SFTConfig, TINY_RECIPE, overrides), quiet=True)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["eval_rlm_score"] for r in rows if "eval_rlm_score" in r}
    print("held-out RLM score by step:", scores)
    assert sorted(scores) == [2, 4, 6, 8, 10, 12]
    assert all(r["eval_rlm_score/niah"] == r["eval_rlm_score"] for r in rows if "eval_rlm_score" in r)
    best_step = min(step for step, s in scores.items() if s == max(scores.values()))
    assert max(scores.values()) == 1.0 and scores[12] < 1.0, scores
    assert summary["best_metric"] == 1.0 and summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    # The adapter the next stage reads is the best checkpoint's, not the last step's.
    kept = load_adapter_tensors(out / "adapter")
    best = load_adapter_tensors(out / f"checkpoint-{best_step}")
    assert kept.keys() == best.keys() and all(torch.equal(kept[k], best[k]) for k in kept)
    last = load_adapter_tensors(out / "checkpoint-12")
    assert any(not torch.equal(kept[k], last[k]) for k in kept)
    # Each evaluation is a full eval run directory (report, episodes) for `rlm-train view`.
    report = json.loads((out / "eval" / f"step-{best_step}" / "report.json").read_text())
    assert report["methods"]["trained"]["score"]["all"]["mean"] == 1.0
