"""The eval report, a pure function of the records: `build_report` turns per-episode rows
into every number (report.json), `render_markdown` lays those same numbers out as tables
(report.md: the paper's Table 1 shape, method x family, plus cost columns), and
`write_plots` draws them (score against context length, per method).

    rows = {"base": [episode_row(r) for r in records_of_base], ...}
    report = build_report(task_infos, rows, methods=["base", "tuned"], pairs=[("base", "tuned")], ...)

A task's score is the mean over its samples; an episode that ended without a scored answer
(an error, a budget or the turns ran out, the scorer failed) scores 0 and is counted as an
error, never dropped. A cell whose task scores are all 0 or 1 gets the exact binomial
(Clopper-Pearson) interval, any other the percentile bootstrap over tasks
(`rlm_train.eval.stats.score_interval`); each cell says which and its n. Cost columns are
means per episode. Numbers are rounded once, here, and the markdown prints them as they
are, so report.md's numbers are report.json's.
"""

from __future__ import annotations

import math
import platform
import subprocess
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlm_train.eval.stats import BOOTSTRAP, EXACT, clopper_pearson, paired_bootstrap, score_interval
from rlm_train.records import TaskRecord, TrajectoryRecord

REPORT_SCHEMA = "rlm-train/eval-report/v1"
SCORE_DIGITS = 3
COST_DIGITS = {"root_tokens": 1, "sub_call_tokens": 1, "sub_calls": 2, "wall_s": 3}
COST_HEADERS = {"root_tokens": "root tokens", "sub_call_tokens": "sub-call tokens", "sub_calls": "sub-calls",
                "wall_s": "wall s"}
ALL = "all"
# What each kind of row is, in the caveats under report.md's table (and the labels beside the names).
ORACLE_NOTE = ("the oracle (gold-label lookup) is not a model: it answers sub-calls from the task suite's own "
               "corpus labels and planted facts, so a row whose sub-calls it answers is an upper bound for the "
               "program, not what a served model gets")
CONSTANT_NOTE = ("the constant-answer floor (fit on training tasks) reads nothing of the context: it gives every "
                 "task of a family one fixed answer per answer form, the one that scored best on the training tasks")


# --------------------------------------------------------------------------- inputs
def task_info(task: TaskRecord) -> dict[str, Any]:
    """What the report needs of a task: id, family, context length (the length it was
    made for, `meta.requested_tokens`, else its measured `meta.context_tokens`)."""
    meta = task.get("meta") or {}
    tokens = meta.get("requested_tokens", meta.get("context_tokens"))
    return {"id": task["id"], "family": task.get("family") or "-",
            "context_tokens": int(tokens) if isinstance(tokens, (int, float)) else None}


def episode_row(record: TrajectoryRecord) -> dict[str, Any]:
    """What the report needs of a trajectory: its task, sample, score and costs.
    Root tokens are the root turns' prompt + completion tokens; sub-call tokens are the
    rest of the call tree's (sub-calls and child RLMs)."""
    stats = record["stats"]
    root = stats["prompt_tokens"] + stats["completion_tokens"]
    return {
        "task_id": record.get("task_id"),
        "sample": record.get("sample"),
        "score": record.get("score"),
        "answered": record.get("final") is not None,
        "outcome": str(record["outcome"]),
        "root_tokens": root,
        "sub_call_tokens": max(0, stats.get("tokens_total", root) - root),
        "sub_calls": stats.get("subcalls_total", stats["sub_calls"]),
        "wall_s": stats.get("wall_s", stats["episode_wall_s"]),
    }


# --------------------------------------------------------------------------- numbers
def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ci(values: Sequence[float], bootstrap: Mapping[str, Any], label: str) -> dict[str, Any]:
    out = score_interval(values, resamples=bootstrap["resamples"], confidence=bootstrap["confidence"],
                         seed=bootstrap["seed"], label=label)
    return {k: (_round(v, SCORE_DIGITS) if k in ("mean", "lo", "hi") else v) for k, v in out.items()}


