"""Running an eval: every method over the held-out tasks through `rollouts.generate`'s run
machinery (one generate run per method, so resumable and exactly-once per (method, task,
sample)), then the report.

    OUT/eval.json          which task files (sha256): a re-run must name the same ones
    OUT/tasks.jsonl        the task files joined (only when there are several)
    OUT/runs/METHOD/       a `rlm-train generate` run directory per method
    OUT/one_shot/METHOD.json  a one-shot method's worked examples, as its model saw them
    OUT/report.json        every number, the config, the versions
    OUT/report.md          the same numbers as tables
    OUT/plots/*.png        score against context length

    report = run_eval(EvalConfig(tasks=["heldout.jsonl"], out="runs/eval", methods=[...]))
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig, MethodConfig, method_pairs, method_rlm
from rlm_train.eval.direct import DirectPolicy, context_text, direct_name
from rlm_train.eval.one_shot import Example, OneShotPolicy, one_shot_name, pick_examples
from rlm_train.eval.report import build_report, episode_row, render_markdown, task_info, versions, write_plots
from rlm_train.formats import dumps_line, load_task_context, write_text_atomic
from rlm_train.models.base import Policy
from rlm_train.policies.spec import parse_policy_spec
from rlm_train.records import TaskRecord
from rlm_train.rollouts import store
from rlm_train.rollouts.tasks_file import load_tasks
from rlm_train.rollouts.tracking import check_tracking, eval_scalars, open_tracker

EVAL_SCHEMA = "rlm-train/eval-run/v1"
EVAL_MANIFEST = "eval.json"
RUNS = "runs"
ONE_SHOT = "one_shot"

Policies = Mapping[str, tuple[Policy, Policy | None]]


# --------------------------------------------------------------------------- checks before any work
def check_config(config: EvalConfig, injected: frozenset[str] = frozenset()) -> None:
    """What makes an eval unrunnable whatever the machine: no tasks, no output, no methods,
    a malformed policy spec, an openai: policy without a server (methods in `injected`,
    whose policies are passed in ready, excepted)."""
    if not config.tasks:
        raise UserError("no task files: pass --tasks FILE (repeatable) or set `tasks` in the recipe")
    if not config.out:
        raise UserError("no output directory: pass --out DIR or set `out` in the recipe")
    if not config.methods:
        raise UserError("no methods: set `methods` in the recipe, or pass --method NAME=SPEC (repeatable)")
    for method in config.methods:
        if method.name in injected:
            continue
        for spec, urls, what in ((method.policy, method.base_urls, "policy"),
                                 (method.sub_policy, method.sub_base_urls or method.base_urls, "sub_policy")):
            if not spec:
                continue
            kind, _ = parse_policy_spec(spec)
            if kind == "openai" and not urls:
                raise UserError(f"method {method.name!r}: {what} {spec!r} needs a server; set its base_urls "
                                "(or pass --base-url http://HOST:PORT/v1)")
    for method in config.methods:
        if method.policy.strip() == "constant" and not config.train_tasks:
            raise UserError(f"method {method.name!r}: policy constant is fit on the training tasks, and "
                            "train_tasks is empty: set train_tasks (or pass --train-tasks FILE)")
    check_tracking(config)


def refuse_oracle(config: EvalConfig, tasks: list[tuple[TaskRecord, Path]]) -> None:
    """A method whose policy or sub_policy is the oracle, on tasks it cannot answer: refused
    before anything runs, naming the task file and the first such task."""
    from rlm_train.policies.oracle import refuse_oracle_tasks

    for method in config.methods:
        for what, spec in (("policy", method.policy), ("sub_policy", method.sub_policy)):
            if (spec or "").strip() != "oracle":
                continue
            for file in dict.fromkeys(path for _, path in tasks):
                refuse_oracle_tasks(f"method {method.name!r}: its {what}", (t for t, p in tasks if p == file), file)


def missing_paths(config: EvalConfig, skip: frozenset[str] = frozenset()) -> list[str]:
    """Input paths that do not exist on this machine: task files, training task files, and
    the model and adapter directories of hf: policies (methods in `skip` excepted). A real
    run stops at the first before anything starts; a dry run lists them."""
    from rlm_train.models.loading import model_missing

    problems = []
    for flag, files in (("tasks", config.tasks), ("train_tasks", config.train_tasks)):
        for f in files:
            if Path(f).expanduser().is_dir():
                problems.append(f"{flag} {f}: is a directory; pass a task JSONL file (e.g. {Path(f) / 'heldout.jsonl'})")
            elif not Path(f).expanduser().is_file():
                problems.append(f"{flag} {f}: task file not found")
    for method in config.methods:
        if method.one_shot and not Path(method.one_shot).expanduser().exists():
            problems.append(f"method {method.name!r}: one_shot {method.one_shot}: no such trajectory directory or file")
        if method.name in skip:
            continue
        for spec in (method.policy, method.sub_policy):
            if not spec:
                continue
            kind, args = parse_policy_spec(spec)
            if kind != "hf":
                continue
            if why := model_missing(args["path"]):
                problems.append(f"method {method.name!r}: model {args['path']}: {why}")
            adapter = args.get("adapter")
            if adapter and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
                why = "does not exist" if not Path(adapter).expanduser().exists() else "is not a PEFT adapter (no adapter_config.json)"
                problems.append(f"method {method.name!r}: adapter path {adapter} {why}")
    return problems


# --------------------------------------------------------------------------- tasks
def load_eval_tasks(files: list[str]) -> list[tuple[TaskRecord, Path]]:
    """Every task of every file, in order, with its file; an id in two files is refused."""
    out: list[tuple[TaskRecord, Path]] = []
    where: dict[str, Path] = {}
    for name in files:
        path = Path(name).expanduser()
        tasks, _ = load_tasks(path)
        for task in tasks:
            if task["id"] in where:
                raise UserError(f"task id {task['id']!r} is in both {where[task['id']]} and {path}; "
                                "an eval scores each task once: drop one of the files")
            where[task["id"]] = path
            out.append((task, path))
    return out


def _with_context(files: list[str]) -> Iterator[dict[str, Any]]:
    """Tasks with their context loaded as text, one at a time (for the overlap check)."""
    for name in files:
        path = Path(name).expanduser()
        tasks, _ = load_tasks(path)
        for task in tasks:
            yield {**task, "context": context_text(load_task_context(task, path))}


def check_overlap(config: EvalConfig) -> dict[str, Any] | None:
    """With `train_tasks`: what the eval tasks share with them (`tasks.suite.shared_keys`),
    warned on stderr with the counts when anything is shared. None without train_tasks."""
    if not config.train_tasks:
        return None
    from rlm_train.tasks.suite import shared_keys

    shared, tasks = shared_keys(_with_context(config.train_tasks), _with_context(config.tasks))
    if shared:
        counts = ", ".join(f"{n} {kind}" for kind, n in shared.items())
        print(f"warning: {tasks} eval task(s) overlap the training set ({', '.join(config.train_tasks)}): "
              f"shared {counts}; their scores are not held-out scores", file=sys.stderr)
    return {"train_tasks": list(config.train_tasks), "shared": shared, "tasks": tasks}


def _open_eval_dir(out: Path, files: list[str], create: bool) -> list[dict[str, str]]:
    """Check (or start) the eval directory: it must hold an eval of the same task files."""
    identity = [{"file": str(Path(f).expanduser().resolve()), "sha256": store.file_sha256(Path(f).expanduser())}
                for f in files]
    manifest = out / EVAL_MANIFEST
    if manifest.is_file():
        try:
            there = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{manifest}: not valid JSON; this is not an eval directory (use another --out)") from None
        if [t["sha256"] for t in there.get("tasks", [])] != [t["sha256"] for t in identity]:
            raise UserError(f"{out} holds an eval of other task files ({', '.join(t['file'] for t in there['tasks'])}); "
                            "pass a new --out, or the same --tasks as before")
        return identity
    if not create:
        raise UserError(f"{out}: no eval here ({EVAL_MANIFEST} missing); run `rlm-train eval` without --report-only first")
    leftovers = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if leftovers:
        raise UserError(f"{out}: not empty and has no {EVAL_MANIFEST} (holds {', '.join(leftovers[:3])}...); "
                        "pass a new or empty --out directory")
    write_text_atomic(manifest, json.dumps({"schema": EVAL_SCHEMA, "tasks": identity,
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                           indent=2) + "\n")
    return identity


def _task_file(out: Path, tasks: list[tuple[TaskRecord, Path]], files: list[str]) -> Path:
    """The one task file every method runs: the given one, or the given ones joined (with
    context paths made absolute, so they resolve from OUT)."""
    if len(files) == 1:
        return Path(files[0]).expanduser()
    lines = []
    for task, path in tasks:
        record: dict[str, Any] = dict(task)
        if "context_path" in task:
            record["context_path"] = str((path.parent / task["context_path"]).resolve())
        lines.append(dumps_line(record))
    joined = out / "tasks.jsonl"
    text = "".join(lines)
    if not joined.is_file() or joined.read_text(encoding="utf-8") != text:
        write_text_atomic(joined, text)
    return joined


# --------------------------------------------------------------------------- running
def _generate_config(config: EvalConfig, method: MethodConfig, task_file: Path, run_dir: Path):
    from rlm_train.rollouts.generate import GenerateConfig

    policy = method.policy
    if method.direct:
        policy = direct_name(method.policy, method.max_context_chars)
    elif method.one_shot:
        policy = one_shot_name(method.policy, method.one_shot)
    return GenerateConfig(
        tasks=str(task_file), out=str(run_dir), policy=policy,
        sub_policy=method.sub_policy, samples=config.samples, concurrency=config.concurrency, client=config.client,
        max_consecutive_failures=config.max_consecutive_failures, progress=config.progress,
        progress_every_s=config.progress_every_s, rlm=method_rlm(config.rlm, method),
    )


def _done(gen_config, task_file: Path, task_sha: str, sub_name: str | None) -> set[tuple[Any, Any]] | None:
    """The (task_id, sample) pairs a method's run directory holds, after checking that it
    holds this method's run (same identity as `run_generate` checks); None when it has none."""
    from rlm_train.rollouts.generate import run_identity

    run_dir = Path(gen_config.out)
    if store.read_manifest(run_dir) is None:
        return None
    identity = run_identity(gen_config, task_file, task_sha)
    identity["sub_policy"] = gen_config.sub_policy or sub_name
    store.open_run(run_dir, identity)  # raises, naming the field, when the method changed
    return {(r.get("task_id"), r.get("sample")) for r in store.iter_records(run_dir)}


