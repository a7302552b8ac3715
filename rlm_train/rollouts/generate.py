"""Concurrent, resumable trajectory generation.

    summary = run_generate(GenerateConfig(tasks="tasks.jsonl", out="runs/gen", policy="scripted", samples=4))

Episodes run on one asyncio loop, `concurrency` at a time, sharing one client per policy
(requests spread over all --base-url servers). Each finished episode is appended to this
process's shard as one line, so a crash loses only episodes in flight, and a re-run of the
same command skips every (task_id, sample) already recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pydantic import Field

from rlm_train import eventloop
from rlm_train.config import StrictModel, bounded
from rlm_train.errors import UserError
from rlm_train.formats import append_jsonl, load_task_context, write_text_atomic
from rlm_train.models.base import Policy
from rlm_train.policies.spec import ClientOptions
from rlm_train.policies.spec import build_policies as build_policies_from_specs
from rlm_train.records import ErrorKind, Outcome, TaskRecord, TrajectoryRecord
from rlm_train.rlm.loop import RLMConfig
from rlm_train.rollouts import store
from rlm_train.rollouts.progress import Progress, StopOnSignals, Stopped, streamed_tokens
from rlm_train.rollouts.shards import shard_pairs
from rlm_train.rollouts.tracking import ReportTo, Tracker, check_tracking, generate_scalars, open_tracker
from rlm_train.rollouts.tasks_file import load_tasks



class GenerateConfig(StrictModel):
    """`rlm-train generate`: which tasks, which policies, how many samples, where to write."""

    tasks: str | None = None
    """Task file (rlm-train/task/v1 JSONL), e.g. from `rlm-train tasks make`."""
    out: str | None = None
    """Run directory: manifest.json, shard-*.jsonl, summary.json. Re-running the same command resumes."""
    policy: str | None = None
    """Root policy spec: scripted | openai:MODEL | hf:MODEL[+adapter:PATH]."""
    sub_policy: str | None = None
    """Policy for sub-calls (llm_query); default: the root policy."""
    base_urls: list[str] = Field(default_factory=list)
    """OpenAI-compatible servers for openai: policies; requests spread over all of them."""
    sub_base_urls: list[str] = Field(default_factory=list)
    """Servers for the sub-policy (default: base_urls)."""
    samples: int = bounded(1, ge=1, le=10_000,
                           why="every (task, sample) pair of a run is listed in memory before it starts; pass@k"
                               " curves and GRPO groups need far fewer")
    """Episodes per task (sample index 0..samples-1)."""
    concurrency: int = bounded(32, ge=1, le=200,
                               why="each episode in flight holds a REPL sandbox and one process holds at most "
                                   "256, the fork-server's spares among them; for more, split the run into "
                                   "shards (--shard I/N), one process each")
    """Episodes in flight at once."""
    skip_bad_lines: bool = False
    """Skip task lines that are not valid tasks (each reported with its line number) instead of stopping."""
    shard_index: int = Field(0, ge=0)
    """This process runs the (task, sample) pairs rollouts/shards.py assigns to it (e.g. a Slurm array task)."""
    num_shards: int = Field(1, ge=1)
    """Processes splitting the task file between them, all writing into the same run directory."""
    client: ClientOptions = Field(default_factory=lambda: ClientOptions(max_concurrency=1024))
    """How openai: policies talk to their servers (request_timeout_s, max_retries, max_concurrency)."""
    max_consecutive_failures: int = Field(32, ge=1)
    """Stop when this many episodes in a row got no answer from the server; they are not recorded,
    so a re-run retries them. Episodes that fail between successes are recorded with their error."""
    progress: bool = True
    """Show progress (rate, ETA, running mean score) on stderr: a bar on a terminal, plain lines elsewhere."""
    progress_every_s: float = Field(30.0, gt=0, le=86_400)
    """Seconds between plain progress lines where stderr is not a terminal (Slurm logs, pipes), and
    between the scalars sent to report_to during the run."""
    report_to: ReportTo = []
    """Metric sinks: tensorboard (event files under OUT/tensorboard), wandb; none by default.
    Scalars every progress_every_s and at the end. A sink named here must be installed (--dry-run checks)."""
    run_name: str | None = None
    """Run name in TensorBoard / W&B (default: the output directory's name)."""
    wandb_project: str | None = None
    """W&B project; setting it turns W&B on (WANDB_API_KEY, `wandb login` or WANDB_MODE=offline as usual)."""
    rlm: RLMConfig = Field(default_factory=RLMConfig)
    """How each episode runs (turns, depth, budgets, sandbox limits)."""


class ServerDown(UserError):
    pass


def run_identity(config: GenerateConfig, task_file: Path, tasks_sha256: str) -> dict[str, Any]:
    """The manifest: what must match for a re-run to continue this run."""
    return {
        "schema": store.MANIFEST_SCHEMA,
        "tasks_sha256": tasks_sha256,
        "tasks_file": str(task_file.resolve()),
        "policy": config.policy,
        "sub_policy": config.sub_policy,
        "samples": config.samples,
        "rlm": config.rlm.model_dump(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


Scorer = Callable[[Any, Any], float]  # (task, answer) -> score: rlm_train.tasks.score


def build_policies(config: GenerateConfig):
    return build_policies_from_specs(config.policy, config.sub_policy, config.base_urls, config.sub_base_urls,
                                     config.client)


def load_scorer() -> Scorer | None:
    """rlm_train.tasks.score(task, answer) when the task suite is installed, else None."""
    try:
        from rlm_train.tasks import score
    except ImportError:
        return None
    return score


def score_record(record: TrajectoryRecord, task: Mapping[str, Any], scorer: Scorer | None) -> None:
    """Fill record["score"]: the task's scorer on the final answer (0 when there is none).
    Episodes the server failed get no score: they say nothing about the policy."""
    if scorer is None or record["outcome"] == Outcome.ERROR:
        return
    if record["final"] is None:
        record["score"] = 0.0
        return
    try:
        record["score"] = float(scorer(task, record["final"]))
    except Exception as exc:  # a scorer bug must not stop the run; it stays visible in the record
        record["score_error"] = f"{type(exc).__name__}: {exc}"


class _Contexts:
    """Each task's context is loaded once while any of its samples runs, then dropped."""

    def __init__(self, task_file: Path, samples_left: dict[str, int]):
        self.task_file = task_file
        self.samples_left = samples_left
        self.loaded: dict[str, asyncio.Task] = {}

    async def get(self, task: TaskRecord) -> Any:
        if "context" in task:
            return task["context"]
        if task["id"] not in self.loaded:
            self.loaded[task["id"]] = asyncio.create_task(asyncio.to_thread(load_task_context, task, self.task_file))
        return await self.loaded[task["id"]]

    def release(self, task: TaskRecord) -> None:
        self.samples_left[task["id"]] -= 1
        if self.samples_left[task["id"]] == 0:
            self.loaded.pop(task["id"], None)


# Episodes the server failed (it did not answer, or refused the request): held back, not recorded.
SERVER_SIDE = (ErrorKind.MODEL, ErrorKind.REFUSED)


class _Writer:
    """Appends records to this process's shard; holds back a streak of episodes that got
    no answer from the server, so that a dead server stops the run without marking those
    (task, sample) pairs as done."""

    def __init__(self, shard: Path, max_streak: int, summary: RunSummary):
        self.shard = shard
        self.max_streak = max_streak
        self.summary = summary
        self.streak: list[TrajectoryRecord] = []
        self.written = 0
        self.answered = 0  # episodes in this process run that were not model-call failures

    def add(self, record: TrajectoryRecord) -> None:
        if record["outcome"] == Outcome.ERROR and record.get("error_kind") in SERVER_SIDE:
            self.streak.append(record)
            if len(self.streak) >= self.max_streak:
                raise ServerDown(self._down_message())
            return
        self.answered += 1
        self.flush()
        self._append(record)

    def flush(self) -> None:
        for record in self.streak:
            self._append(record)
        self.streak = []

    def finish(self) -> None:
        """End of run: a streak with no answered episode at all means the server never answered."""
        if self.streak and self.answered == 0:
            raise ServerDown(self._down_message())
        self.flush()

    def _append(self, record: TrajectoryRecord) -> None:
        append_jsonl(self.shard, record)
        self.summary.add(record)
        self.written += 1

    def _down_message(self) -> str:
        last = self.streak[-1]
        error = (last["error"] or "").splitlines()[0]
        if last.get("error_kind") == ErrorKind.REFUSED:  # the server answered, with a refusal: the config, not the server
            return (
                f"the server refused {len(self.streak)} episodes in a row, stopping ({error}). They were not "
                "recorded. Make the requests fit the server (a larger --max-model-len on the server, or smaller "
                "rlm.root_max_tokens / rlm.sub_model_chars), then re-run the same command"
            )
        return (
            f"{len(self.streak)} episodes in a row got no answer from the server, stopping ({error}). "
            f"They were not recorded: re-run the same command to retry them"
        )


async def _run_jobs(jobs: list[tuple[TaskRecord, int]], config: GenerateConfig, policy: Policy, sub_policy: Policy | None,
                    task_file: Path, scorer: Scorer | None, writer: _Writer, progress: Progress,
                    tracker: Tracker | None = None) -> None:
    from rlm_train.rlm import run_episode

    samples_left = Counter(task["id"] for task, _ in jobs)
    contexts = _Contexts(task_file, samples_left)
    queue: Iterator[tuple[TaskRecord, int]] = iter(jobs)

    async def episode(task: TaskRecord, k: int) -> None:
        context = await contexts.get(task)
        hints = {"family": task.get("family"), "task_id": task["id"], "sample": k, "meta": task.get("meta") or {}}
        record = await run_episode(task["query"], context, policy, sub_policy, config.rlm, hints=hints, task_id=task["id"],
                                   on_turn=progress.turn)
        contexts.release(task)
        record["sample"] = k
        record["family"] = task.get("family")
        score_record(record, task, scorer)
        writer.add(record)
        progress.update(record)

    async def worker() -> None:
        # The shared iterator hands each (task, sample) to exactly one worker.
        for task, k in queue:
            await episode(task, k)

    async def ticker() -> None:  # signs of life while no episode finishes
        reported = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, config.progress_every_s))
            progress.tick()
            if tracker is not None and time.monotonic() - reported >= config.progress_every_s:
                reported = time.monotonic()
                tracker.log(_live_scalars(writer, progress), step=writer.summary.records)

    tick = asyncio.create_task(ticker())
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(config.concurrency, len(jobs))):
                group.create_task(worker())
    finally:
        tick.cancel()


