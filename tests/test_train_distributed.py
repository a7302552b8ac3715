"""SFT with two training processes on this CPU (gloo): full fine-tuning under FSDP2 writes weights
that load and equal the trained ones, and every output is written once (logs, metrics, adapter,
merged model, summary). Each test launches real processes (`accelerate launch` / `torchrun`) running
tests/train_worker.py, which runs `rlm-train sft` and records what the test checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_train.testing.tiny_models import build_tiny_qwen3, rlm_sample, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu-sft.yaml"
WORKER = REPO / "tests" / "train_worker.py"
BIN = Path(sys.executable).parent

FSDP_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen3DecoderLayer
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_activation_checkpointing: false
"""

pytestmark = pytest.mark.slow


def launch(command: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def count(text: str, needle: str) -> int:
    return sum(needle in line for line in text.splitlines())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_full_fine_tuning_saves_loadable_trained_weights_once(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_qwen3(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(i) for i in range(4)])
    (tmp_path / "fsdp.yaml").write_text(FSDP_CPU)
    out, record = tmp_path / "out", tmp_path / "record"
    proc = launch([str(BIN / "accelerate"), "launch", "--config_file", str(tmp_path / "fsdp.yaml"), str(WORKER),
                   str(record), "sft", "--recipe", str(TINY_RECIPE), f"model={model_dir}", f"dataset={data}",
                   f"output_dir={out}", "lora.enabled=false", "save_merged=false", "training.max_steps=2",
                   "training.batch_size=1", "training.save_steps=2"], tmp_path)

    # The checkpoint is sharded (what FSDP wants to resume); the final model is whole and loads.
    assert list((out / "checkpoint-2").glob("pytorch_model_fsdp_0/*.distcp"))
    assert (out / "model" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    trained = torch.load(record / "trained.pt")
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert set(trained) <= set(loaded)
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor), name
    assert any(not torch.equal(initial[n], trained[n]) for n in trained)  # it did train
    # The model was loaded once the process group existed (FSDP's cpu_ram_efficient_loading needs it).
    assert [json.loads((record / f"load-rank{r}.json").read_text()) for r in (0, 1)] == [{"process_group": True}] * 2

    # One writer: each line and record once.
    printed = proc.stdout
    assert count(printed, "[sft] step 1/2 loss=") == 1 and count(printed, "[sft] step 2/2 loss=") == 1
    assert count(printed, "[sft] model_dir:") == 1 and count(printed, '"global_step": 2') == 1
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["tokens_seen"] == summary["tokens"]  # 2 steps x 2 processes x 1 sample: all 4 samples, summed


def test_two_processes_write_one_adapter_merged_model_and_metrics(tmp_path):
    """DDP (torchrun, gloo) LoRA with a validation split and save_merged: one set of outputs."""
    import torch

    from datasets import Features

    from rlm_train.rollouts.datasets import message_feature, write_datasets

    model_dir = build_tiny_qwen3(tmp_path / "model")
    features = Features({"messages": message_feature()})
    write_datasets(tmp_path / "data" / "sft", {"train": [{"messages": rlm_sample(i)["messages"]} for i in range(4)],
                                               "validation": [{"messages": rlm_sample(9)["messages"]}]}, features)
    out, record = tmp_path / "out", tmp_path / "record"
    proc = launch([str(BIN / "torchrun"), "--nproc-per-node", "2", str(WORKER), str(record), "sft",
                   "--recipe", str(TINY_RECIPE), f"model={model_dir}", f"dataset={tmp_path / 'data' / 'sft'}",
                   f"output_dir={out}", "training.max_steps=4", "training.batch_size=1", "training.save_steps=2",
                   "evaluation.every_steps=2", "merged_dtype=float32"], tmp_path)
    printed = proc.stdout
    for step in (1, 2, 3, 4):
        assert count(printed, f"[sft] step {step}/4 loss=") == 1, printed
    assert count(printed, "[sft] adapter_dir:") == 1 and count(printed, "[sft] merged_dir:") == 1
    rows = metrics(out)
    assert [m["step"] for m in rows if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in rows if "eval_loss" in m] == [2, 4]  # the validation split filter wrote
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation_samples"] == 1 and summary["best_checkpoint"].endswith(("checkpoint-2", "checkpoint-4"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    # the merged model computes what base + adapter compute
    from rlm_train.models.loading import load_causal_lm, load_for_inference

    ids = torch.tensor([[5, 9, 30, 41, 7]])
    adapted, _ = load_for_inference(model_dir, out / "adapter")
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, load_causal_lm(out / "merged")(input_ids=ids).logits, atol=1e-4)
