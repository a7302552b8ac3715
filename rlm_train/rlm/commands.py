"""`rlm-train run`: one RLM episode on a context file; prints the answer, writes the trajectory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlm_train import eventloop
from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.formats import append_jsonl, read_context_file
from rlm_train.records import Outcome, TurnRecord
from rlm_train.stage import Output, Plan, add_stage_arguments, info, missing_inputs, prepare


def add_policy_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--policy/--sub-policy/--base-url, shared by every command that runs episodes.
    `required=False` where a recipe may name the policy instead."""
    parser.add_argument("--policy", required=required, help="scripted | openai:MODEL | hf:MODEL[+adapter:PATH]")
    parser.add_argument("--sub-policy", help="policy for llm_query sub-calls (default: the root policy)")
    parser.add_argument(
        "--base-url", action="append", default=[], help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1 (repeatable)"
    )
    parser.add_argument("--sub-base-url", action="append", default=[], help="server(s) for the sub-policy (default: --base-url)")
    add_client_arguments(parser)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The ClientOptions flags, spelled the same by every command that talks to servers."""
    parser.add_argument("--max-retries", type=int, help="openai: retries per request on connection errors/429/5xx (default 5)")
    parser.add_argument("--request-timeout-s", type=float, help="openai: seconds per request before it is retried (default 120)")
    parser.add_argument("--max-concurrency", type=int, help="openai: requests in flight per policy (default 64)")


def client_flags(args: argparse.Namespace) -> dict:
    """Those flags as dotted config keys (None where not given), for load_config(flags=...)."""
    return {"client.max_retries": args.max_retries, "client.request_timeout_s": args.request_timeout_s,
            "client.max_concurrency": args.max_concurrency}


def client_options(args: argparse.Namespace, base=None):
    """The ClientOptions the flags set, on top of `base` (a recipe's)."""
    from rlm_train.policies.spec import ClientOptions

    given = {key.partition(".")[2]: value for key, value in client_flags(args).items() if value is not None}
    return (base or ClientOptions()).model_copy(update=given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-file", required=True, help="the context: UTF-8 text, or .json (str/list/dict)")
    parser.add_argument("--query", required=True, help="the question to answer about the context")
    add_policy_arguments(parser)
    parser.add_argument("--max-depth", type=int, help="rlm_query recursion depth (default 1)")
    parser.add_argument("--max-iterations", type=int, help="root turns before 'answer now' (default 8)")
    parser.add_argument("--family", help="task family hint for the scripted teacher (e.g. niah)")
    parser.add_argument("--trajectory-out", help="append the trajectory record to this JSONL file")
    parser.add_argument("--quiet", action="store_true", help="no per-turn progress lines on stderr")
    add_stage_arguments(parser, recipe_required=False, config_name="RLMConfig", example="max_iterations=4")


def print_turn(turn: TurnRecord) -> None:
    """One progress line per root turn on stderr."""
    errors = sum(1 for e in turn["executions"] if e["error"])
    parts = [
        f"turn {turn['index'] + 1}{' (answer now)' if turn['forced'] else ''}:",
        f"{len(turn['code_blocks'])} code block(s)",
        f"{len(turn['sub_calls'])} sub-call(s)",
        f"{turn['completion_tokens']} tokens",
        f"{turn['latency_s'] + sum(e['wall_s'] for e in turn['executions']):.2f}s",
    ]
    if errors:
        parts.append(f"{errors} cell error(s)")
    if turn["parse_error"]:
        parts.append(turn["parse_error"])
    if turn["final"] is not None:
        parts.append("FINAL")
    print(" ".join(parts[:1]) + " " + ", ".join(parts[1:]), file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from rlm_train.policies.spec import build_policies, parse_policy_spec
    from rlm_train.rlm import RLMConfig, run_episode

    config = load_config(RLMConfig, args.recipe, args.overrides,
                         flags={"max_depth": args.max_depth, "max_iterations": args.max_iterations})
    if not args.query.strip():
        raise UserError("--query is empty; pass the question to answer about the context, e.g. --query 'Who wrote it?'")
    policies = {"policy": args.policy, "sub_policy": args.sub_policy}
    for spec in policies.values():
        if spec:
            parse_policy_spec(spec)  # a bad spec fails a dry run too
    outputs = [Output("trajectory", args.trajectory_out, "file", "--trajectory-out")] if args.trajectory_out else []
    inputs = {"context_file": args.context_file, "query": args.query, **policies,
              "base_url": args.base_url, "sub_base_url": args.sub_base_url}
    notes = [*info("answer: printed on stdout"), *missing_inputs({"context_file": args.context_file})]
    # Read before the plan, so an empty or unreadable file fails a dry run too (a missing one is a plan note).
    context = read_context_file(args.context_file) if Path(args.context_file).exists() else None
    if prepare("run", args, config, Plan(inputs={k: v for k, v in inputs.items() if v}, outputs=outputs, notes=notes)):
        return 0
    if context is None:
        context = read_context_file(args.context_file)
    policy, sub_policy = build_policies(args.policy, args.sub_policy, args.base_url, args.sub_base_url,
                                        client_options(args))
    hints = {"family": args.family} if args.family else {}

    async def go():
        try:
            on_turn = None if args.quiet else print_turn
            return await run_episode(args.query, context, policy, sub_policy, config, hints=hints, on_turn=on_turn)
        finally:
            await policy.aclose()
            if sub_policy is not None:
                await sub_policy.aclose()

    record = eventloop.run(go())
    if args.trajectory_out:
        Path(args.trajectory_out).parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(args.trajectory_out, record)
    stats = record["stats"]
    print(
        f"[{record['outcome']}] {stats['turns']} turns, {stats['sub_calls']} sub-calls, "
        f"{stats['tokens_total']} tokens, {stats['wall_s']:.2f}s"
        + (f" -> {args.trajectory_out}" if args.trajectory_out else ""),
        file=sys.stderr,
    )
    if record["final"] is not None:
        print(record["final"])
    if record["outcome"] == Outcome.FINAL:
        return 0
    reason = (record["error"] or "").splitlines()[0] if record["error"] else "the model never called FINAL"
    if record["final"] is None:
        raise UserError(f"no answer ({record['outcome']}): {reason}")
    return 0