def check_config(config: GenerateConfig) -> None:
    """What run_generate refuses before any work (dry runs check the same)."""
    if not config.tasks:
        raise UserError("no task file: pass --tasks FILE or set `tasks` in the recipe")
    if not config.out:
        raise UserError("no output directory: pass --out DIR or set `out` in the recipe")
    if config.shard_index >= config.num_shards:
        raise UserError(f"shard_index {config.shard_index} must be below num_shards {config.num_shards}")
    check_tracking(config)


def run_generate(config: GenerateConfig, policy=None, sub_policy=None) -> dict[str, Any]:
    """Run (or resume) a generation run and return its summary. Policies may be passed in
    (tests, benchmarks); otherwise they are built from the config's specs."""
    check_config(config)
    assert config.tasks and config.out  # for the type checker: check_config refused None
    task_file = Path(config.tasks)
    tasks, problems = load_tasks(task_file, config.skip_bad_lines)
    for field in ("policy", "sub_policy"):
        if getattr(config, field) == "oracle":  # a gold-label lookup: only tasks of the suite's own corpora
            from rlm_train.policies.oracle import refuse_oracle_tasks

            refuse_oracle_tasks(f"the {field}", tasks, task_file)
    mine = shard_pairs(tasks, config.samples, config.shard_index, config.num_shards)  # this shard's (task, sample)
    if policy is None:
        policy, sub_policy = build_policies(config)
    identity = run_identity(config, task_file, store.file_sha256(task_file))
    identity["policy"] = config.policy or getattr(policy, "name", None)
    identity["sub_policy"] = config.sub_policy or (getattr(sub_policy, "name", None) if sub_policy else None)
    out = Path(config.out)
    resuming = store.open_run(out, identity)
    slot = f"{config.shard_index}of{config.num_shards}"
    with store.RunLock(out, slot):
        summary = RunSummary()
        done: set[tuple[str | None, int | None]] = set()
        for record in store.iter_records(out) if resuming else ():
            done.add((record.get("task_id"), record.get("sample")))
            summary.add(record)
        jobs = [(task, k) for task, k in mine if (task["id"], k) not in done]
        scorer = load_scorer()
        if scorer is None:
            print("note: rlm_train.tasks.score is not available; trajectories are written without scores",
                  file=sys.stderr)
        started = time.monotonic()
        writer = _Writer(store.new_shard_path(out, slot), config.max_consecutive_failures, summary)
        progress = Progress(len(jobs), resumed=len(mine) - len(jobs), enabled=config.progress,
                            live_tokens=streamed_tokens(policy, sub_policy), every_s=config.progress_every_s)
        tracker = open_tracker(config, out, config.model_dump(mode="json"))
        stop = StopOnSignals()

        async def go():
            main = asyncio.current_task()
            assert main is not None
            stop.install(main)
            try:
                await _run_jobs(jobs, config, policy, sub_policy, task_file, scorer, writer, progress, tracker)
            except asyncio.CancelledError:
                if stop.signum is None:
                    raise
                main.uncancel()  # stopped by a signal: the summary below is still written
            finally:
                stop.remove()
                await policy.aclose()
                if sub_policy is not None and sub_policy is not policy:
                    await sub_policy.aclose()

        try:
            try:
                eventloop.run(go())
                if stop.signum is None:
                    writer.finish()
            except* UserError as group:  # e.g. ServerDown, raised inside an episode task
                raise group.exceptions[0] from None
        except BaseException:
            if tracker is not None:
                tracker.close()  # what it logged so far stays
            raise
        finally:
            progress.close()
        wall = time.monotonic() - started
    this_run = {
        "episodes": writer.written,
        "wall_s": round(wall, 3),
        "episodes_per_s": round(writer.written / wall, 3) if wall > 0 else None,
        "tokens_per_s": round(progress.tokens() / wall, 1) if wall > 0 else None,
        "errors": progress.errors,
        "retries": _retries(policy, sub_policy),
        "bad_task_lines": problems,
        "pid": os.getpid(),
    }
    if config.num_shards > 1:
        # Other shards append to the same store meanwhile: count what is there now.
        summary = RunSummary()
        for record in store.iter_records(out):
            summary.add(record)
    result = summary.as_dict(this_run)
    result["run_dir"] = str(out)
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2) + "\n")
    if tracker is not None:
        tracker.log(generate_scalars(result), step=result["records"])
        tracker.close()
    if stop.signum is not None:
        raise Stopped(stop.signum, f"stopped: {writer.written} episodes saved this run, {summary.records} in {out} "
                                   f"in all; re-run the same command to resume")
    return result


