"""Metrics of `generate` and `eval` runs to TensorBoard and W&B, when a config asks (`report_to`,
`wandb_project`).

The trainers report through TRL's callbacks; these stages have no trainer, so they write the same
sinks here. Nothing is reported unless asked: summary.json and report.json stay the record.

    tracker = open_tracker(config, Path("runs/gen"), config.model_dump())  # config.report_to: ["tensorboard"]
    tracker.log({"generate/episodes": 12.0}, step=12)
    tracker.close()

- TensorBoard: event files under OUT/tensorboard, written with the tensorboard package's own event
  writer (the one torch's SummaryWriter wraps), so no torch import.
- W&B: one run (`wandb.init(project=wandb_project, name=run_name, dir=OUT)`); WANDB_API_KEY,
  `wandb login` or WANDB_MODE=offline as usual.

A sink asked for but not installed is refused when the config is checked (dry runs too), not
skipped mid-run.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BeforeValidator

from rlm_train.errors import UserError

TENSORBOARD_DIR = "tensorboard"
# What `pip install` names for each sink, when it is missing.
INSTALL_HINT = {"tensorboard": "pip install tensorboard (in rlm-train[train])",
                "wandb": "pip install 'rlm-train[wandb]' (or pip install wandb)"}


def _as_list(value: Any) -> Any:
    """`report_to: wandb`, `report_to=tensorboard,wandb` and `report_to: none` as TRL reads them."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
        return [] if names in ([], ["none"]) else names
    return value


ReportTo = Annotated[list[Literal["tensorboard", "wandb"]], BeforeValidator(_as_list)]


class Tracked(Protocol):
    """A config with the three tracking keys (GenerateConfig, EvalConfig), documented there."""

    @property
    def report_to(self) -> Sequence[str]: ...

    @property
    def run_name(self) -> str | None: ...

    @property
    def wandb_project(self) -> str | None: ...


def wanted_sinks(settings: Tracked) -> list[str]:
    """report_to, plus wandb when a W&B project is set."""
    wanted = list(dict.fromkeys(settings.report_to))
    if settings.wandb_project and "wandb" not in wanted:
        wanted.append("wandb")
    return wanted


def check_tracking(settings: Tracked) -> None:
    """Refuse a sink that is asked for and not installed: one line naming the key and the install."""
    for sink in wanted_sinks(settings):
        if importlib.util.find_spec(sink) is None:
            if sink in settings.report_to:
                key, undo = "report_to", f"or drop {sink} from report_to"
            else:
                key, undo = "wandb_project", "or unset wandb_project"
            raise UserError(f"{key}: {sink} is asked for but not installed; {INSTALL_HINT[sink]}, {undo}")


def describe_tracking(settings: Tracked, out: str | Path | None) -> str:
    """The plan's line saying where the metrics go ("" when nothing beyond the run's own files)."""
    where = []
    for sink in wanted_sinks(settings):
        if sink == "tensorboard":
            where.append(f"TensorBoard ({Path(out or '.') / TENSORBOARD_DIR})")
        else:
            where.append(f"W&B project {settings.wandb_project or '(WANDB_PROJECT or wandb default)'}")
    return f"metrics: also to {', '.join(where)}" if where else ""


class Tracker:
    """The sinks of one run. `log` writes scalars at a step; `close` flushes and ends the run."""

    def __init__(self, sinks: list[str], out: Path, run_name: str, wandb_project: str | None,
                 config: Mapping[str, Any]):
        self.sinks = sinks
        self.events: Any = None
        self.wandb_run: Any = None
        if "tensorboard" in sinks:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.events = EventFileWriter(str(out / TENSORBOARD_DIR))
        if "wandb" in sinks:
            import wandb

            out.mkdir(parents=True, exist_ok=True)
            try:
                self.wandb_run = wandb.init(project=wandb_project, name=run_name, dir=str(out), config=dict(config))
            except Exception as exc:  # no login, no network: say so before any episode runs
                self.close()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"wandb: could not start a run ({first}); set WANDB_API_KEY or run `wandb login`, "
                                "or WANDB_MODE=offline to sync later") from None

    def log(self, scalars: Mapping[str, float | int | None], step: int) -> None:
        values = {tag: float(v) for tag, v in scalars.items() if v is not None}
        if not values:
            return
        if self.events is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
            self.events.add_event(Event(wall_time=time.time(), step=step, summary=summary))
            self.events.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def open_tracker(settings: Tracked, out: Path, config: Mapping[str, Any]) -> Tracker | None:
    """The run's tracker, or None when no sink is asked for."""
    sinks = wanted_sinks(settings)
    if not sinks:
        return None
    check_tracking(settings)
    return Tracker(sinks, out, settings.run_name or out.name, settings.wandb_project, config)


def generate_scalars(summary: Mapping[str, Any], prefix: str = "generate") -> dict[str, float | int | None]:
    """TensorBoard/W&B scalars of a generation summary (`RunSummary.as_dict`): counts, the mean score
    and pass rate per family, tokens, errors and throughput."""
    run = summary.get("this_run") or {}
    out: dict[str, float | int | None] = {
        f"{prefix}/episodes": summary["records"],
        f"{prefix}/mean_score": summary["mean_score"],
        f"{prefix}/errors": summary["outcomes"].get("error", 0),
        f"{prefix}/sub_calls": summary["sub_calls"],
        f"{prefix}/episodes_per_s": run.get("episodes_per_s"),
        f"{prefix}/tokens_per_s": run.get("tokens_per_s"),
        f"{prefix}/episode_wall_s_mean": summary["episode_wall_s"]["mean"],
    }
    for kind, count in summary["tokens"].items():
        out[f"{prefix}/tokens/{kind}"] = count
    for family, f in summary["by_family"].items():
        out[f"{prefix}/{family}/mean_score"] = f["mean_score"]
        out[f"{prefix}/{family}/final_rate"] = f["final_rate"]
        out[f"{prefix}/{family}/episodes"] = f["episodes"]
        out[f"{prefix}/{family}/errors"] = f["errors"]
    return out


def eval_scalars(report: Mapping[str, Any]) -> dict[str, float | int | None]:
    """Scalars of an eval report: per method its score (overall and per family), episodes, errors,
    costs and episodes per second of this run; per pair the score difference."""
    out: dict[str, float | int | None] = {}
    rates = (report.get("this_run") or {}).get("episodes_per_s", {})  # methods that ran episodes this run
    for name, m in report["methods"].items():
        score = m["score"]
        out[f"eval/{name}/score"] = score["all"]["mean"]
        for family, ci in score["by_family"].items():
            out[f"eval/{name}/{family}/score"] = ci["mean"]
        out[f"eval/{name}/episodes"] = m["episodes"]
        out[f"eval/{name}/errors"] = m.get("errors", 0)  # episodes with no scored answer, scored 0
        for key, value in m["cost"].items():
            out[f"eval/{name}/cost/{key}"] = value
        out[f"eval/{name}/episodes_per_s"] = rates.get(name)
    for pair in report.get("paired", []):
        out[f"eval/paired/{pair['b']}-{pair['a']}"] = pair["all"]["mean"]
    return out
