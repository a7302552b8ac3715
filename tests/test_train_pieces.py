"""The training pieces that need no trainer: the chunked fp32 loss (equal to the plain one, bounded
memory), the dense-mask bound for packed rows, the schedule/warmup check, the multi-process helpers
in one process, the resume-config check, the empty-dataset and ranks-vs-GPUs refusals, and the
shipped recipes' consistency with what `filter` writes. No TRL import: fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.testing.tiny_models import rlm_sample, write_jsonl
from rlm_train.train.common import OptimizerLoopSettings, is_main_process, main_process_only, sum_over_processes
from rlm_train.train.losses import chunked_cross_entropy
from rlm_train.train.sft import SFTConfig
from rlm_train.train.sft_data import DENSE_ATTENTION_MAX_TOKENS, dense_mask_problem, longest_packed_row

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu-sft.yaml"


# ---------------------------------------------------------------------------
# The chunked loss


def _logits(n: int, vocab: int, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradient_equal_the_plain_ones(chunk):
    import torch
    import torch.nn.functional as F

    logits, target = _logits(50, 311, torch.float32)
    plain = F.cross_entropy(logits, target, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, logits)
    chunked, correct, entropy = chunked_cross_entropy(logits, target, chunk_tokens=chunk)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(chunked_grad, plain_grad, atol=1e-6)
    assert correct == int((logits.argmax(-1) == target).sum())
    log_p = logits.detach().log_softmax(-1)
    assert entropy == pytest.approx(-(log_p.exp() * log_p).sum().item(), rel=1e-5)


def test_bf16_logits_are_cast_one_chunk_at_a_time():
    """What autograd keeps for backward: with chunks, no fp32 [N, V] copy (only one chunk is live,
    and it is recomputed in backward); without, the whole fp32 cast is kept."""
    import torch
    import torch.nn.functional as F

    n, vocab, chunk = 512, 2048, 64
    logits, target = _logits(n, vocab, torch.bfloat16)
    full_fp32 = n * vocab * 4

    def saved_fp32_bytes(fn) -> int:
        saved: list[int] = []

        def pack(t):
            if t.dtype == torch.float32:
                saved.append(t.numel() * 4)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
        return sum(saved)

    unchunked = saved_fp32_bytes(lambda: F.cross_entropy(logits.float(), target, reduction="sum"))
    chunked = saved_fp32_bytes(lambda: chunked_cross_entropy(logits, target, chunk_tokens=chunk)[0])
    print(f"fp32 bytes kept for backward: unchunked {unchunked:,}, chunked {chunked:,} (full cast {full_fp32:,})")
    assert unchunked >= full_fp32
    assert chunked <= full_fp32 // 4  # measured: 0 (the checkpoints keep only the bf16 inputs)
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# Packed rows and dense masks


def test_packed_rows_over_the_bound_are_refused_for_dense_attention():
    assert longest_packed_row([10, 300, 20, 200], 2) == 500
    assert dense_mask_problem("sdpa", DENSE_ATTENTION_MAX_TOKENS, 4) is None
    assert dense_mask_problem("sdpa", 65_536, 1) is None  # one sample a row: plain causal, no mask
    assert dense_mask_problem("flash_attention_2", 65_536, 4) is None  # varlen
    why = dense_mask_problem("sdpa", 65_536, 4)
    assert why and "dense 65,536x65,536" in why and "training.batch_size=1" in why and "4.0 GiB" in why


def test_sft_refuses_a_long_packed_row_before_loading_the_model(tmp_path, monkeypatch):
    from rlm_train.testing.tiny_models import build_tiny_qwen3
    from rlm_train.train import sft

    model = build_tiny_qwen3(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(i) for i in range(4)])
    monkeypatch.setattr(sft, "dense_mask_problem", lambda attn, row, batch: f"row {row} too long for {attn}")
    monkeypatch.setattr("rlm_train.models.loading.load_causal_lm",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    cfg = load_config(SFTConfig, TINY_RECIPE, [f"model={model}", f"dataset={data}", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="too long for sdpa"):
        sft.run_sft(cfg)
    monkeypatch.undo()
    # the plan warns about the worst case a recipe allows
    cfg = load_config(SFTConfig, TINY_RECIPE, [f"model={model}", f"dataset={data}", f"output_dir={tmp_path / 'o'}",
                                               "training.batch_size=8", "training.max_length=4096"])
    assert "at worst: attn_implementation=sdpa with packed rows of up to 32,768 tokens" in sft.plan(cfg, "r")


# ---------------------------------------------------------------------------
# Config checks


def test_constant_schedule_with_warmup_is_refused():
    with pytest.raises(ValueError, match="constant_with_warmup"):
        OptimizerLoopSettings(lr_scheduler="constant", warmup_steps=5)
    OptimizerLoopSettings(lr_scheduler="constant_with_warmup", warmup_steps=5)
    OptimizerLoopSettings(lr_scheduler="constant", warmup_steps=0)


def test_one_process_helpers(tmp_path):
    calls = []
    write = main_process_only(lambda x: calls.append(x) or x)
    assert is_main_process() and write(3) == 3 and calls == [3]
    assert sum_over_processes(2.5) == 2.5


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    from rlm_train.train import runtime
    from rlm_train.train.common import Requirements

    monkeypatch.setattr(runtime, "cuda_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    problems = runtime.hardware_problems(Requirements(gpus=2), "cuda", True, "r.yaml", "slurm/")
    assert [p.message for p in problems if p.fatal] == [
        "4 training processes were launched on this node but only 2 GPU(s) are visible; launch at most 2 "
        "(--num_processes / --nproc-per-node) or make more GPUs visible"]
    with pytest.raises(UserError, match="4 training processes"):
        runtime.start_run(problems, None, "cuda", "r.yaml", "sft")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not [p for p in runtime.hardware_problems(Requirements(gpus=2), "cuda", True, "r", "s") if p.fatal]


def test_resume_from_a_different_config_names_the_keys(tmp_path):
    from rlm_train.train.runtime import check_resume_config
    from rlm_train.train.sft import RESUME_MAY_CHANGE

    base = [f"model={tmp_path}/m", f"dataset={tmp_path}/d.jsonl", f"output_dir={tmp_path}/out"]
    old = load_config(SFTConfig, TINY_RECIPE, base)
    (tmp_path / "out" / "checkpoint-6").mkdir(parents=True)
    (tmp_path / "out" / "sft_config.json").write_text(old.model_dump_json())
    ckpt = str(tmp_path / "out" / "checkpoint-6")
    longer = load_config(SFTConfig, TINY_RECIPE, base + ["training.max_steps=40", "evaluation.every_steps=3"])
    check_resume_config(longer, "sft", ckpt, RESUME_MAY_CHANGE)  # longer training, more evaluation: fine
    # A checkpoint from an older rlm-train whose config lacked a field added since: not a difference.
    older = json.loads(old.model_dump_json())
    del older["lora"]["r"]
    (tmp_path / "out" / "sft_config.json").write_text(json.dumps(older))
    check_resume_config(old, "sft", ckpt, RESUME_MAY_CHANGE)
    (tmp_path / "out" / "sft_config.json").write_text(old.model_dump_json())
    changed = load_config(SFTConfig, TINY_RECIPE, base + ["lora.r=4", "training.learning_rate=0.5"])
    with pytest.raises(UserError) as err:
        check_resume_config(changed, "sft", ckpt, RESUME_MAY_CHANGE)
    message = str(err.value)
    assert "lora.r (8 -> 4)" in message and "training.learning_rate (0.01 -> 0.5)" in message
    assert "resume=never" in message and "\n" not in message


# ---------------------------------------------------------------------------
# An empty dataset (filter kept nothing): refused before any model, also in a dry run


def test_empty_dataset_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "data"
    write_jsonl(out / "sft-train.jsonl", [])
    (out / "filter_report.json").write_text(json.dumps({"episodes": {"kept": 0}}))
    args = ["sft", "--recipe", str(TINY_RECIPE), "model=/nonexistent/model", f"dataset={out / 'sft-train.jsonl'}",
            f"output_dir={tmp_path / 'o'}"]
    for extra in (["--dry-run"], []):
        assert cli.main(args + extra) == 2
        err = capsys.readouterr().err
        assert "train split is empty (0 samples)" in err and "filter_report.json says why" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_empty_save_to_disk_dataset_is_refused_in_a_dry_run(tmp_path, capsys):
    from datasets import Features

    from rlm_train.rollouts.datasets import message_feature, write_datasets

    write_datasets(tmp_path / "sft", {"train": [], "validation": []}, Features({"messages": message_feature()}))
    code = cli.main(["sft", "--recipe", str(TINY_RECIPE), f"dataset={tmp_path / 'sft'}", "--dry-run"])
    assert code == 2 and "0 samples" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Recipes say what the pipeline writes and follow their own guidance


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "recipes" / name).read_text())


def test_gpu_recipes_read_what_filter_writes_and_follow_their_guidance():
    lora, full, grpo = _yaml("qwen3-8b-sft-lora.yaml"), _yaml("qwen3-8b-sft-full.yaml"), _yaml("qwen3-8b-grpo.yaml")
    data = Path(lora["dataset"]).parent
    assert Path(lora["dataset"]) == data / "sft" and Path(full["dataset"]) == data / "sft"
    pipeline = {stage["name"]: stage for stage in _yaml("qwen3-8b-pipeline.yaml")["stages"]}
    rl_filter = pipeline["filter-rl"]["with"]  # the RL prompts: the SFT model's pass rates, no SFT task
    assert rl_filter["rl_only"] and Path(grpo["prompts"]) == Path(rl_filter["out"]) / "rl"
    assert Path(pipeline["grpo"]["with"]["prompts"]) == Path(grpo["prompts"])
    for recipe in (lora, full):
        # Nothing to install (sdpa), and one sample a row, so even the longest row builds no dense mask.
        t = recipe["training"]
        assert recipe["attn_implementation"] == "sdpa"
        assert dense_mask_problem("sdpa", t["batch_size"] * t["max_length"], t["batch_size"]) is None
        assert recipe["evaluation"]["every_steps"] > 0
        assert recipe["training"]["save_steps"] % recipe["evaluation"]["every_steps"] == 0
    t = grpo["training"]
    assert grpo["lora"]["enabled"] and 5e-6 <= t["learning_rate"] <= 5e-5
    assert not (t["warmup_steps"] and t["lr_scheduler"] == "constant")
    assert t["batch_size"] <= 4  # episodes of up to ~25k tokens (the turn budget) per GPU micro-batch
    assert t["batch_size"] * t["gradient_accumulation_steps"] * grpo["launch"]["num_processes"] % t["num_generations"] == 0
    paper = _yaml("filter-paper.yaml")
    assert paper["rl_min_pass_rate"] > 0  # never-solved tasks give zero-variance groups


def test_cpu_sft_recipe_reads_what_the_filter_recipe_writes():
    assert Path(_yaml("gemma3-270m-cpu-sft.yaml")["dataset"]) == Path(_yaml("filter-paper.yaml")["out"]) / "sft"
