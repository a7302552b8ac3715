"""The RLM loop: one root conversation that writes code, runs it in the sandbox, reads
the output, and answers with FINAL. The same loop serves generation, GRPO rollouts,
eval and serving.

    traj = await run_episode(query, context, policy, sub_policy, RLMConfig(max_depth=2))

Sub-model functions called from the REPL (llm_query, llm_query_batched, rlm_query)
come back to this event loop through `_SubcallBridge`, so every episode's sub-calls
share one loop, one concurrency bound and one budget for the whole call tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
import uuid
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from pydantic import Field

from rlm_train.config import StrictModel, bounded
from rlm_train.models.base import (
    CallContext,
    Completion,
    Policy,
    PolicyError,
    RequestRefused,
    Role,
    SamplingParams,
    check_hints,
)
from rlm_train.records import (
    TRAJECTORY_SCHEMA,
    EpisodeRecord,
    EpisodeStats,
    ErrorKind,
    ExecutionRecord,
    Outcome,
    SubCallRecord,
    TrajectoryRecord,
    TurnRecord,
)
from rlm_train.rlm import prompts
from rlm_train.rlm.budget import Budget, BudgetExhausted, SandboxSlots
from rlm_train.rlm.recording import Recording
from rlm_train.repl.api import ExecResult, SandboxConfig, SandboxError
from rlm_train.rlm.parsing import FinalCall, extract_code_blocks, find_final
from rlm_train.rlm.sandboxes import CallTree, LazySandbox

class RLMConfig(StrictModel):
    """How one RLM episode runs."""

    max_iterations: int = bounded(8, ge=1, le=1000,
                                  why="every turn's code and output stays in the root conversation the model "
                                      "rereads each turn")
    """Root turns with code before the model is told to answer now (one extra, final turn)."""
    max_depth: int = bounded(1, ge=0, le=16,
                             why="each level of rlm_query holds REPL sandboxes of its own, and one process "
                                 "holds at most 256")
    """Recursion depth for rlm_query: the root is depth 0; at max_depth rlm_query degrades to llm_query."""
    max_subcalls: int | None = Field(5000, ge=0)
    """Sub-calls (llm_query + rlm_query) allowed across the whole call tree; None = unlimited. A
    program that asks one question a record makes a call per record (a 32k-token oolong holds ~1,300)."""
    max_tokens: int | None = Field(None, ge=1)
    """Prompt + completion tokens allowed across the whole call tree; None = unlimited."""
    max_wall_s: float | None = bounded(900.0, gt=0, le=604_800, why="a week; null means no limit")
    """Wall-clock seconds for the whole episode; None = unlimited."""
    subcall_concurrency: int = bounded(16, ge=1, le=1024,
                                       why="each call in flight holds its prompt, its answer and a connection")
    """Model calls of one call tree's sub-calls in flight at once: llm_query (llm_query_batched
    fans out up to this) and every turn of a child RLM; only the root's own turns are outside it."""
    child_concurrency: int = bounded(4, ge=1, le=64,
                                     why="each child RLM holds a REPL sandbox, and one process holds at most "
                                         "256")
    """Child RLMs (rlm_query, every depth) of one call tree alive at once, each holding a sandbox;
    more wait for one to end (rlm_query_batched runs this many at a time)."""
    sandbox_wait_s: float = bounded(60.0, gt=0, le=86_400,
                                    why="a day; an episode waits this long for a sandbox before it gives up")
    """An episode waiting for a sandbox (its tree's child_concurrency, or the gateway's
    max_sandboxes, all in use) gives up when none was given back for this long: it ends as
    budget_exhausted, and a child RLM's rlm_query returns a note saying so."""
    prompt_style: str = Field("full", pattern="^(full|compact)$")
    """System prompt variant: `full`, or `compact` for small models."""
    sub_model_chars: int = bounded(100_000, ge=1000, le=4_000_000,
                                   why="the server's window must hold it; 4M characters is ~1M tokens, beyond "
                                       "any model's")
    """Longest prompt of one sub-call (llm_query, and rlm_query's prompt), in characters. The
    system prompt tells the model this number; a longer prompt is refused before anything is
    sent, with a message back to the REPL (split the text). Size the server's window to fit it:
    `rlm.window.server_window_tokens`."""
    child_max_tokens: int | None = Field(200_000, ge=1)
    """Prompt + completion tokens one child RLM (rlm_query) may spend, its own sub-calls
    included; it then stops and rlm_query returns a note instead of an answer. None = only the
    whole tree's max_tokens."""
    feedback_chars: int = bounded(4000, ge=200, le=1_000_000,
                                  why="it goes back into the root conversation every turn; 1M characters is "
                                      "~250k tokens")
    """REPL output characters fed back to the model per turn (the rest is cut with a note)."""
    record_chars: int = bounded(2000, ge=0, le=10_000_000,
                                why="kept per sub-call in the record, which is held in memory until its episode"
                                    " ends")
    """Sub-call prompt/response characters kept in the trajectory (lengths are always kept)."""
    trajectory_chars: int = bounded(2_000_000, ge=0, le=1_000_000_000,
                                    why="an episode's record is held in memory and written as one JSONL line")
    """Characters one episode's record holds across its call tree: cells' code and output,
    sub-call prompts and responses, child RLMs' conversations. Past it only their lengths are
    kept, and stats.recording says what was left out (rlm/recording.py); the root's own
    conversation, the training data, is always recorded."""
    root_max_tokens: int = bounded(1024, ge=1, le=1_000_000,
                                   why="new tokens of one reply; the server's window must hold them too, and 1M"
                                       " is beyond any model's")
    """Max new tokens per root turn."""
    answer_max_tokens: int | None = bounded(None, ge=1, le=1_000_000,
                                            why="new tokens of one reply; the server's window must hold them "
                                                "too, and 1M is beyond any model's")
    """Max new tokens of the answer-now turn (a FINAL block needs few); None = root_max_tokens."""
    sub_max_tokens: int = bounded(512, ge=1, le=1_000_000,
                                  why="new tokens of one reply; the server's window must hold them too, and 1M "
                                      "is beyond any model's")
    """Max new tokens per sub-call."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the root model (sub-calls use sub_temperature)."""
    sub_temperature: float = Field(0.0, ge=0)
    """Sampling temperature of sub-calls."""
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    """The REPL sandbox of every episode in the tree: sandbox.timeout_s, sandbox.memory_mb,
    sandbox.max_output_chars, ... (fields and defaults: rlm_train.repl.SandboxConfig)."""


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit:,} chars not recorded]"


