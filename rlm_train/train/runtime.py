"""What `run_sft` and `run_grpo` both do around their trainer: check the machine, set threads and
device, prepare the output directory, log metrics, train (stopping cleanly on a signal, exporting the
newest checkpoint's weights when a run ends early), save, and write the summary."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rlm_train.config import get_dotted
from rlm_train.errors import UserError
from rlm_train.train import trl_compat
from rlm_train.train.common import (
    LaunchSettings,
    Requirements,
    fail_together,
    is_main_process,
    local_world_size,
    main_print,
    main_process_only,
)
from rlm_train.train.interrupt import GracefulStop, StepAbandoned

# ---------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class Problem:
    """Something this machine lacks for a recipe. Fatal ones stop a run before anything loads;
    the others are printed as warnings. Plans list both."""

    message: str
    fatal: bool = True
    environment: bool = False
    """The Python environment lacks it (a package), not this machine's hardware: the Slurm jobs run
    the same environment, so `rlm-train launch` refuses to submit on it (launch/environment.py)."""


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
    ranks = local_world_size()
    if have > 0 and device != "cpu" and ranks > have:
        # Two processes on one GPU would each load the model there and run out of memory much later.
        problems.append(Problem(
            f"{ranks} training processes were launched on this node but only {have} GPU(s) are visible; "
            f"launch at most {have} (--num_processes / --nproc-per-node) or make more GPUs visible"
        ))
    if bf16 and need == 0 and (device == "cpu" or have == 0):
        # Slow, not wrong: the run works, so it only warns.
        problems.append(Problem("bf16 on this CPU is several times slower than float32 (no native bf16); "
                                "set dtype=float32", fatal=False))
    return problems


def missing_package(module: str, message: str) -> list[Problem]:
    """A fatal problem naming the fix when `module` is not importable (a lack of the environment)."""
    return [] if importlib.util.find_spec(module) is not None else [Problem(message, environment=True)]


# ---------------------------------------------------------------------------
# Start of a run


def start_run(problems: list[Problem], num_threads: int | None, device: str, source: str, stage: str) -> str:
    """Stop on the first fatal problem, print the rest, set torch's CPU threads; returns the device."""
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise UserError(f"{source}: {fatal[0].message}")
    if (drift := trl_compat.version_warning()) is not None:
        problems = [*problems, Problem(drift, fatal=False)]
    for p in problems:
        main_print(f"[{stage}] warning: {p.message}")
    plain_logs_when_not_a_terminal()
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    return pick_device(device)


def plain_logs_when_not_a_terminal() -> None:
    """Progress bars redraw themselves with carriage returns, which a Slurm or piped log keeps as one long
    line: off (model loading, datasets, the Hub) when stderr is not a terminal. The step lines, with their
    eta, say where a run is."""
    if sys.stderr.isatty():
        return
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def prepare_output_dir(cfg: Any, stage: str) -> Path:
    """output_dir with the resolved config beside what the run writes ({stage}_config.json);
    written by the main process, the others wait for it."""
    out = Path(cfg.output_dir)

    @main_process_only
    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stage}_config.json").write_text(cfg.model_dump_json(indent=2))

    write()
    return out


def check_resume_config(cfg: Any, stage: str, checkpoint: str | None, may_change: Sequence[str]) -> None:
    """Refuse to resume `checkpoint` when the run that wrote it had a different config: the saved
    {stage}_config.json beside the checkpoint must agree on every key but the `may_change` ones
    (dotted; a section name covers its keys). Names the differing keys."""
    if checkpoint is None:
        return
    saved_file = Path(checkpoint).parent / f"{stage}_config.json"
    if not saved_file.is_file():
        return  # a checkpoint from elsewhere: nothing to compare with
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, json.JSONDecodeError):
        return
    differing = [key for key in _differing_keys(saved, json.loads(cfg.model_dump_json()))
                 if not any(key == k or key.startswith(k + ".") for k in may_change)]
    if differing:
        shown = ", ".join(f"{k} ({get_dotted(saved, k)!r} -> {get_dotted(json.loads(cfg.model_dump_json()), k)!r})" for k in differing[:6])
        raise UserError(
            f"resume: {checkpoint} was written with a different config ({shown}); use the old values, "
            f"a new output_dir, or resume=never to start fresh"
        )


