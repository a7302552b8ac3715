"""Trajectories -> SFT samples and an RL prompt set, the way the RLM paper built the
RLM-Qwen3-8B training set: keep episodes that answered correctly in more than one turn,
repair FINAL / FINAL_VAR misuse by rule, split each episode into one sample per root turn
(history so far as input, that turn as the only trained output), drop over-long turns,
dedupe, and split train/validation by task. With `sub_calls.enabled`, the kept episodes'
sub-calls become samples too (rollouts/subcall_samples.py), tagged `kind`, in the same split.

The RL prompt set never holds a task SFT trains on (GRPO on a task the model was taught to
solve learns little): tasks of this run's SFT samples and of `sft_data` are left out. With
`rl_only` the filter writes only the RL prompt set, each task's pass rate measured from the
trajectories it reads: those of the SFT model on the RL tasks, so the pass-rate window keeps
the tasks GRPO's starting policy solves sometimes but not always.

Every rule is a pure function of records, so each one is tested on hand-made trajectories.
The cell outputs in the samples are what each episode's REPL returned (`CELL_RESULTS_NOTE`,
written into filter_report.json): an earlier cell can decide what later cells return.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from rlm_train.config import StrictModel
from rlm_train.records import CELL_RESULTS_NOTE, Outcome, TaskRecord, TrajectoryRecord, TurnRecord
from rlm_train.rlm.parsing import CODE_FENCE_RE, FinalCall, find_final
from rlm_train.rollouts.datasets import message_feature, write_datasets
from rlm_train.rollouts.subcall_samples import ROOT_TURN, SUB_CALL, SubCallCounts, SubCallSamples


class FilterConfig(StrictModel):
    """`rlm-train filter`: which trajectories become training data."""

    trajectories: list[str] = Field(default_factory=list)
    """Run directories of `rlm-train generate` (or trajectory JSONL files)."""
    out: str | None = None
    """Output directory: sft/ and rl/ (datasets save_to_disk), *.jsonl, filter_report.json."""
    tasks: list[str] = Field(default_factory=list)
    """Task files for the RL prompt set and for scoring unscored records (default: each run's manifest)."""
    keep_outcomes: list[str] = Field(default_factory=lambda: [Outcome.FINAL.value])
    """Episode outcomes to keep; `final` = the model called FINAL by itself (not forced, no error)."""
    min_score: float = 0.0
    """Keep episodes whose score is strictly above this (0 drops zero-score episodes)."""
    drop_unscored: bool = True
    """Drop episodes without a score (no scorer ran); False keeps them for score-free data."""
    min_turns: int = Field(2, ge=1)
    """Drop episodes with fewer root turns (single-turn episodes never used the REPL's feedback)."""
    repair_final: bool = True
    """Rewrite FINAL / FINAL_VAR misuse in the answering turn into the form the prompt asks for."""
    max_turn_chars: int = Field(16_000, ge=1)
    """Drop samples whose trained output (one assistant turn) is longer than this."""
    max_sample_chars: int = Field(100_000, ge=1)
    """Drop samples whose whole conversation (history + output) is longer than this."""
    drop_turns_without_code: bool = True
    """Drop samples whose turn has neither a code block nor a FINAL (the loop had to nag)."""
    keep_forced_turns: bool = False
    """Train on the loop's answer-now turn too (keep `max_iterations` in keep_outcomes with it):
    for a model evaluated under a turn budget that ends with that prompt."""
    drop_error_turns: bool = False
    """Drop samples whose code raised an error (the recovery turns after them are kept)."""
    dedupe: bool = True
    """Drop samples whose whole conversation repeats an earlier sample exactly."""
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of tasks (never of turns) held out for validation."""
    split_seed: int = 0
    """Seed of the task split (a hash of seed and task id, stable when tasks are added)."""
    rl_min_pass_rate: float = Field(0.0, ge=0.0, le=1.0)
    """RL prompt set: keep tasks whose mean score over their episodes is at least this."""
    rl_max_pass_rate: float = Field(1.0, ge=0.0, le=1.0)
    """RL prompt set: keep tasks whose mean score is at most this (e.g. 0.9 drops always-solved tasks).
    With a window (min > 0 or max < 1), tasks without a scored episode are dropped too."""
    rl_only: bool = False
    """Write only the RL prompt set (rl/, rl-*.jsonl, filter_report.json), pass rates from these
    trajectories: for trajectories of the SFT model (GRPO's starting policy) on the RL tasks."""
    sft_data: list[str] = Field(default_factory=list)
    """SFT datasets (sft/ or sft-*.jsonl of an earlier `rlm-train filter`) whose tasks the RL prompt set
    leaves out; filter_report.json records them, and GRPO checks its prompts against them."""
    push_to_hub: bool = False
    """Upload the JSONL splits, the dataset card (README.md) and filter_report.json to the Hugging Face Hub."""
    hub_dataset_id: str | None = None
    """The Hub dataset repo, org/name or name (default: the output directory's name, under your account)."""
    hub_private_repo: bool = False
    """Create the Hub dataset repo private."""
    sub_calls: SubCallSamples = Field(default_factory=SubCallSamples)
    """Sub-call samples beside the root turns (sub_calls.enabled, .max_per_episode, .max_samples):
    one adapter then learns the root's programs and the sub-model's replies (rollouts/subcall_samples.py)."""


# ---------------------------------------------------------------------------------------
# Episode rules


def trajectory_drop_reason(traj: TrajectoryRecord, config: FilterConfig) -> str | None:
    """The first rule an episode breaks (a report key), or None to keep it."""
    if not _well_formed(traj):
        return "malformed"
    if traj.get("outcome") not in config.keep_outcomes:
        return f"outcome_{traj.get('outcome')}"
    score = traj.get("score")
    if score is None:
        return "unscored" if config.drop_unscored else None
    if score <= config.min_score:
        return "zero_score" if config.min_score == 0.0 else "low_score"
    if len(traj["turns"]) < config.min_turns:
        return "single_turn" if config.min_turns == 2 else "too_few_turns"
    return None


def _well_formed(traj: TrajectoryRecord) -> bool:
    """Turn i must be the i-th assistant message, or the per-turn split would be wrong."""
    turns, messages = traj.get("turns"), traj.get("messages")
    if not isinstance(turns, list) or not isinstance(messages, list) or not turns:
        return False
    assistant = [m.get("content") for m in messages if m.get("role") == "assistant"]
    return assistant == [t.get("assistant") for t in turns]


# ---------------------------------------------------------------------------------------
# FINAL / FINAL_VAR repairs. Only the answering turn is rewritten, and only into a form
# that gives the same answer: the canonical call inside a ```repl block.

_FINAL_VAR_BARE_RE = re.compile(r"\bFINAL_VAR\(\s*([A-Za-z_]\w*)\s*\)")
_PROSE_FINAL_LINE_RE = re.compile(r"^[ \t>*]*(?:FINAL_VAR|FINAL)\(", re.MULTILINE)


def _fences(text: str) -> list[re.Match]:
    """Code blocks the loop ran, in order (empty blocks are skipped, as the loop does)."""
    return [m for m in CODE_FENCE_RE.finditer(text) if m.group(2).strip("\n").strip()]


def repair_final_turn(turn: TurnRecord) -> tuple[str, list[str]]:
    """(repaired assistant text, names of the repairs applied) for the turn that answered."""
    text = turn["assistant"]
    repairs: list[str] = []
    answering_block = next((i for i, ex in enumerate(turn.get("executions") or []) if ex.get("final") is not None), None)

    if answering_block is None and turn.get("final") is not None:
        # FINAL(...) / FINAL_VAR(...) written in prose: the loop parsed it out of the text.
        call = find_final(text)
        if call is not None:
            text = _prose_final_to_block(text, call)
            repairs.append("final_var_outside_code" if call.kind == "FINAL_VAR" else "final_outside_code")
            answering_block = len(_fences(text)) - 1

    if answering_block is not None:
        fences = _fences(text)
        if answering_block < len(fences):
            block = fences[answering_block]
            # FINAL_VAR(answer) passes a value; the prompt asks for the name: FINAL_VAR("answer").
            code = block.group(0)
            fixed = _FINAL_VAR_BARE_RE.sub(lambda m: f'FINAL_VAR("{m.group(1)}")', code)
            if fixed != code:
                text = text[: block.start()] + fixed + text[block.end():]
                repairs.append("final_var_unquoted")
                block = _fences(text)[answering_block]
            # Blocks or prose after the answering block never ran and the model never saw them.
            if text[block.end():].strip():
                text = text[: block.end()]
                repairs.append("text_after_final")
    return text, repairs


def _prose_final_to_block(text: str, call: FinalCall) -> str:
    """Cut the text at the last prose line that starts FINAL/FINAL_VAR and append the call
    as a ```repl block; what followed it was never part of the answer."""
    code_spans = [(m.start(), m.end()) for m in CODE_FENCE_RE.finditer(text)]
    starts = [m.start() for m in _PROSE_FINAL_LINE_RE.finditer(text)
              if not any(a <= m.start() < b for a, b in code_spans)]
    head = text[: starts[-1]].rstrip() if starts else text.rstrip()
    if call.kind == "FINAL_VAR":
        block = f"```repl\nFINAL_VAR({call.argument!r})\n```"
    else:
        block = f"```repl\nFINAL({call.argument!r})\n```"
    return f"{head}\n\n{block}" if head else block


# ---------------------------------------------------------------------------------------
# Per-turn samples


@dataclass
class Sample:
    messages: list[dict[str, str]]  # history so far + this turn as the last (the only trained) message
    task_id: str | None
    family: str | None
    sample: int | None
    turn: int
    num_turns: int
    score: float | None
    trajectory_id: str | None
    policy: str | None
    repairs: list[str] = field(default_factory=list)
    kind: str = ROOT_TURN  # or SUB_CALL: [user: sub-call prompt, assistant: the sub-policy's reply]
    sub_policy: str | None = None  # the episode's sub-policy (who answered its sub-calls)

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def turn_samples(traj: TrajectoryRecord, config: FilterConfig, dropped: Counter[str]) -> list[Sample]:
    """One sample per root turn: the conversation up to that turn as input, the turn as output.
    Turn-level drops are counted in `dropped` by reason."""
    turns = traj["turns"]
    messages = traj["messages"]
    positions = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    out = []
    for i, (turn, pos) in enumerate(zip(turns, positions)):
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:pos]]
        output = turn["assistant"]
        repairs: list[str] = []
        if config.repair_final and turn.get("final") is not None:
            output, repairs = repair_final_turn(turn)
        reason = turn_drop_reason(turn, output, history, config)
        if reason:
            dropped[reason] += 1
            continue
        out.append(Sample(
            messages=history + [{"role": "assistant", "content": output}],
            task_id=traj["task_id"], family=traj.get("family"), sample=traj.get("sample"), turn=i,
            num_turns=len(turns), score=traj.get("score"), trajectory_id=traj.get("id"),
            policy=traj.get("policy"), repairs=repairs, sub_policy=traj.get("sub_policy"),
        ))
    return out