@dataclass
class _Tree:
    """State shared by every episode in one call tree."""

    config: RLMConfig
    policy: Policy
    sub_policy: Policy
    budget: Budget
    hints: Mapping[str, Any]  # the caller's side information, read-only (CallContext.hints)
    semaphore: asyncio.Semaphore
    calls: CallTree  # its sub-calls in flight and its sandboxes: what a cancellation stops
    recording: Recording  # the trajectory budget
    on_turn: Callable[[TurnRecord], None] | None = None


@dataclass
class _Episode:
    tree: _Tree
    depth: int
    query: str
    budget: Budget  # the tree's, or a child RLM's own (whose parent is the tree's)
    subcalls: list[SubCallRecord] = field(default_factory=list)  # the current turn's sub-calls

    # -- sub-calls, on the event loop ---------------------------------------------------
    async def llm_batch(self, prompts_: list[str], kind: str = "llm_query") -> list[str]:
        self._refuse_long("llm", prompts_, kind)
        self.budget.reserve_subcalls(len(prompts_))
        return list(await asyncio.gather(*(self._llm_one(p) for p in prompts_)))

    def _refuse_long(self, record_kind: str, prompts_: list[str], kind: str) -> None:
        """A prompt longer than the sub-model reads is refused before anything is sent: the
        server would answer 400 (or cut it), and the REPL can split it instead."""
        limit = self.tree.config.sub_model_chars
        for i, prompt in enumerate(prompts_):
            if len(prompt) > limit:
                which = f"prompt {i + 1} of {len(prompts_)}" if len(prompts_) > 1 else "prompt"
                fix = ("pass the long text as rlm_query's context instead" if kind == "rlm_query"
                       else "split the text into smaller chunks (llm_query_batched over the pieces)")
                if kind == "rlm_query at the depth limit":  # it became llm_query(prompt + context)
                    fix = "at the depth limit rlm_query reads its context inline: split the context into smaller chunks"
                message = (f"{kind} {which} has {len(prompt):,} characters; a sub-call reads at most {limit:,} "
                           f"(rlm.sub_model_chars). Nothing was sent: {fix}")
                self._record_subcall(record_kind, prompt, None, None, time.monotonic(), error=message)
                raise ValueError(message)

    async def _llm_one(self, prompt: str) -> str:
        tree = self.tree
        sampling = SamplingParams(max_tokens=tree.config.sub_max_tokens, temperature=tree.config.sub_temperature)
        call = CallContext(role=Role.SUB, depth=self.depth + 1, query=self.query, hints=tree.hints)
        started = time.monotonic()
        async with tree.semaphore:
            self.budget.check()
            try:
                completion = await tree.sub_policy.chat([{"role": "user", "content": prompt}], sampling, call)
            except PolicyError as exc:
                self._record_subcall("llm", prompt, None, None, started, error=str(exc))
                raise
        self.budget.add_tokens(completion.prompt_tokens + completion.completion_tokens)
        self._record_subcall("llm", prompt, completion.text, completion, started)
        return completion.text

    async def rlm_batch(self, requests: list[tuple[str, Any]]) -> list[str]:
        if self.depth + 1 > self.tree.config.max_depth:
            # At the depth limit a recursive call becomes a plain sub-model call.
            return await self.llm_batch([_inline_context(p, c) for p, c in requests], kind="rlm_query at the depth limit")
        self._refuse_long("rlm", [p for p, _ in requests], "rlm_query")
        self.budget.reserve_subcalls(len(requests))
        return list(await asyncio.gather(*(self._rlm_one(p, c) for p, c in requests)))

    async def _rlm_one(self, prompt: str, context: Any) -> str:
        started = time.monotonic()
        child_context = prompt if context is None else context
        limit = self.tree.config.child_max_tokens
        budget = Budget(max_tokens=limit, parent=self.budget, name="child RLM ") if limit is not None else self.budget
        child = await _run_tree_episode(self.tree, prompt, child_context, self.depth + 1, budget)
        answer = child["final"]
        if answer is None:
            answer = f"(the child RLM gave no answer: {child['outcome']}{': ' + child['error'] if child['error'] else ''})"
        self._record_subcall("rlm", prompt, answer, None, started, child=self.tree.recording.child(child))
        return answer

    def _record_subcall(self, kind: str, prompt: str, response: str | None, completion: Completion | None,
                        started: float, error: str | None = None, child: EpisodeRecord | None = None) -> None:
        limit = self.tree.config.record_chars
        record: SubCallRecord = {
            "kind": kind,
            "depth": self.depth + 1,
            "prompt": _clip(prompt, limit),
            "prompt_chars": len(prompt),
            "response": _clip(response, limit),
            "prompt_tokens": completion.prompt_tokens if completion else 0,
            "completion_tokens": completion.completion_tokens if completion else 0,
            "latency_s": round(time.monotonic() - started, 4),
            "error": error,
        }
        if child is not None:
            record["child"] = child
        self.subcalls.append(record)