def _differing_keys(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ. A key the saved config lacks is a field added to
    rlm-train since that run: the run cannot have set it, so it is not a difference."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [k for key in saved for k in _differing_keys(saved[key], now.get(key), f"{prefix}{key}.")]
    return [] if saved == now else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------
# Metrics, training, saving


def _plain_record(state: Any, logs: dict) -> dict:
    return {"step": state.global_step, "time": time.time(), **logs}


class StepClock:
    """Time since the run (re)started and the time left, from the pace of the steps done since then (a
    resumed run's earlier steps took no time here)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_step = 0

    def start(self, step: int) -> None:
        self.started, self.first_step = time.monotonic(), step

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def eta_s(self, step: int, max_steps: int) -> float | None:
        """Seconds left at the pace so far; None before the first step or without a known end."""
        done = step - self.first_step
        if done <= 0 or max_steps <= 0:
            return None
        return self.elapsed_s() / done * max(max_steps - step, 0)


def clock_text(seconds: float | None) -> str:
    """H:MM:SS (or '?' when unknown)."""
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def make_metrics_callback(path: Path, stage: str, shown: tuple[str, ...], quiet: bool = False,
                          record: Callable[[Any, dict], dict] = _plain_record,
                          on_begin: Callable[[], None] | None = None):
    """Append every log to metrics.jsonl as `record(state, logs)` builds it, and print the `shown` keys
    as one plain line with the time so far and the time left (TRL's printer and progress bars are off:
    `train` removes the printer, the configs set disable_tqdm, so logs hold no carriage returns). Every
    process calls `record` (it may sum counters over processes); only the main process writes and prints."""
    from transformers import TrainerCallback

    clock = StepClock()

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start(state.global_step)
            if on_begin is not None:
                on_begin()

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = record(state, logs or {})
            if not state.is_world_process_zero:
                return
            with path.open("a") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
            line = " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in row.items() if k in shown)
            if line and not quiet:
                timing = (f"elapsed={clock_text(clock.elapsed_s())} "
                          f"eta={clock_text(clock.eta_s(state.global_step, state.max_steps))}")
                print(f"[{stage}] step {state.global_step}/{state.max_steps} {line} {timing}", flush=True)

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


@dataclass(frozen=True)
class FinalWeights:
    """Where a run's final weights go and what goes with them (the tokenizer, the base an adapter belongs to)."""

    out: Path
    tokenizer: Any
    lora: bool
    model_path: Path
    chat_template: str
    stage: str

    @property
    def target(self) -> Path:
        return self.out / ("adapter" if self.lora else "model")

    @property
    def key(self) -> str:
        return "adapter_dir" if self.lora else "model_dir"


@dataclass
class TrainRun:
    """How `train_until_stopped` ended: the Trainer's result (None when the last step was abandoned),
    the wall seconds, and what was exported when the run stopped early."""

    result: Any
    wall_s: float
    partial: dict


def train_until_stopped(trainer: Any, stop: GracefulStop, weights: FinalWeights,
                        on_trainer: Callable[[Any], None] | None = None, **train_kwargs: Any) -> TrainRun:
    """`train`, and what a run does when it does not reach its end (see `interrupt`): a stop at a step's
    end is checkpointed by the Trainer (StopOnSignal asks it to); a stop during a GRPO rollout abandons
    the step on every process and the last completed step is checkpointed here. Then, as after an error
    once a checkpoint exists, the newest checkpoint's weights go to adapter/ (or model/), marked partial:
    later stages and users have weights, while the exit code still says the run did not finish."""
    started = time.perf_counter()
    try:
        result, _ = train(trainer, on_trainer, **train_kwargs)
    except StepAbandoned:
        stop.signal_name = stop.requested or "SIGTERM"
        result = None
        step = trainer.state.global_step
        main_print(f"[{weights.stage}] {stop.signal_name}: step {step + 1} abandoned during its rollout; "
                   f"the run stops at step {step}")
        if step > 0 and not (Path(trainer.args.output_dir) / f"checkpoint-{step}").is_dir():
            # The model and optimizer are those of the last completed step: nothing of this one was applied.
            trl_compat.save_checkpoint(trainer)
    except BaseException as exc:
        try:
            export_partial(weights, (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:300])
        except Exception as export_error:  # the run's own error is the one to report
            main_print(f"[{weights.stage}] could not export the newest checkpoint's weights: {export_error}")
        raise
    partial = export_partial(weights, stop.signal_name) if stop.signal_name else {}
    return TrainRun(result, time.perf_counter() - started, partial)


PARTIAL_MARKER = "partial.json"
_ADAPTER_FILE = re.compile(r"adapter_model\.(safetensors|bin)|adapter_config\.json")
_MODEL_FILE = re.compile(r"(generation_)?config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def export_partial(weights: FinalWeights, stopped_by: str) -> dict:
    """The newest checkpoint's adapter (or full weights) copied to adapter/ (model/) with the tokenizer,
    as a finished run writes them, plus partial.json (the step and why the run stopped; the final save
    of a finished run removes it). Main process only and no collective: the others may be gone.
    Returns {adapter_dir | model_dir, partial_step}, or {} when there is no checkpoint to export."""
    from rlm_train.models.loading import write_adapter_meta
    from rlm_train.train.grpo_setup import checkpoint_step, checkpoints

    found = checkpoints(weights.out) if weights.out.is_dir() else []
    if not is_main_process() or not found:
        return {}
    checkpoint, pattern = found[-1], _ADAPTER_FILE if weights.lora else _MODEL_FILE
    files = [p for p in checkpoint.iterdir() if p.is_file() and pattern.fullmatch(p.name)]
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        main_print(f"[{weights.stage}] {checkpoint} holds no {'adapter' if weights.lora else 'model'} weights as files "
                   "(a sharded FSDP checkpoint?): nothing exported; resume the run to finish it")
        return {}
    step = checkpoint_step(checkpoint)
    target = weights.target
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for p in files:
        shutil.copy2(p, staging / p.name)
    weights.tokenizer.save_pretrained(staging)
    if weights.lora:
        write_adapter_meta(staging, str(weights.model_path), weights.chat_template)
    (staging / PARTIAL_MARKER).write_text(json.dumps({"step": step, "checkpoint": str(checkpoint),
                                                      "stopped_by": stopped_by}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    main_print(f"[{weights.stage}] partial result: {target} holds {checkpoint.name}'s weights (step {step}; "
               f"{target / PARTIAL_MARKER}); the run did not finish, so it exits non-zero and stages after it wait; "
               "run it again to resume")
    return {weights.key: str(target), "partial_step": step}


def save_trained(trainer: Any, tokenizer: Any, out: Path, lora: bool, model_path: Path, chat_template: str,
                 target: Path | None = None) -> dict:
    """adapter/ (LoRA, with the base it belongs to) or model/ (full weights), each with the tokenizer
    and its chat template; returns {adapter_dir | model_dir: path}. Every process must call it (FSDP
    gathers the weights from all of them); one writes. Fails, on every process, when no weight file
    was written."""
    from rlm_train.models.loading import write_adapter_meta

    saved_to = target or out / ("adapter" if lora else "model")
    full_state_dict_for_save(trainer)

    def save() -> None:
        trainer.save_model(str(saved_to))  # gathers FSDP/DeepSpeed shards; writes on the main process only
        if is_main_process():
            tokenizer.save_pretrained(saved_to)
            (saved_to / PARTIAL_MARKER).unlink(missing_ok=True)  # an early stop's export, now superseded
            if lora:
                write_adapter_meta(saved_to, str(model_path), chat_template)
            check_weights_written(saved_to, lora)

    fail_together(save, f"saving {saved_to}")
    return {"adapter_dir" if lora else "model_dir": str(saved_to)}


def full_state_dict_for_save(trainer: Any) -> None:
    """Under FSDP with SHARDED_STATE_DICT (what checkpoints want), `save_model` writes only the tokenizer:
    switch to a full state dict, gathered to the main process on CPU, for the final save."""
    plugin = getattr(getattr(trainer.accelerator, "state", None), "fsdp_plugin", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_weights_written(target: Path, lora: bool) -> None:
    names = ADAPTER_FILES if lora else WEIGHT_FILES
    if not any((target / name).is_file() for name in names):
        raise UserError(f"{target}: training finished but no weights were written (expected one of "
                        f"{', '.join(names)}); the checkpoints in {target.parent} hold the trained state")


def save_merged(adapter_dir: Path, model_path: Path, target: Path, dtype: str, chat_template: str) -> dict:
    """merged/: the saved adapter folded into a fresh fp32 copy of its base on the CPU, then cast to `dtype`
    (the trained model is left as it is, and sharded or wrapped models need no special case). Main
    process only; the others wait."""
    @main_process_only
    def merge() -> None:
        from rlm_train.models.loading import load_for_inference, torch_dtype

        model, tokenizer = load_for_inference(model_path, adapter_dir, dtype="float32", chat_template=chat_template)
        merged = model.merge_and_unload().to(torch_dtype(dtype))
        merged.save_pretrained(target)
        tokenizer.save_pretrained(target)
        check_weights_written(target, lora=False)

    merge()
    return {"merged_dir": str(target)}


def write_summary(out: Path, summary: dict) -> dict:
    """summary.json, written by the main process (every process gets the summary back)."""
    @main_process_only
    def write() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        from rlm_train.cards import write_run_cards  # model cards over PEFT's empty template, then push_to_hub

        write_run_cards(out, summary)

    write()
    return summary


def plan_footer(launch: LaunchSettings, command: str, source: str, problems: list[Problem]) -> list[str]:
    """The last lines of a training plan: the multi-GPU launch line, and what this machine lacks."""
    lines = []
    if launch.accelerate_config:
        lines.append(f"  launch       accelerate launch --config_file {launch.accelerate_config} "
                     f"--num_processes {launch.num_processes} -m rlm_train.cli {command} --recipe {source}")
    return lines + ([f"  MISSING HERE {p.message}" for p in problems] or ["  resources    ok on this machine"])
