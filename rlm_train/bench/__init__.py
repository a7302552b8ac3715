"""`rlm-train bench <what>`: speed and memory goals as ratios against a baseline (or an
ideal) measured in the same run. Never a timed test.

    rlm-train bench runtime     REPL round trip, session start + shared memory, loop overhead
    rlm-train bench tasks       task generation speed
    rlm-train bench generate    trajectory generation at concurrency vs ideal
    rlm-train bench train       SFT and GRPO tokens/s and FLOP/s as a fraction of this CPU's matmul rate
    rlm-train bench http        the client's HTTP transport vs asyncio streams and aiohttp, on asyncio
                                and uvloop: the decision table and its rule
    rlm-train bench eval        eval throughput and loop overhead vs ideal (rlm + direct methods)
    rlm-train bench soak        1,000 episodes against a server failing 5% of requests: exactly-once,
                                memory, file descriptors and processes (--episodes N to change)

One module each in this package; `scenario` is the RLM episode the runtime and generate
benches share, `sandbox` the REPL measurements the runtime bench prints. Comments
elsewhere that claim a speed name the bench that measures it.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHES: dict[str, tuple[str, str]] = {
    "runtime": ("rlm_train.bench.runtime", "bench_runtime"),
    "tasks": ("rlm_train.bench.tasks", "bench_tasks"),
    "generate": ("rlm_train.bench.generate", "bench_generate"),
    "eval": ("rlm_train.bench.eval", "bench_eval"),
    "train": ("rlm_train.bench.train", "bench_train"),
    "http": ("rlm_train.bench.http", "bench_http"),
    "soak": ("rlm_train.bench.soak", "bench_soak"),
}
TAKES_REPEATS = {"runtime", "http"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=list(BENCHES), help="which benchmark to run")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of timed scenarios (median reported)")
    parser.add_argument("--json-out", help="also write every number to this JSON file")
    parser.add_argument("--episodes", type=int, help="soak: episodes to run (default 1000)")
    parser.add_argument("--quick", action="store_true",
                        help="train: a tiny random model and one step of each (checks the bench runs; no figures)")
    server = parser.add_argument_group("bench generate --base-url URL: our harness vs `vllm bench serve` on a real server")
    server.add_argument("--base-url", help="an OpenAI-compatible vLLM server, http://HOST:PORT/v1 (bench/generate_server.py)")
    server.add_argument("--model", help="the served model (default: the first one /v1/models lists); "
                                         "bench train: the model to train (default gemma3-270m)")
    server.add_argument("--tokenizer", help="tokenizer dir for vllm bench serve (default: the model's)")
    server.add_argument("--concurrency", type=int, default=8, help="max requests in flight, both sides (default 8)")


def main(args: argparse.Namespace) -> int:
    if args.json_out:
        from rlm_train.stage import check_output

        check_output(args.json_out, "file", "--json-out")  # before the bench, not after its numbers are lost
    if args.what in TAKES_REPEATS and args.repeats < 1:
        from rlm_train.errors import UserError

        raise UserError(f"--repeats must be at least 1 (got {args.repeats}): the bench reports the median of the repeats")
    if args.episodes is not None and (args.what != "soak" or args.episodes < 1):
        from rlm_train.errors import UserError

        raise UserError(f"--episodes {args.episodes}: only `bench soak` takes it, and it must be at least 1")
    if args.quick and args.what != "train":
        from rlm_train.errors import UserError

        raise UserError(f"--quick: only `bench train` takes it, not `bench {args.what}`")
    module_name, fn_name = BENCHES[args.what]
    fn = getattr(importlib.import_module(module_name), fn_name)
    if args.base_url:
        from rlm_train.bench.generate_server import bench_generate_server
        from rlm_train.errors import UserError

        if args.what != "generate":
            raise UserError(f"--base-url: only `bench generate` runs against a server, not `bench {args.what}`")
        results = bench_generate_server(args.base_url, args.model, args.tokenizer, concurrency=args.concurrency)
    elif args.what in TAKES_REPEATS:
        results = fn(repeats=args.repeats)
    elif args.episodes is not None:
        results = fn(episodes=args.episodes)
    elif args.what == "train":
        results = fn(model=args.model, quick=args.quick)
    else:
        results = fn()
    if args.json_out:
        from rlm_train.formats import write_text_atomic

        write_text_atomic(args.json_out, json.dumps(results, indent=2) + "\n")
    return 0


def verdict(passed: bool) -> str:
    return "ok" if passed else "MISSED"