def _inline_context(prompt: str, context: Any) -> str:
    if context is None:
        return prompt
    return f"{prompt}\n\nContext:\n{context}"


class _SubcallBridge:
    """The REPL's SubcallHandler: the cell's requests, answered on the event loop in the
    cell's own task (so cancelling the episode cancels them too)."""

    def __init__(self, episode: _Episode):
        self.episode = episode

    async def llm_batch(self, prompts_: list[str]) -> list[str]:
        self.episode.tree.calls.check()
        return await self.episode.llm_batch(list(prompts_))

    async def rlm_batch(self, requests: list[tuple[str, Any]]) -> list[str]:
        self.episode.tree.calls.check()
        return await self.episode.rlm_batch(list(requests))


async def run_episode(
    query: str,
    context: Any,
    policy: Policy,
    sub_policy: Policy | None = None,
    config: RLMConfig | None = None,
    hints: Mapping[str, Any] | None = None,
    task_id: str | None = None,
    on_turn: Callable[[TurnRecord], None] | None = None,
    sandboxes: SandboxSlots | None = None,
) -> TrajectoryRecord:
    """Run one RLM episode and return its `rlm-train/trajectory/v1` record.

    Never raises for model, server or sandbox failures: they end the episode with
    outcome `error` (or `budget_exhausted`) and are recorded in the trajectory.
    `hints`: side information every policy call carries in `CallContext.hints` (task family,
    id, sample, meta); the loop's own fields (role, depth, ...) are refused there.
    `on_turn(turn)` is called after each root turn (progress display). `sandboxes`: the
    budget this tree's sandboxes also count against (a gateway's, shared by its requests).
    Cancelled, it stops the whole call tree and returns (raises) once its sandboxes are gone.
    """
    config = config or RLMConfig()
    sub_policy = sub_policy or policy
    tree = _Tree(
        config=config,
        policy=policy,
        sub_policy=sub_policy,
        budget=Budget(config.max_subcalls, config.max_tokens, config.max_wall_s),
        hints=MappingProxyType(check_hints(hints)),
        semaphore=asyncio.Semaphore(config.subcall_concurrency),
        calls=CallTree(asyncio.get_running_loop(),
                       SandboxSlots(1 + config.child_concurrency, sandboxes, "this call tree's sandboxes")),
        recording=Recording(config.trajectory_chars),
        on_turn=on_turn,
    )
    try:
        episode = await _run_tree_episode(tree, query, context, 0, tree.budget)
    except asyncio.CancelledError:
        tree.calls.cancel()  # children, sub-calls and running cells of the whole tree
        await tree.calls.wait_closed()
        raise
    record: TrajectoryRecord = {
        **episode,
        "schema": TRAJECTORY_SCHEMA,
        "id": uuid.uuid4().hex,
        "task_id": task_id,
        "policy": getattr(policy, "name", str(policy)),
        "sub_policy": getattr(sub_policy, "name", str(sub_policy)),
        "config": config.model_dump(),
    }
    stats = record["stats"]
    stats["subcalls_total"] = tree.budget.subcalls
    stats["tokens_total"] = tree.budget.tokens
    stats["wall_s"] = round(tree.budget.elapsed(), 4)
    stats["recording"] = tree.recording.stats()
    return record


