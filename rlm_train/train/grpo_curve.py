"""GRPO's reward curve: `rewards.csv` (one row per optimizer step) and `reward.png` in the run's
output_dir, from the steps' records in metrics.jsonl (a resumed run has already dropped the records of
the steps it trains again, so each step appears once)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

# metrics.jsonl keys copied to the CSV when a step logged them (TRL's names and rlm-train's rlm/*).
COLUMNS = ("step", "time", "reward", "reward_std", "frac_reward_zero_std", "rlm/answered_frac",
           "rlm/overlong_frac", "rlm/infra_error_frac", "loss")


def reward_rows(metrics: Path) -> list[dict[str, Any]]:
    """The step records that carry a reward, one per step (the last record of a step wins), in step order."""
    if not metrics.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash: the rerun logs that step again
        if isinstance(record, dict) and isinstance(record.get("reward"), (int, float)):
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def write_reward_curve(out: Path) -> list[str]:
    """rewards.csv and reward.png (matplotlib, Agg) in `out` from out/metrics.jsonl; the names written
    (the plot is left out when matplotlib is not installed, nothing is written without a logged reward)."""
    from rlm_train.formats import write_text_atomic

    rows = reward_rows(out / "metrics.jsonl")
    if not rows:
        return []
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row[key] for key in COLUMNS])
    write_text_atomic(out / "rewards.csv", text.getvalue())
    written = ["rewards.csv"]
    if _plot(rows, out / "reward.png"):
        written.append("reward.png")
    return written


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [row["step"] for row in rows]
    mean = [row["reward"] for row in rows]
    std = [row.get("reward_std") or 0.0 for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, mean, marker="o", markersize=3, label="mean reward of the step's episodes")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    label="± std within the step")
    if len(rows) >= 5:  # a trailing mean shows the trend through the noise of small batches
        window = 5
        trend = [sum(mean[max(0, i - window + 1):i + 1]) / len(mean[max(0, i - window + 1):i + 1])
                 for i in range(len(mean))]
        ax.plot(steps, trend, label=f"mean of the last {window} steps")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
