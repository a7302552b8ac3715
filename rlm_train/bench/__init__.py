"""`rlm-train bench <what>`: speed and memory goals as ratios against a baseline (or an
ideal) measured in the same run. Never a timed test.

    rlm-train bench runtime     REPL round trip, session start + shared memory, loop overhead
    rlm-train bench tasks       task generation speed
    rlm-train bench generate    trajectory generation at concurrency vs ideal
    rlm-train bench train       SFT tokens/s, our recipe vs TRL defaults
    rlm-train bench http        our HTTP/1.1 client vs httpx and aiohttp (when installed)
    rlm-train bench eval        eval throughput and loop overhead vs ideal (rlm + direct methods)

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
}
TAKES_REPEATS = {"runtime", "http"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=list(BENCHES), help="which benchmark to run")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of timed scenarios (median reported)")
    parser.add_argument("--json-out", help="also write every number to this JSON file")


def main(args: argparse.Namespace) -> int:
    if args.json_out:
        from rlm_train.stage import check_output

        check_output(args.json_out, "file", "--json-out")  # before the bench, not after its numbers are lost
    module_name, fn_name = BENCHES[args.what]
    fn = getattr(importlib.import_module(module_name), fn_name)
    results = fn(repeats=args.repeats) if args.what in TAKES_REPEATS else fn()
    if args.json_out:
        from rlm_train.formats import write_text_atomic

        write_text_atomic(args.json_out, json.dumps(results, indent=2) + "\n")
    return 0


def verdict(passed: bool) -> str:
    return "ok" if passed else "MISSED"