async def _run_tree_episode(tree: _Tree, query: str, context: Any, depth: int, budget: Budget) -> EpisodeRecord:
    config = tree.config
    episode = _Episode(tree=tree, depth=depth, query=query, budget=budget)
    messages = [
        {"role": "system", "content": prompts.system_prompt(config.prompt_style, context, config.sub_model_chars)},
        {"role": "user", "content": prompts.first_user_prompt(query, context)},
    ]
    turns: list[TurnRecord] = []
    final: str | None = None
    outcome = Outcome.MAX_ITERATIONS
    error: str | None = None
    error_kind: ErrorKind | None = None
    started = time.monotonic()
    sandbox = LazySandbox(tree.calls, config.sandbox_wait_s, context, config.sandbox, _SubcallBridge(episode))
    try:
        if getattr(tree.policy, "writes_code", True):  # the direct baseline's does not
            # The sandbox starts while the model writes its first turn: session start-up
            # (a fork, tens of ms) hides behind the first model call instead of adding to it.
            await sandbox.get()
        for turn_index in range(config.max_iterations + 1):
            forced = turn_index == config.max_iterations
            if forced:
                messages.append({"role": "user", "content": prompts.ANSWER_NOW_PROMPT})
            turn, final = await _run_turn(tree, episode, sandbox, messages, turn_index, forced)
            turns.append(turn)
            if tree.on_turn is not None and depth == 0:
                tree.on_turn(turn)
            if final is not None:
                outcome = Outcome.FINAL if not forced else Outcome.MAX_ITERATIONS
                break
            if budget.exhausted:
                raise BudgetExhausted(budget.exhausted)
    except BudgetExhausted as exc:
        outcome, error = Outcome.BUDGET, str(exc)
    except RequestRefused as exc:  # only this request: the episode is recorded with it
        outcome, error, error_kind = Outcome.ERROR, f"model call refused: {exc}", ErrorKind.REFUSED
    except PolicyError as exc:
        outcome, error, error_kind = Outcome.ERROR, f"model call failed: {exc}", ErrorKind.MODEL
    except SandboxError as exc:
        outcome, error, error_kind = Outcome.ERROR, f"sandbox failed: {exc}", ErrorKind.SANDBOX
    except Exception as exc:  # the host must survive anything an episode does
        outcome, error_kind = Outcome.ERROR, ErrorKind.INTERNAL
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
    finally:
        sandbox.close()
    stats = _episode_stats(turns, time.monotonic() - started)
    waited_s = sandbox.waited_s()
    if waited_s >= 0.001:
        stats["sandbox_wait_s"] = round(waited_s, 4)
    return {
        "query": query,
        "depth": depth,
        "messages": messages,
        "turns": turns,
        "final": final,
        "outcome": outcome,
        "error": error,
        "error_kind": error_kind,
        "score": None,
        "stats": stats,
    }


