"""What `run_sft` and `run_grpo` both do around their trainer: check the machine, set threads and
device, prepare the output directory, log metrics, train, save, and write the summary."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rlm_train.errors import UserError
from rlm_train.train.common import LaunchSettings, Requirements

# ---------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class Problem:
    """Something this machine lacks for a recipe. Fatal ones stop a run before anything loads;
    the others are printed as warnings. Plans list both."""

    message: str
    fatal: bool = True


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(device: str) -> str:
    """'auto' -> cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if cuda_count() > 0 else "cpu"
    return device


def hardware_problems(requires: Requirements, device: str, bf16: bool, cpu_recipe: str, slurm_hint: str) -> list[Problem]:
    """What this machine lacks for a recipe's GPU and dtype needs (stages add their own checks)."""
    problems = []
    have = cuda_count()
    need = max(requires.gpus, 1 if device == "cuda" else 0)
    if need > have:
        problems.append(Problem(
            f"the recipe needs {need} CUDA GPU(s) (requires.gpus / device=cuda) and this machine has {have}; "
            f"run it on a GPU node ({slurm_hint}) or use a CPU recipe ({cpu_recipe})"
        ))
    if bf16 and need == 0 and (device == "cpu" or have == 0):
        # Slow, not wrong: the run works, so it only warns.
        problems.append(Problem("bf16 on this CPU is several times slower than float32 (no native bf16); "
                                "set dtype=float32", fatal=False))
    return problems


def missing_package(module: str, message: str) -> list[Problem]:
    """A fatal problem naming the fix when `module` is not importable."""
    return [] if importlib.util.find_spec(module) is not None else [Problem(message)]


# ---------------------------------------------------------------------------
# Start of a run


def start_run(problems: list[Problem], num_threads: int | None, device: str, source: str, stage: str) -> str:
    """Stop on the first fatal problem, print the rest, set torch's CPU threads; returns the device."""
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise UserError(f"{source}: {fatal[0].message}")
    for p in problems:
        print(f"[{stage}] warning: {p.message}", flush=True)
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    return pick_device(device)


def prepare_output_dir(cfg: Any, stage: str) -> Path:
    """output_dir with the resolved config beside what the run writes ({stage}_config.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stage}_config.json").write_text(cfg.model_dump_json(indent=2))
    return out


def installed_reporters(wanted: Sequence[str], stage: str) -> list[str]:
    """The metric reporters (tensorboard, wandb, ...) that are installed; the others are named and skipped."""
    have = [r for r in wanted if importlib.util.find_spec(r) is not None]
    for r in sorted(set(wanted) - set(have)):
        print(f"[{stage}] report_to {r}: not installed, skipped (metrics.jsonl has everything)", flush=True)
    return have


# ---------------------------------------------------------------------------
# Metrics, training, saving


def _plain_record(state: Any, logs: dict) -> dict:
    return {"step": state.global_step, "time": time.time(), **logs}


def make_metrics_callback(path: Path, stage: str, shown: tuple[str, ...], quiet: bool = False,
                          record: Callable[[Any, dict], dict] = _plain_record,
                          on_begin: Callable[[], None] | None = None):
    """Append every log to metrics.jsonl as `record(state, logs)` builds it, and print the `shown` keys
    as one compact line (TRL's own printer is removed by `train`)."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if on_begin is not None:
                on_begin()

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = record(state, logs or {})
            with path.open("a") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
            line = " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in row.items() if k in shown)
            if line and not quiet:
                print(f"[{stage}] step {state.global_step}/{state.max_steps} {line}", flush=True)

    return MetricsCallback()


def train(trainer: Any, on_trainer: Callable[[Any], None] | None = None, **train_kwargs: Any) -> tuple[Any, float]:
    """trainer.train() without TRL's per-log printer; `on_trainer` sees the trainer first (tests
    snapshot weights there). Returns the result and the wall seconds of training."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if on_trainer is not None:
        on_trainer(trainer)
    started = time.perf_counter()
    result = trainer.train(**train_kwargs)
    return result, time.perf_counter() - started


def save_trained(trainer: Any, tokenizer: Any, out: Path, lora: bool, model_path: Path, chat_template: str) -> dict:
    """adapter/ (LoRA, with the base it belongs to) or model/ (full weights), each with the tokenizer
    and its chat template; returns {adapter_dir | model_dir: path}."""
    from rlm_train.models.loading import write_adapter_meta

    if lora:
        target = out / "adapter"
        trainer.model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        write_adapter_meta(target, str(model_path), chat_template)
        return {"adapter_dir": str(target)}
    target = out / "model"
    trainer.save_model(str(target))  # gathers sharded (FSDP/DeepSpeed) weights before writing
    tokenizer.save_pretrained(target)
    return {"model_dir": str(target)}


def write_summary(out: Path, summary: dict) -> dict:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def plan_footer(launch: LaunchSettings, command: str, source: str, problems: list[Problem]) -> list[str]:
    """The last lines of a training plan: the multi-GPU launch line, and what this machine lacks."""
    lines = []
    if launch.accelerate_config:
        lines.append(f"  launch       accelerate launch --config_file {launch.accelerate_config} "
                     f"--num_processes {launch.num_processes} -m rlm_train.cli {command} --recipe {source}")
    return lines + ([f"  MISSING HERE {p.message}" for p in problems] or ["  resources    ok on this machine"])