def errored(row: Mapping[str, Any]) -> bool:
    """An episode with no scored answer: it scores 0 and counts as an error."""
    return row["score"] is None or row["outcome"] == "error" or row.get("answered") is False


def method_label(meta: Mapping[str, Any]) -> str | None:
    """What a row is, when its name may not say: an oracle or a constant floor."""
    specs = (meta.get("policy"), meta.get("sub_policy"))
    if "constant" in specs:
        return "constant-answer floor, fit on training tasks"
    if specs[0] == "oracle":
        return "oracle (gold-label lookup) answers"
    if "oracle" in specs:
        return "sub-calls: oracle (gold-label lookup)"
    return None


def _paired(a: Mapping[str, float], b: Mapping[str, float], bootstrap: Mapping[str, Any], label: str) -> dict[str, Any]:
    out = paired_bootstrap(a, b, resamples=bootstrap["resamples"], confidence=bootstrap["confidence"],
                           seed=bootstrap["seed"], label=label)
    return {k: (_round(v, SCORE_DIGITS) if k in ("mean", "lo", "hi") else _round(v, 4) if k == "sign_test_p" else v)
            for k, v in out.items()}


def tokens_label(tokens: int | None) -> str:
    """8000 -> "8k", 1500 -> "1500", None -> "?"."""
    if tokens is None:
        return "?"
    return f"{tokens // 1000}k" if tokens % 1000 == 0 else str(tokens)


