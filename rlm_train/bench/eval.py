"""`rlm-train bench eval`: eval throughput and the loop's overhead against the ideal time.

Two methods over 128 small tasks, 32 episodes at a time, against a mock OpenAI-compatible
server (its own process) answering every request in 100 ms, through the same `run_eval`
the CLI uses (a generate run per method, REPL sandbox, scoring, bootstrap report, plots):

- `rlm`: the shared scenario (`rlm_train.bench.scenario`: 3 root turns + 8 sub-calls),
  4 sequential latencies an episode;
- `direct`: the context-in-prompt baseline, one call an episode.

Ideal time of the episodes: ceil(128 / 32) = 4 waves per method, so 4 x 0.4 s for `rlm`
and 4 x 0.1 s for `direct`, 2.0 s in all. Goal: the `rlm` method's wall / ideal <= 1.35
for the median of 3 timed runs (each from a cold client and a new eval directory); `bench
generate` asks 1.2 of the same episodes at twice the concurrency, where more episodes
share each wave's start. A direct episode is one 100 ms call and starts no REPL sandbox
(its turn is a FINAL in prose); the bench prints its ratio beside what the same number
of REPL sessions, started, run and closed alone 32 at a time, take in the same run: what
a sandbox per episode would cost it. The same episodes against a server that answers at once give the
loop's own cost per episode (sandbox, code, scoring, store), and the report (2000-resample
intervals, markdown, plots) is timed apart.
"""

from __future__ import annotations

import math
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rlm_train.bench import verdict
from rlm_train.bench.sandbox import sessions_alone
from rlm_train.bench.scenario import ROOT_TURNS, SUB_CALLS, scenario_responder, write_scenario_tasks

TASKS = 128
CONCURRENCY = 32
LATENCY_S = 0.1
TIMED_RUNS = 3
GOAL_RATIO = 1.35  # the rlm method's episode wall / ideal, every sandbox layer on