async def _run_turn(tree: _Tree, episode: _Episode, sandbox: LazySandbox,
                    messages: list[dict[str, Any]], turn_index: int, forced: bool) -> tuple[TurnRecord, str | None]:
    """One root turn: ask the model, run its code, feed the output back. Returns (turn, final)."""
    config = tree.config
    episode.budget.check()
    max_tokens = config.answer_max_tokens if forced and config.answer_max_tokens else config.root_max_tokens
    sampling = SamplingParams(max_tokens=max_tokens, temperature=config.temperature)
    call = CallContext(role=Role.ROOT, depth=episode.depth, query=episode.query, turn=turn_index, last_turn=forced,
                       hints=tree.hints)
    # A child RLM's turn is one of the tree's sub-calls: the fan-out bound covers it too.
    async with tree.semaphore if episode.depth else contextlib.nullcontext():
        completion = await tree.policy.chat(list(messages), sampling, call)
    episode.budget.add_tokens(completion.prompt_tokens + completion.completion_tokens)
    text = completion.text
    messages.append({"role": "assistant", "content": text})
    turn: TurnRecord = {
        "index": turn_index,
        "assistant": text,
        "forced": forced,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "latency_s": round(completion.latency_s, 4),
        "code_blocks": extract_code_blocks(text),
        "executions": [],
        "sub_calls": [],
        "final": None,
        "parse_error": None,
    }
    episode.subcalls = turn["sub_calls"]
    final = None
    text_final = find_final(text)
    if turn["code_blocks"] or text_final:
        final = await _run_code(episode.budget, sandbox, turn, text_final)
    else:
        turn["parse_error"] = "no code block and no FINAL"
    turn["final"] = final
    if final is None and not forced:
        if turn["executions"]:
            feedback = prompts.execution_feedback(turn["executions"], config.feedback_chars)
        elif turn["parse_error"] and turn["parse_error"] != "no code block and no FINAL":
            feedback = turn["parse_error"]
        else:
            feedback = prompts.NO_CODE_FEEDBACK
        messages.append({"role": "user", "content": feedback})
        turn["feedback"] = feedback
    tree.recording.turn(turn)  # after the feedback: the model reads whole outputs, the record may not
    return turn, final


async def _run_code(budget: Budget, session: LazySandbox, turn: TurnRecord, text_final: FinalCall | None) -> str | None:
    """Run the turn's code blocks until one calls FINAL, then a FINAL written in prose."""
    for code in turn["code_blocks"]:
        result = await session.execute(code)
        turn["executions"].append(_result_dict(code, result))
        if result.final is not None:
            return result.final
        if budget.exhausted:
            break
    if text_final is None:
        return None
    final, turn["parse_error"] = await _resolve_text_final(session, text_final)
    return final


async def _resolve_text_final(session: LazySandbox, call: FinalCall) -> tuple[str | None, str | None]:
    """FINAL(...) written in prose: the answer is its text. FINAL_VAR(name) in prose is
    looked up in the REPL, since the model meant the variable."""
    if call.kind == "FINAL":
        return call.argument, None
    result = await session.execute(f"FINAL_VAR({call.argument!r})")
    if result.final is not None:
        return result.final, None
    return None, (result.error or f"FINAL_VAR({call.argument!r}) gave no value").strip().splitlines()[-1]


def _result_dict(code: str, result: ExecResult) -> ExecutionRecord:
    return {
        "code": code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "error": result.error,
        "timed_out": result.timed_out,
        "final": result.final,
        "truncated_chars": result.truncated_chars,
        "wall_s": round(result.wall_s, 4),
        "error_kind": result.error_kind,  # None, or timeout / limit / sandbox: the sandbox ended the cell
    }


def _episode_stats(turns: list[TurnRecord], wall_s: float) -> EpisodeStats:
    def subcalls(turn_list: list[TurnRecord]) -> int:
        n = 0
        for turn in turn_list:
            for call in turn["sub_calls"]:
                n += 1
                if "child" in call:
                    n += subcalls(call["child"]["turns"])
        return n

    return {
        "turns": len(turns),
        "sub_calls": subcalls(turns),
        "root_sub_calls": sum(len(t["sub_calls"]) for t in turns),
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "completion_tokens": sum(t["completion_tokens"] for t in turns),
        "episode_wall_s": round(wall_s, 4),
    }


def run_episode_sync(*args: Any, **kwargs: Any) -> TrajectoryRecord:
    """run_episode for synchronous callers: scripts, and notebooks, whose own loop is running
    (the episode then runs on a worker thread's loop: `eventloop.run`)."""
    from rlm_train import eventloop

    return eventloop.run(run_episode(*args, **kwargs))

