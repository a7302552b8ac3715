"""rlm-train's Python API: run an episode, build policies, run an eval or a generation run, from a
script or a notebook. The same functions the commands run; nothing here is a second implementation.

    import rlm_train
    from rlm_train.tasks import make_tasks

    task = make_tasks("niah", n=1, context_tokens=2_000, seed=0)[0]
    record = rlm_train.run_episode_sync(task, policy="scripted")      # a notebook cell, too
    record["final"], record["score"]                                  # the answer and its score

    root, sub = rlm_train.build_policies("openai:my-model", base_urls=["http://127.0.0.1:8000/v1"])
    report = rlm_train.run_eval({"tasks": ["heldout.jsonl"], "out": "runs/eval",
                                 "methods": [{"name": "teacher", "policy": "scripted"}]})

Policies are spec strings (`scripted`, `oracle`, `openai:MODEL`, `hf:MODEL[+adapter:PATH]`) or
policies already built (`build_policies`); a policy built here from a spec is closed when its
episode ends, one passed in stays open for the caller (`await policy.aclose()` when done).

The synchronous functions (`run_episode_sync`, `run_eval`, `run_generate`) work where an event
loop already runs (Jupyter): the work then runs on a worker thread with its own loop, and an
interrupt (the notebook's stop button) cancels it, closing its sandboxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlm_train.config import ConfigT, build_config, load_config
from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig
from rlm_train.models.base import Policy
from rlm_train.policies.spec import ClientOptions, build_policies, build_policy
from rlm_train.records import TaskRecord, TrajectoryRecord
from rlm_train.rlm.loop import RLMConfig
from rlm_train.rollouts.generate import GenerateConfig

__all__ = ["ClientOptions", "EvalConfig", "GenerateConfig", "RLMConfig", "build_policies", "build_policy",
           "run_episode", "run_episode_sync", "run_eval", "run_generate"]


async def run_episode(
    task: TaskRecord | Mapping[str, Any] | str,
    context: Any = None,
    *,
    policy: Policy | str = "scripted",
    sub_policy: Policy | str | None = None,
    config: RLMConfig | Mapping[str, Any] | None = None,
    base_urls: Sequence[str] = (),
    sub_base_urls: Sequence[str] = (),
    client: ClientOptions | None = None,
    task_file: str | Path | None = None,
    sample: int = 0,
) -> TrajectoryRecord:
    """Run one RLM episode and return its trajectory record (`rlm-train/trajectory/v1`).

    `task`: a task dict (`rlm-train/task/v1`, e.g. from `rlm_train.tasks.make_tasks`), whose query
    and context are used and whose scorer fills `record["score"]`, as `rlm-train generate` does;
    or a question string, with `context` the data the model's REPL gets as `context`.
    `task_file`: the file a task with `context_path` came from (its context is read from there).
    `policy` / `sub_policy`: policies or spec strings (openai: specs take `base_urls`, `client`).
    `config`: an RLMConfig or a dict of its keys (`{"max_iterations": 6}`).
    Model, server and sandbox failures end the episode (outcome `error`), they are not raised."""
    from rlm_train.rlm.loop import run_episode as loop_episode
    from rlm_train.rollouts.generate import load_scorer, score_record

    rlm = config if isinstance(config, RLMConfig) else build_config(RLMConfig, dict(config or {}), "config")
    root, built_root = _policy(policy, base_urls, client)
    sub, built_sub = _policy(sub_policy, sub_base_urls or base_urls, client) if sub_policy is not None else (None, False)
    try:
        if isinstance(task, str):
            return await loop_episode(task, context, root, sub, rlm)
        if context is None:
            if "context" not in task and task_file is None:
                raise UserError(f"task {task.get('id')!r} keeps its context in a file ({task.get('context_path')}): "
                                "pass task_file= (the task file it came from) or context=")
            from rlm_train.formats import load_task_context

            context = load_task_context(task, task_file or ".")
        hints = {"family": task.get("family"), "task_id": task.get("id"), "sample": sample, "meta": task.get("meta") or {}}
        record = await loop_episode(task["query"], context, root, sub, rlm, hints=hints, task_id=task.get("id"))
        record["sample"] = sample
        record["family"] = task.get("family")
        score_record(record, task, load_scorer())
        return record
    finally:
        if built_sub and sub is not None:
            await sub.aclose()
        if built_root:
            await root.aclose()


def run_episode_sync(task: TaskRecord | Mapping[str, Any] | str, context: Any = None, **options: Any) -> TrajectoryRecord:
    """`run_episode` for synchronous code: scripts and notebook cells (also where Jupyter's own
    event loop runs). Same arguments, same record."""
    from rlm_train import eventloop

    return eventloop.run(run_episode(task, context, **options))


def run_eval(config: Any, policies: Mapping[str, tuple[Policy, Policy | None]] | None = None,
             report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) an eval and return its report (also written as OUT/report.json and report.md).

    `config`: an EvalConfig, a dict of its keys (as in a recipe), or a recipe file path.
    `policies`: ready (root, sub) policies by method name, for methods not built from their specs.
    `report_only`: run nothing, rebuild the report from the run directories."""
    from rlm_train.eval.run import run_eval as run

    return run(_config(EvalConfig, config), policies=policies, report_only=report_only)


def run_generate(config: Any, policy: Policy | None = None, sub_policy: Policy | None = None) -> dict[str, Any]:
    """Run (or resume) a generation run and return its summary (also OUT/summary.json).

    `config`: a GenerateConfig, a dict of its keys, or a recipe file path. `policy` / `sub_policy`:
    ready policies instead of the config's specs."""
    from rlm_train.rollouts.generate import run_generate as run

    return run(_config(GenerateConfig, config), policy=policy, sub_policy=sub_policy)


def _config(cls: type[ConfigT], given: Any) -> ConfigT:
    """`given` as a `cls`: as is, validated from a dict, or read from a recipe file."""
    if isinstance(given, cls):
        return given
    if isinstance(given, Mapping):
        return build_config(cls, dict(given), "config")
    if isinstance(given, (str, Path)):
        return load_config(cls, given)
    raise UserError(f"config: expected a {cls.__name__}, a dict of its keys or a recipe path, got {type(given).__name__}")


def _policy(given: Policy | str, base_urls: Sequence[str], client: ClientOptions | None) -> tuple[Policy, bool]:
    """(policy, built here?): a spec string is built (and closed by the caller), a policy is used as is."""
    if isinstance(given, str):
        return build_policy(given, list(base_urls), client), True
    return given, False