def _live_scalars(writer: _Writer, progress: Progress) -> dict[str, float | int | None]:
    """The run's scalars so far, for report_to sinks between episodes."""
    elapsed = max(time.monotonic() - progress.started, 1e-9)
    this_run = {"episodes_per_s": round(progress.done / elapsed, 3),
                "tokens_per_s": round(progress.tokens() / elapsed, 1)}
    return generate_scalars(writer.summary.as_dict(this_run))


def _retries(policy, sub_policy) -> int | None:
    policies = [p for p in {id(policy): policy, id(sub_policy): sub_policy}.values() if p is not None]
    counts = [p.stats.get("retries", 0) for p in policies if isinstance(getattr(p, "stats", None), dict)]
    return sum(counts) if counts else None


class RunSummary:
    """The end-of-run numbers, added up one record at a time as records are written (and,
    on resume, as the earlier ones are read), so the summary never re-reads the store."""

    def __init__(self) -> None:
        self.records = 0
        self.outcomes: Counter[str] = Counter()
        self.scores: list[float] = []
        self.families: dict[str, Counter[str]] = defaultdict(Counter)  # sums per family
        self.family_scores: dict[str, list[float]] = defaultdict(list)
        self.tokens: Counter[str] = Counter()
        self.sub_calls = 0
        self.wall_sum = 0.0
        self.wall_max: float | None = None

    def add(self, record: TrajectoryRecord) -> None:
        stats = record["stats"]
        family = self.families[record.get("family") or "-"]
        family["episodes"] += 1
        family["final"] += record["outcome"] == Outcome.FINAL
        family["errors"] += record["outcome"] == Outcome.ERROR
        family["turns"] += stats["turns"]
        family["sub_calls"] += stats.get("sub_calls", 0)
        score = record.get("score")
        if score is not None:
            self.scores.append(score)
            self.family_scores[record.get("family") or "-"].append(score)
        self.records += 1
        self.outcomes[record["outcome"]] += 1
        self.tokens["root_prompt"] += stats.get("prompt_tokens", 0)
        self.tokens["root_completion"] += stats.get("completion_tokens", 0)
        self.tokens["call_tree_total"] += stats.get("tokens_total", 0)
        self.sub_calls += stats.get("sub_calls", 0)
        wall = stats.get("wall_s", 0.0)
        self.wall_sum += wall
        self.wall_max = wall if self.wall_max is None else max(self.wall_max, wall)

    def as_dict(self, this_run: dict[str, Any] | None = None) -> dict[str, Any]:
        families = {}
        for name, f in sorted(self.families.items()):
            scores = self.family_scores[name]
            families[name] = {
                "episodes": f["episodes"],
                "scored": len(scores),
                "mean_score": round(statistics.fmean(scores), 4) if scores else None,
                "final_rate": round(f["final"] / f["episodes"], 4),
                "errors": f["errors"],
                "mean_turns": round(f["turns"] / f["episodes"], 2),
                "mean_sub_calls": round(f["sub_calls"] / f["episodes"], 2),
            }
        return {
            "records": self.records,
            "outcomes": dict(self.outcomes),
            "mean_score": round(statistics.fmean(self.scores), 4) if self.scores else None,
            "by_family": families,
            "tokens": {k: self.tokens[k] for k in ("root_prompt", "root_completion", "call_tree_total")},
            "sub_calls": self.sub_calls,
            "episode_wall_s": {
                "mean": round(self.wall_sum / self.records, 3) if self.records else None,
                "max": round(self.wall_max, 3) if self.wall_max is not None else None,
            },
            "this_run": this_run or {},
        }