def eval_responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The scenario for RLM conversations; for a direct prompt, the key its context states."""
    from rlm_train.eval.direct import DIRECT_SYSTEM_PROMPT

    if messages and messages[0].get("content") == DIRECT_SYSTEM_PROMPT:
        found = re.search(r"answer is: (\w+)", messages[-1]["content"])
        return found.group(1) if found else "unknown"
    return scenario_responder(messages, body)


def _run(base_url: str, tasks: Path, out: Path, concurrency: int) -> tuple[float, dict[str, Any]]:
    from rlm_train.eval.config import EvalConfig
    from rlm_train.eval.run import run_eval
    from rlm_train.models.openai_client import OpenAIPolicy

    config = EvalConfig(tasks=[str(tasks)], out=str(out), concurrency=concurrency, progress=False,
                        rlm={"subcall_concurrency": SUB_CALLS},
                        methods=[{"name": "rlm", "policy": "openai:mock-model", "base_urls": [base_url]},
                                 {"name": "direct", "policy": "openai:mock-model", "base_urls": [base_url],
                                  "direct": True, "max_context_chars": 4000}])

    def client() -> OpenAIPolicy:
        return OpenAIPolicy("mock-model", [base_url], max_concurrency=concurrency * SUB_CALLS, max_retries=0)

    started = time.perf_counter()
    report = run_eval(config, policies={"rlm": (client(), None), "direct": (client(), None)})
    return time.perf_counter() - started, report


def bench_eval(tasks: int = TASKS, concurrency: int = CONCURRENCY, latency_s: float = LATENCY_S) -> dict[str, Any]:
    from rlm_train.testing.mock_server import mock_server_process

    # Two servers in processes of their own: one answering after `latency_s`, one at once
    # (what is left then is the loop's own cost).
    responder = "rlm_train.bench.eval:eval_responder"
    with mock_server_process(responder, latency_ms=latency_s * 1000) as base_url, \
            mock_server_process(responder) as instant_url, \
            tempfile.TemporaryDirectory(prefix="rlm-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        write_scenario_tasks(tmp / "one.jsonl", 1)
        write_scenario_tasks(tmp / "tasks.jsonl", tasks)
        _run(base_url, tmp / "one.jsonl", tmp / "warmup", 1)  # fork-server, imports, matplotlib
        runs = [_run(base_url, tmp / "tasks.jsonl", tmp / f"run-{i}", concurrency) for i in range(TIMED_RUNS)]
        sessions_s = statistics.median(sessions_alone(tasks, concurrency, "FINAL(len(context))") for _ in range(TIMED_RUNS))
        instant = [_run(instant_url, tmp / "tasks.jsonl", tmp / f"instant-{i}", concurrency)[1]["this_run"]
                   for i in range(TIMED_RUNS)]

    waves = math.ceil(tasks / concurrency)
    ideal_method = {"rlm": waves * (ROOT_TURNS + 1) * latency_s, "direct": waves * latency_s}
    ideal = sum(ideal_method.values())
    episode_walls = [r["this_run"]["runs_s"] for _, r in runs]
    wall = statistics.median(episode_walls)
    ratio = wall / ideal
    middle = sorted(runs, key=lambda run: run[1]["this_run"]["runs_s"])[len(runs) // 2][1]
    method_s = middle["this_run"]["method_s"]
    rlm_ratios = [r["this_run"]["method_s"]["rlm"] / ideal_method["rlm"] for _, r in runs]
    rlm_ratio = statistics.median(rlm_ratios)
    report_s = statistics.median(r["this_run"]["report_s"] for _, r in runs)
    total_s = statistics.median(w for w, _ in runs)
    episodes = 2 * tasks
    instant_s = statistics.median(r["runs_s"] for r in instant)
    instant_method = sorted(instant, key=lambda r: r["runs_s"])[len(instant) // 2]["method_s"]
    scores = {name: m["score"]["all"]["mean"] for name, m in middle["methods"].items()}
    results = {
        "tasks": tasks, "methods": 2, "episodes": episodes, "concurrency": concurrency,
        "latency_ms": latency_s * 1000, "root_turns": ROOT_TURNS, "sub_calls_per_episode": SUB_CALLS,
        "episodes_wall_s": round(wall, 3), "ideal_s": round(ideal, 3), "ratio": round(ratio, 3),
        "ratios": [round(w / ideal, 3) for w in episode_walls],
        "rlm_ratio": round(rlm_ratio, 3), "rlm_ratios": [round(r, 3) for r in rlm_ratios], "goal_rlm_ratio": GOAL_RATIO,
        "repl_sessions_alone_s": round(sessions_s, 3),
        "method_s": method_s, "method_ideal_s": {k: round(v, 3) for k, v in ideal_method.items()},
        "episodes_per_s": round(episodes / wall, 1),
        "report_s": round(report_s, 3), "total_s": round(total_s, 3), "scores": scores,
        "instant_server": {"episodes_wall_s": round(instant_s, 3), "method_s": instant_method,
                           "ms_per_episode": round(1000 * instant_s / episodes, 2),
                           "episodes_per_s": round(episodes / instant_s, 1)},
    }
    print(f"eval: 2 methods x {tasks} tasks (rlm: {ROOT_TURNS} root turns + {SUB_CALLS} sub-calls; direct: 1 call), "
          f"concurrency {concurrency}, mock server {latency_s * 1000:.0f} ms")
    print(f"    rlm: wall {method_s['rlm']:.2f} s   ideal {ideal_method['rlm']:.2f} s   wall/ideal {rlm_ratio:.3f}   "
          f"goal <= {GOAL_RATIO}  {verdict(rlm_ratio <= GOAL_RATIO)}   (median of {len(runs)} runs: "
          f"{', '.join(f'{r:.2f}' for r in rlm_ratios)})")
    print(f"    direct: wall {method_s['direct']:.2f} s   ideal {ideal_method['direct']:.2f} s   "
          f"wall/ideal {method_s['direct'] / ideal_method['direct']:.2f} (it starts no sandbox; {tasks} REPL "
          f"sessions alone, {concurrency} at a time, one cell each: {sessions_s:.2f} s)")
    print(f"    both: episodes wall {wall:.2f} s   ideal {ideal:.2f} s   wall/ideal {ratio:.3f}   "
          f"(runs: {', '.join(f'{w / ideal:.2f}' for w in episode_walls)})")
    print(f"    {episodes} episodes at {episodes / wall:.1f} episodes/s; scores {scores}")
    print(f"    with a server that answers at once: {instant_s:.2f} s, {1000 * instant_s / episodes:.1f} ms of loop per "
          f"episode ({episodes / instant_s:.0f} episodes/s; " + ", ".join(
              f"{name} {s:.2f} s" for name, s in instant_method.items()) + ")")
    print(f"    report (bootstrap intervals, markdown, plots): {report_s:.2f} s; whole run_eval {total_s:.2f} s")
    return results