def turn_drop_reason(turn: TurnRecord, output: str, history: list[dict[str, str]], config: FilterConfig) -> str | None:
    if turn.get("forced") and not config.keep_forced_turns:
        return "forced_turn"  # the answer-now turn was prompted, not chosen
    if config.drop_turns_without_code and not turn.get("code_blocks") and turn.get("final") is None:
        return "no_code"
    if config.drop_error_turns and any(ex.get("error") for ex in turn.get("executions") or []):
        return "code_error"
    if len(output) > config.max_turn_chars:
        return "turn_too_long"
    if len(output) + sum(len(m["content"]) for m in history) > config.max_sample_chars:
        return "sample_too_long"
    return None


def sample_key(sample: Sample) -> str:
    return hashlib.sha256(json.dumps(sample.messages, ensure_ascii=False).encode()).hexdigest()


def dedupe(samples: list[Sample], dropped: Counter[str]) -> list[Sample]:
    seen: set[str] = set()
    out = []
    for s in samples:
        key = sample_key(s)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------
# Split by task


def split_tasks(task_ids: list[str], fraction: float, seed: int) -> set[str]:
    """Validation task ids: the tasks with the smallest hash(seed, id), round(fraction * n) of
    them (at least one when fraction > 0 and there are two or more tasks)."""
    ids = sorted(set(task_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    n_val = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    ranked = sorted(ids, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    return set(ranked[:n_val])


# ---------------------------------------------------------------------------------------
# The whole stage


def load_task_index(config: FilterConfig, manifests: list[dict[str, Any]],
                    problems: list[str] | None = None) -> dict[str, tuple[TaskRecord, str]]:
    """task_id -> (task, absolute task file) from --tasks, else the runs' manifests. Bad task
    lines are skipped quietly (generate reported them) and added to `problems`."""
    from pathlib import Path

    from rlm_train.rollouts.tasks_file import load_tasks

    files = list(config.tasks) or [m["tasks_file"] for m in manifests if m.get("tasks_file")]
    index: dict[str, tuple[TaskRecord, str]] = {}
    for name in files:
        path = Path(name)
        if not path.is_file():
            continue  # reported by the caller as a missing RL set
        tasks, bad = load_tasks(path, skip_bad_lines=True, warn=False)
        if problems is not None:
            problems += bad
        for task in tasks:
            index.setdefault(task["id"], (task, str(path.resolve())))
    return index


def select(config: FilterConfig) -> dict[str, Any]:
    """Read, score and filter: everything `run_filter` does before writing (a dry run shows
    it). `warning` says, before anything is written, when nothing at all is kept."""
    from pathlib import Path

    from rlm_train.errors import UserError
    from rlm_train.rollouts import store
    from rlm_train.rollouts.generate import load_scorer
    from rlm_train.rollouts.rl_prompts import prompt_rows, sft_task_ids
    from rlm_train.rollouts.subcall_samples import no_subcall_samples, select_subcall_samples, subcall_samples

    if not config.trajectories:
        raise UserError("no trajectories: pass --trajectories DIR (the --out of `rlm-train generate`)")
    if not config.out:
        raise UserError("no output directory: pass --out DIR or set `out` in the recipe")
    read = store.ReadStats()
    records: list[TrajectoryRecord] = []
    manifests = []
    for source in config.trajectories:
        records += store.read_records(source, read)
        if Path(source).is_dir() and (manifest := store.read_manifest(source)):
            manifests.append(manifest)
    if not records:
        raise UserError(f"{', '.join(config.trajectories)}: no trajectory records found")
    records.sort(key=lambda r: (str(r.get("task_id")), r.get("sample") or 0))
    bad_task_lines: list[str] = []
    tasks = load_task_index(config, manifests, bad_task_lines)
    earlier_sft_tasks = sft_task_ids(config.sft_data)

    # Records written without a scorer get scored here when their task is known.
    scorer = load_scorer()
    scored_here = 0
    if scorer is not None:
        from rlm_train.rollouts.generate import score_record

        for r in records:
            task_id = r.get("task_id")
            if r.get("score") is None and task_id is not None and task_id in tasks:
                score_record(r, tasks[task_id][0], scorer)
                scored_here += r.get("score") is not None

    dropped_episodes: Counter[str] = Counter()
    dropped_turns: Counter[str] = Counter()
    samples: list[Sample] = []
    sub_samples: list[Sample] = []
    sub_counts = SubCallCounts()
    kept = 0
    for traj in [] if config.rl_only else records:
        reason = trajectory_drop_reason(traj, config)
        if reason:
            dropped_episodes[reason] += 1
            continue
        kept += 1
        samples += turn_samples(traj, config, dropped_turns)
        if config.sub_calls.enabled:
            sub_samples += subcall_samples(traj, config, sub_counts)
    if config.dedupe:
        samples = dedupe(samples, dropped_turns)
    if config.sub_calls.enabled and not config.rl_only:
        sub_samples = select_subcall_samples(sub_samples, config, sub_counts)
        if kept and not sub_samples:  # asked for, and none to give: refuse before anything is written
            raise UserError(no_subcall_samples(config.trajectories, kept, sub_counts))
        samples += sub_samples

    validation = split_tasks([str(r.get("task_id")) for r in records], config.validation_fraction, config.split_seed)
    dropped_rl: Counter[str] = Counter()
    sft_tasks = {s.task_id for s in samples if s.task_id is not None} | earlier_sft_tasks
    rl_rows = prompt_rows(records, tasks, (config.rl_min_pass_rate, config.rl_max_pass_rate), dropped_rl, sft_tasks)
    # Tasks of the train split draw on the corpus items SFT's tasks show, though their ids differ.
    from_train_split = sum(1 for r in rl_rows if (tasks[r["task_id"]][0].get("meta") or {}).get("split") == "train")
    warning = None
    if config.rl_only:
        if not rl_rows:
            reasons = ", ".join(f"{k} {n}" for k, n in dropped_rl.most_common()) or "no task"
            warning = (f"{', '.join(config.trajectories)}: no RL prompt kept ({reasons}); widen rl_min_pass_rate / "
                       "rl_max_pass_rate or sample more episodes per task")
    elif not samples and not rl_rows:
        warning = nothing_kept(config, records, dropped_episodes)
    elif not samples:
        warning = (f"no SFT sample kept (episodes dropped: {', '.join(f'{k} {n}' for k, n in dropped_episodes.most_common())}"
                   "); only the RL prompt set has rows")
    return {"warning": warning, "records": records, "read": read, "tasks": tasks, "bad_task_lines": bad_task_lines,
            "scored_here": scored_here, "kept": kept, "samples": samples, "sub_calls": sub_counts, "validation": validation,
            "dropped_episodes": dropped_episodes, "dropped_turns": dropped_turns, "rl_rows": rl_rows,
            "dropped_rl": dropped_rl, "sft_tasks": sft_tasks, "from_train_split": from_train_split}


def nothing_kept(config: FilterConfig, records: list[TrajectoryRecord], dropped: Counter[str]) -> str:
    """Why a filter keeps nothing, and what to do, in one line."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in dropped.most_common())
    head = (f"{', '.join(config.trajectories)}: nothing to keep: all {len(records)} episodes were dropped "
            f"({reasons}), so the SFT and RL sets are empty and training on them would fail")
    errors = dropped.get(f"outcome_{Outcome.ERROR.value}", 0)
    if errors == len(records):
        first = next((r.get("error") or "" for r in records if r.get("error")), "").splitlines()
        return (f"{head}. Every episode failed ({first[0] if first else 'no error recorded'}): fix the cause "
                "and re-run `rlm-train generate` before training on this run")
    return (f"{head}. Loosen the filter (keep_outcomes, min_score, min_turns) or generate with a stronger "
            "policy (e.g. --policy scripted)")


def run_filter(config: FilterConfig) -> dict[str, Any]:
    """Read, filter, split and write; returns the filter report (also written as JSON)."""
    import sys
    from pathlib import Path

    from rlm_train.errors import UserError
    from rlm_train.formats import write_jsonl_atomic, write_text_atomic
    from rlm_train.rollouts.rl_prompts import write_rl_prompt_set

    from rlm_train.cards import check_hub_token, push_dataset_if_asked, write_dataset_card

    if config.push_to_hub:  # a missing token fails before the work, not after it
        check_hub_token("filter: push_to_hub")
    chosen = select(config)
    assert config.out is not None  # select refused None
    samples, validation, rl_rows, read = chosen["samples"], chosen["validation"], chosen["rl_rows"], chosen["read"]
    if config.rl_only and not rl_rows:
        raise UserError(chosen["warning"])  # the RL set is all this run makes: an empty one is nothing to train on
    if chosen["warning"]:
        print(f"warning: {chosen['warning']}", file=sys.stderr)
    sft = {"train": [s.row() for s in samples if s.task_id not in validation],
           "validation": [s.row() for s in samples if s.task_id in validation]}
    rl = {"train": [r for r in rl_rows if r["task_id"] not in validation],
          "validation": [r for r in rl_rows if r["task_id"] in validation]}

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if not config.rl_only:
        write_datasets(out / "sft", sft, _sft_features())
        for split in ("train", "validation"):
            write_jsonl_atomic(out / f"sft-{split}.jsonl", sft[split])
    write_rl_prompt_set(out, rl)
    # The SFT sets this RL set was made disjoint from: GRPO re-reads them to check its prompts.
    sft_sets = [str(Path(p).resolve()) for p in config.sft_data] + ([] if config.rl_only else [str((out / "sft").resolve())])

    repairs = Counter(name for s in samples for name in s.repairs)
    n_samples = sum(1 for s in samples if s.kind == ROOT_TURN)
    sub_counts: SubCallCounts = chosen["sub_calls"]
    tasks = chosen["tasks"]
    report = {
        "inputs": {"sources": list(config.trajectories), "files": read.files, "trajectories": len(chosen["records"]),
                   "torn_lines": read.torn_lines, "bad_lines": read.bad_lines, "duplicate_records": read.duplicates,
                   "bad_task_lines": chosen["bad_task_lines"], "scored_here": chosen["scored_here"]},
        "episodes": {"kept": chosen["kept"], "dropped": dict(sorted(chosen["dropped_episodes"].items()))},
        "turns": {"samples": n_samples, "dropped": dict(sorted(chosen["dropped_turns"].items()))},
        "repairs": {**dict(sorted(repairs.items())),
                    "samples_repaired": sum(1 for s in samples if s.repairs),
                    "fraction_repaired": round(sum(1 for s in samples if s.repairs) / n_samples, 4) if n_samples else 0.0},
        "sub_calls": {"enabled": config.sub_calls.enabled, "samples": len(samples) - n_samples,
                      "recorded": sub_counts.recorded, "dropped": dict(sorted(sub_counts.dropped.items())),
                      "sub_policies": dict(sorted(sub_counts.sub_policies.items())),
                      "sft": {split: sum(r["kind"] == SUB_CALL for r in rows) for split, rows in sft.items()}},
        "sft": {split: {"samples": len(rows), "tasks": len({r["task_id"] for r in rows})} for split, rows in sft.items()},
        "rl": {"train": len(rl["train"]), "validation": len(rl["validation"]),
               "dropped": dict(sorted(chosen["dropped_rl"].items())),
               "task_files": sorted({t[1] for t in tasks.values()}),
               "sft_data": sft_sets, "sft_tasks": len(chosen["sft_tasks"]),
               "from_train_split": chosen["from_train_split"]},
        "outputs": {**({} if config.rl_only else {"sft": str(out / "sft")}), "rl": str(out / "rl"), "jsonl": str(out)},
        "warning": chosen["warning"],
        "cell_results": CELL_RESULTS_NOTE,  # what the samples' tool outputs are
        "config": config.model_dump(),
    }
    write_text_atomic(out / "filter_report.json", json.dumps(report, indent=2) + "\n")
    write_dataset_card(out, report)
    if url := push_dataset_if_asked(out, config):
        print(f"pushed {out} to {url}", file=sys.stderr)
    return report


def _sft_features():
    from datasets import Features, Value

    return Features({
        "messages": message_feature(), "task_id": Value("string"), "family": Value("string"),
        "sample": Value("int64"), "turn": Value("int64"), "num_turns": Value("int64"),
        "score": Value("float64"), "trajectory_id": Value("string"), "policy": Value("string"),
        "repairs": [Value("string")], "kind": Value("string"), "sub_policy": Value("string"),
    })