def build_report(tasks: Sequence[Mapping[str, Any]], rows: Mapping[str, Sequence[Mapping[str, Any]]], *,
                 methods: Sequence[str], pairs: Sequence[tuple[str, str]], bootstrap: Mapping[str, Any],
                 samples: int = 1, header: Mapping[str, Any] | None = None,
                 method_meta: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Every number of the report, from task infos (`task_info`) and each method's episode
    rows (`episode_row`). Rows of tasks not in `tasks`, or of samples >= `samples`, are
    left out (a store may hold more than this eval asks for). `bootstrap` has resamples,
    confidence and seed; `header` (config, versions, overlap, ...) and `method_meta`
    (policy specs, run dirs) are copied in as they are."""
    by_id = {t["id"]: t for t in tasks}
    families = list(dict.fromkeys(t["family"] for t in tasks))
    lengths = sorted({t["context_tokens"] for t in tasks if t["context_tokens"] is not None})
    if any(t["context_tokens"] is None for t in tasks):
        lengths_keys = [str(n) for n in lengths] + ["?"]
    else:
        lengths_keys = [str(n) for n in lengths]

    def length_key(task: Mapping[str, Any]) -> str:
        return str(task["context_tokens"]) if task["context_tokens"] is not None else "?"

    report: dict[str, Any] = {"schema": REPORT_SCHEMA, **(header or {})}
    report["bootstrap"] = {"resamples": bootstrap["resamples"], "confidence": bootstrap["confidence"],
                           "seed": bootstrap["seed"], "unit": "task (the mean of its samples)",
                           "method": "percentile"}
    report["intervals"] = {EXACT: "Clopper-Pearson exact binomial interval: every task of the cell scored 0 or 1",
                           BOOTSTRAP: "percentile bootstrap over tasks: graded scores (partial credit, or a mean "
                                      "over samples)",
                           "errors": "an episode with no scored answer (an error, a budget or the turns ran out, "
                                     "the scorer failed) scores 0 and counts in n"}
    report["samples"] = samples
    report["tasks"] = {
        "count": len(tasks),
        "by_family": dict(Counter(t["family"] for t in tasks)),
        "by_context_tokens": {k: sum(1 for t in tasks if length_key(t) == k) for k in lengths_keys},
    }
    report["families"] = families
    report["context_tokens"] = lengths_keys
    task_scores: dict[str, dict[str, float]] = {}
    report["methods"] = {}
    for name in methods:
        kept = [r for r in rows.get(name, ()) if r["task_id"] in by_id and (r["sample"] or 0) < samples]
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in kept:  # an errored episode scores 0: dropping it would raise the mean
            per_task[r["task_id"]].append(0.0 if errored(r) else float(r["score"]))
        scores = {tid: math.fsum(v) / len(v) for tid, v in per_task.items()}
        task_scores[name] = scores
        ordered = [tid for tid in by_id if tid in scores]  # task-file order: the resampling is reproducible

        def ci(keep, label: str, name: str = name, ordered: list[str] = ordered,
               scores: dict[str, float] = scores) -> dict[str, Any]:
            return _ci([scores[tid] for tid in ordered if keep(by_id[tid])], bootstrap, f"{name}/{label}")

        cost = {key: (_round(math.fsum(r[key] for r in kept) / len(kept), digits) if kept else None)
                for key, digits in COST_DIGITS.items()}
        meta = (method_meta or {}).get(name, {})
        errors = [by_id[r["task_id"]]["family"] for r in kept if errored(r)]
        report["methods"][name] = {
            **meta,
            "label": method_label(meta),
            "episodes": len(kept),
            "expected_episodes": len(tasks) * samples,
            "scored": sum(r["score"] is not None for r in kept),
            "errors": len(errors),
            "errors_by_family": {f: errors.count(f) for f in families},
            "outcomes": dict(sorted(Counter(r["outcome"] for r in kept).items())),
            "tasks_scored": len(scores),
            "score": {
                ALL: ci(lambda t: True, ALL),
                "by_family": {f: ci(lambda t, f=f: t["family"] == f, f"family={f}") for f in families},
                "by_context_tokens": {k: ci(lambda t, k=k: length_key(t) == k, f"tokens={k}") for k in lengths_keys},
                "by_family_and_context_tokens": {
                    f: {k: ci(lambda t, f=f, k=k: t["family"] == f and length_key(t) == k, f"family={f}/tokens={k}")
                        for k in lengths_keys if any(t["family"] == f and length_key(t) == k for t in tasks)}
                    for f in families},
            },
            "cost": cost,
        }
    report["paired"] = []
    for a, b in pairs:
        sa, sb = task_scores.get(a, {}), task_scores.get(b, {})
        by_family = {}
        for f in families:
            fa = {tid: s for tid, s in sa.items() if by_id[tid]["family"] == f}
            fb = {tid: s for tid, s in sb.items() if by_id[tid]["family"] == f}
            by_family[f] = _paired(fa, fb, bootstrap, f"paired/{a}/{b}/family={f}")
        report["paired"].append({"a": a, "b": b, "difference": "b - a",
                                 ALL: _paired(sa, sb, bootstrap, f"paired/{a}/{b}/{ALL}"), "by_family": by_family})
    return report


# --------------------------------------------------------------------------- markdown
def _score_cell(ci: Mapping[str, Any]) -> str:
    """"0.750 [0.428, 0.945] (exact, n=12)": the mean, its interval, which interval, n."""
    if ci["mean"] is None:
        return "-"
    d = SCORE_DIGITS
    return f"{ci['mean']:.{d}f} [{ci['lo']:.{d}f}, {ci['hi']:.{d}f}] ({ci.get('interval') or BOOTSTRAP}, n={ci['n']})"


def _name_cell(name: str, method: Mapping[str, Any]) -> str:
    return f"{name} ({method['label']})" if method.get("label") else name


def caveats(report: Mapping[str, Any]) -> str:
    """The paragraph under the score table: what the intervals, the errors and the special rows are."""
    pct = f"{report['bootstrap']['confidence'] * 100:g}%"
    all_of_12 = clopper_pearson(12, 12, report["bootstrap"]["confidence"])[0]
    parts = [f"Intervals are {pct}: *exact* marks a cell whose task scores are all 0 or 1 (the Clopper-Pearson "
             f"binomial interval: 12 of 12 is [{all_of_12:.3f}, 1.000], not [1, 1]); *bootstrap* marks graded scores "
             "(partial credit, or a mean over samples), with the percentile bootstrap over tasks; n counts tasks. "
             "An episode that ended without a scored answer scores 0 and is counted in `errors`, never dropped."]
    specs = [(m.get("policy"), m.get("sub_policy")) for m in report["methods"].values()]
    if any("oracle" in pair for pair in specs):
        parts.append(ORACLE_NOTE[0].upper() + ORACLE_NOTE[1:] + ".")
    if any("constant" in pair for pair in specs):
        parts.append(CONSTANT_NOTE[0].upper() + CONSTANT_NOTE[1:] + ".")
    if any(m.get("direct") for m in report["methods"].values()):
        parts.append("A *direct* row is the model given the query and the context (cut to its window) in one "
                     "prompt, no code and no sub-calls: the paper's base rows.")
    if any(m.get("one_shot") for m in report["methods"].values()):
        parts.append("A *one-shot* row is the model given one solved teacher trajectory of the task's family "
                     "(a training task) as a worked example in its system prompt.")
    return " ".join(parts)


def _signed_cell(ci: Mapping[str, Any]) -> tuple[str, str]:
    if ci["mean"] is None:
        return "-", "-"
    d = SCORE_DIGITS
    return f"{ci['mean']:+.{d}f}", f"[{ci['lo']:+.{d}f}, {ci['hi']:+.{d}f}]"


def _cost_cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(head: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: the numbers of `report` (as rounded there) in tables."""
    families, lengths = report["families"], report["context_tokens"]
    methods = report["methods"]
    boot = report["bootstrap"]
    pct = f"{boot['confidence'] * 100:g}%"
    tasks = report["tasks"]
    lines = ["# Eval report", ""]
    counts = ", ".join(f"{f} {n}" for f, n in tasks["by_family"].items())
    lines.append(f"{tasks['count']} held-out tasks ({counts}) x {report['samples']} sample(s) per method. "
                 f"Scores are means over tasks (a task's score is the mean of its samples), with {pct} "
                 f"intervals: exact binomial for 0/1 scores, else percentile bootstrap ({boot['resamples']} "
                 f"resamples over tasks, seed {boot['seed']}). "
                 "Cost columns are means per episode; sub-call tokens count the whole call tree below the root.")
    overlap = report.get("overlap")
    if overlap and overlap.get("shared"):
        shared = ", ".join(f"{n} {kind}" for kind, n in overlap["shared"].items())
        lines += ["", f"**Warning:** {overlap['tasks']} of these tasks share keys with the training set "
                      f"({', '.join(overlap['train_tasks'])}): {shared}. Their scores are not held-out scores."]
    lines += ["", "## Scores by family", ""]
    head = ["method", *families, ALL, "errors", *COST_HEADERS.values()]
    rows = []
    for name, m in methods.items():
        rows.append([_name_cell(name, m), *(_score_cell(m["score"]["by_family"][f]) for f in families),
                     _score_cell(m["score"][ALL]), str(m.get("errors", 0)),
                     *(_cost_cell(m["cost"][k], COST_DIGITS[k]) for k in COST_HEADERS)])
    lines += _table(head, rows, ["---"] + ["---:"] * (len(head) - 1))
    lines += ["", caveats(report)]
    lines += ["", "## Scores by context length", ""]
    head = ["method", *(tokens_label(int(k)) if k != "?" else "?" for k in lengths)]
    rows = [[_name_cell(name, m), *(_score_cell(m["score"]["by_context_tokens"][k]) for k in lengths)]
            for name, m in methods.items()]
    lines += _table(head, rows, ["---"] + ["---:"] * len(lengths))
    if report["paired"]:
        lines += ["", f"## Paired comparisons (B - A on the tasks both scored, {pct} paired bootstrap)", ""]
        head = ["B - A", "tasks", "difference", f"{pct} CI", "B better / worse / tied", "sign test p"]
        rows = []
        for p in report["paired"]:
            diff, ci = _signed_cell(p[ALL])
            p_value = p[ALL].get("sign_test_p")
            rows.append([f"{p['b']} - {p['a']}", str(p[ALL]["n"]), diff, ci,
                         f"{p[ALL]['wins']} / {p[ALL]['losses']} / {p[ALL]['ties']}",
                         "-" if p_value is None else f"{p_value:.4f}"])
        lines += _table(head, rows, ["---", "---:", "---:", "---:", "---:", "---:"])
        lines += ["", "The sign test is exact, on the tasks one method won (ties left out); for 0/1 scores it is "
                      "McNemar's exact test."]
    lines += ["", "## Runs", ""]
    head = ["method", "mode", "policy", "sub-policy", "episodes", "outcomes", "run dir"]
    rows = []
    for name, m in methods.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in m["outcomes"].items()) or "-"
        mode = ("direct" if m.get("direct") else f"rlm, one-shot from `{m['one_shot']}`" if m.get("one_shot")
                else "constant floor (no context read)" if m.get("policy") == "constant" else "rlm")
        rows.append([name, mode, f"`{m.get('policy', '-')}`",
                     f"`{m.get('sub_policy') or '-'}`", f"{m['episodes']} / {m['expected_episodes']}", outcomes,
                     f"`{m.get('run_dir', '-')}`"])
    lines += _table(head, rows, ["---"] * len(head))
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    versions = report.get("versions")
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
def write_plots(report: Mapping[str, Any], directory: str | Path) -> list[str]:
    """PNG plots of score against context length (every family together, then one panel
    per family), one line per method with its interval; paths relative to the report's
    directory. [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    directory = Path(directory)
    (directory / "plots").mkdir(parents=True, exist_ok=True)
    keys = [k for k in report["context_tokens"] if k != "?"]
    if not keys:
        return []
    xs = [int(k) for k in keys]
    panels = [(ALL, None)] + [(f, f) for f in report["families"]]
    written = []
    for filename, shown in (("score_vs_context.png", panels[:1]), ("score_vs_context_by_family.png", panels[1:])):
        if not shown:
            continue
        cols = min(3, len(shown))
        rows_n = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
        for ax, (title, family) in zip(axes.flat, shown):
            for name, m in report["methods"].items():
                points = []
                for x, k in zip(xs, keys):
                    ci = m["score"]["by_context_tokens"][k] if family is None else _family_length(report, name, family, k)
                    if ci is not None and ci["mean"] is not None:
                        points.append((x, ci["mean"], ci["mean"] - ci["lo"], ci["hi"] - ci["mean"]))
                if points:
                    px, py, lo, hi = zip(*points)
                    ax.errorbar(px, py, yerr=[lo, hi], marker="o", capsize=3, label=name)
            ax.set_title(title)
            ax.set_xlabel("context tokens")
            ax.set_ylabel("score")
            ax.set_ylim(-0.05, 1.05)
            if len(xs) > 1 and xs[-1] / max(1, xs[0]) >= 4:
                ax.set_xscale("log")
            ax.set_xticks(xs, [tokens_label(x) for x in xs])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(directory / "plots" / filename, dpi=100)
        plt.close(fig)
        written.append(f"plots/{filename}")
    return written


def _family_length(report: Mapping[str, Any], method: str, family: str, key: str) -> dict[str, Any] | None:
    return report["methods"][method]["score"]["by_family_and_context_tokens"].get(family, {}).get(key)


# --------------------------------------------------------------------------- versions
def versions() -> dict[str, str | None]:
    """python, rlm-train (with the git commit of its checkout, when it is one), torch and
    transformers (when installed; read from package metadata, nothing is imported)."""
    from importlib import metadata

    from rlm_train.version import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "rlm-train": __version__}
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out["git commit"] = commit.stdout.strip()[:12] + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for package in ("torch", "transformers", "vllm"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out