def _build(method: MethodConfig, config: EvalConfig, policies: Policies | None) -> tuple[Policy, Policy | None]:
    if policies is not None and method.name in policies:
        return policies[method.name]
    from rlm_train.policies.spec import build_policies, build_policy

    if method.policy.strip() == "constant":
        from rlm_train.policies.baselines import ConstantPolicy

        return ConstantPolicy([task for task, _ in load_eval_tasks(config.train_tasks)]), None
    if method.direct:
        return build_policy(method.policy, method.base_urls, config.client), None
    return build_policies(method.policy, method.sub_policy, method.base_urls, method.sub_base_urls, config.client)


def run_eval(config: EvalConfig, policies: Policies | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every method, then write and return the report. `policies` maps
    method names to ready (root, sub) policies (tests, benches); other methods are built
    from their specs, one method at a time. `report_only`: run nothing, report what the
    run directories hold."""
    check_config(config, frozenset(policies or ()))
    assert config.out is not None  # check_config
    # Models are needed only to run episodes: a report of what is there needs none.
    skip = frozenset(m.name for m in config.methods) if report_only else frozenset(policies or ())
    missing = missing_paths(config, skip)
    if missing:
        raise UserError(missing[0] + ("" if len(missing) == 1 else f" (and {len(missing) - 1} more)"))
    tasks = load_eval_tasks(config.tasks)
    refuse_oracle(config, tasks)
    families = list(dict.fromkeys(task.get("family") or "-" for task, _ in tasks))
    examples = {m.name: pick_examples(m.one_shot, families, (t["id"] for t, _ in tasks))
                for m in config.methods if m.one_shot and not report_only}
    overlap = check_overlap(config)
    out = Path(config.out).expanduser()
    task_files = _open_eval_dir(out, config.tasks, create=not report_only)
    task_file = _task_file(out, tasks, config.tasks)
    task_sha = store.file_sha256(task_file)
    # Opened first, so a W&B run that cannot start stops the eval before any episode.
    tracker = None if report_only else open_tracker(config, out, config.model_dump(mode="json"))
    try:
        report = _run_methods(config, out, tasks, task_file, task_sha, task_files, overlap, policies, report_only,
                              examples)
        if tracker is not None:
            # One point per eval, at the episodes it holds: a resumed eval adds a later point.
            tracker.log(eval_scalars(report), step=sum(m["episodes"] for m in report["methods"].values()))
    finally:
        if tracker is not None:
            tracker.close()
    return report


def _run_methods(config: EvalConfig, out: Path, tasks: list[tuple[TaskRecord, Path]], task_file: Path, task_sha: str,
                 task_files: list[dict[str, str]], overlap: dict[str, Any] | None, policies: Policies | None,
                 report_only: bool, examples: Mapping[str, Mapping[str, Example]]) -> dict[str, Any]:
    """Each method's generate run (what is left of it), then report.json, report.md and the plots."""
    by_id = {task["id"]: task for task, _ in tasks}
    expected = {(tid, k) for tid in by_id for k in range(config.samples)}
    started = time.monotonic()
    method_walls: dict[str, float] = {}
    method_rates: dict[str, float | None] = {}
    for i, method in enumerate(config.methods, 1):
        run_dir = out / RUNS / method.name
        gen_config = _generate_config(config, method, task_file, run_dir)
        injected_sub = policies[method.name][1] if policies and method.name in policies else None
        done = _done(gen_config, task_file, task_sha, getattr(injected_sub, "name", None))
        left = len(expected - (done or set()))
        mode = f"direct (context cut to {method.max_context_chars:,} chars)" if method.direct else \
            f"rlm, one-shot from {method.one_shot}" if method.one_shot else "rlm"
        print(f"eval: [{i}/{len(config.methods)}] {method.name}: {mode}, policy {method.policy}"
              f"{', sub-policy ' + method.sub_policy if method.sub_policy else ''}; "
              f"{left} of {len(expected)} episodes to run", file=sys.stderr)
        if report_only or left == 0:
            continue
        from rlm_train.rollouts.generate import run_generate

        root, sub = _build(method, config, policies)
        if method.direct:
            root, sub = DirectPolicy(root, by_id, task_file, method.max_context_chars), None
        elif method.one_shot:
            write_examples(out, method.name, examples[method.name])
            root = OneShotPolicy(root, examples[method.name], method.one_shot)
        method_started = time.monotonic()
        summary = run_generate(gen_config, policy=root, sub_policy=sub)
        method_walls[method.name] = round(time.monotonic() - method_started, 3)
        method_rates[method.name] = summary["this_run"]["episodes_per_s"]
    runs_s = time.monotonic() - started
    report = make_report(config, out, [task_info(t) for t, _ in tasks], task_files, overlap)
    report["plots"] = write_plots(report, out)
    # This process's timings: the methods' episodes, and the report (bootstrap, plots).
    report["this_run"] = {"runs_s": round(runs_s, 3), "method_s": method_walls, "episodes_per_s": method_rates,
                          "report_s": round(time.monotonic() - started - runs_s, 3)}
    write_report(report, out)
    return report


# --------------------------------------------------------------------------- the report
def make_report(config: EvalConfig, out: Path, tasks: list[dict[str, Any]], task_files: list[dict[str, str]],
                overlap: dict[str, Any] | None) -> dict[str, Any]:
    """The report of what the run directories hold now."""
    rows: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        run_dir = out / RUNS / method.name
        records = store.read_records(run_dir) if store.shard_files(run_dir) else []
        rows[method.name] = [episode_row(r) for r in records]
        meta[method.name] = {"policy": method.policy, "sub_policy": method.sub_policy, "direct": method.direct,
                             "one_shot": method.one_shot, "run_dir": f"{RUNS}/{method.name}"}
        if method.direct:
            meta[method.name]["max_context_chars"] = method.max_context_chars
    header = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "task_files": task_files,
        "overlap": overlap,
        "config": config.model_dump(mode="json"),
    }
    return build_report(tasks, rows, methods=[m.name for m in config.methods], pairs=method_pairs(config),
                        bootstrap=config.bootstrap.model_dump(), samples=config.samples, header=header,
                        method_meta=meta)


def write_examples(out: Path, method: str, examples: Mapping[str, Example]) -> None:
    """OUT/one_shot/METHOD.json: each family's worked example and the trajectory it came from
    (the records hold the loop's conversation, which does not show it)."""
    write_text_atomic(out / ONE_SHOT / f"{method}.json",
                      json.dumps({f: dataclasses.asdict(e) for f, e in examples.items()}, indent=2) + "\n")


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json and report.md (which links the report's plots) into `out`."""
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report))