def format_summary(summary: dict[str, Any]) -> str:
    run = summary.get("this_run", {})
    lines = [
        f"{summary['records']} trajectories in {summary.get('run_dir', '')}  "
        f"(this run: {run.get('episodes', 0)} episodes in {run.get('wall_s', 0):.1f}s, "
        f"{run.get('episodes_per_s') or 0:.2f} ep/s, {run.get('errors', 0)} errors"
        + (f", {run['retries']} retries)" if run.get("retries") is not None else ")"),
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items())),
        "",
        f"{'family':<14}{'episodes':>9}{'score':>8}{'final':>7}{'errors':>7}{'turns':>7}{'sub-calls':>10}",
    ]
    for family, f in summary["by_family"].items():
        score = f"{f['mean_score']:.3f}" if f["mean_score"] is not None else "-"
        lines.append(f"{family:<14}{f['episodes']:>9}{score:>8}{f['final_rate']:>7.2f}{f['errors']:>7}"
                     f"{f['mean_turns']:>7.1f}{f['mean_sub_calls']:>10.1f}")
    mean = summary["mean_score"]
    tokens = summary["tokens"]
    lines += [
        f"{'all':<14}{summary['records']:>9}{(f'{mean:.3f}' if mean is not None else '-'):>8}",
        "",
        f"tokens: root prompt {tokens['root_prompt']:,}, root completion {tokens['root_completion']:,}, "
        f"whole call tree {tokens['call_tree_total']:,}; sub-calls {summary['sub_calls']:,}; "
        f"episode wall mean {summary['episode_wall_s']['mean'] or 0:.2f}s, max {summary['episode_wall_s']['max'] or 0:.2f}s",
    ]
    return "\n".join(lines)
