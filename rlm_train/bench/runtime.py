"""`rlm-train bench runtime`: (a) REPL round trip, (b) session start and shared memory,
(c) the cost of each sandbox isolation layer, (d) the RLM loop's overhead on the shared
scenario (`rlm_train.bench.scenario`) against a local mock server, with the reference
library `rlms` side by side when it is installed, (e) the host's CPU per cell when 64
episodes' cells run at once on one event loop, as in a generation run."""

from __future__ import annotations

import gc
import importlib
import logging
import statistics
import time
from typing import Any

from rlm_train.bench import verdict
from rlm_train.bench.scenario import ROOT_TURNS, RUNTIME_SUB_CALLS, scenario_context

RUNTIME_KEY = "runtime"  # the answer the scenario's context states


def _time_ours(base_url: str, context: str, repeats: int) -> tuple[list[float], dict]:
    """Episodes one after another on one event loop and one client, as `generate` runs them."""
    from rlm_train.models.openai_client import OpenAIPolicy
    from rlm_train.rlm import RLMConfig, run_episode
    from rlm_train import eventloop

    async def go():
        policy = OpenAIPolicy("mock-model", [base_url], max_retries=0)
        config = RLMConfig(subcall_concurrency=RUNTIME_SUB_CALLS)
        walls, traj = [], None
        try:
            for _ in range(repeats):
                started = time.perf_counter()
                traj = await run_episode("How many chunks?", context, policy, config=config)
                walls.append(time.perf_counter() - started)
        finally:
            await policy.aclose()
        assert traj is not None  # repeats >= 1
        assert traj["final"] == RUNTIME_KEY, f"scenario went wrong: {traj['outcome']} {traj['error']}"
        return walls, traj

    return eventloop.run(go())


def _time_rlms(base_url: str, context: str, repeats: int) -> tuple[list[float], Any]:
    from rlm import RLM  # the reference library, PyPI `rlms`

    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "mock-model", "base_url": base_url, "api_key": "EMPTY"},
        max_iterations=6,
        max_concurrent_subcalls=RUNTIME_SUB_CALLS,
    )
    walls: list[float] = []
    result: Any = None
    # The reference client logs a harmless "event loop is closed" at teardown; keep it off our output.
    asyncio_log = logging.getLogger("asyncio")
    level, asyncio_log.level = asyncio_log.level, logging.CRITICAL
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            result = rlm.completion(context, root_prompt="How many chunks?")
            walls.append(time.perf_counter() - started)
        del rlm
        gc.collect()  # its clients are torn down here, while the log is quiet
    finally:
        asyncio_log.setLevel(level)
    assert str(result.response).strip() == RUNTIME_KEY, f"rlms scenario went wrong: {result.response!r}"
    return walls, result


def _rlms_available() -> bool:
    try:
        importlib.import_module("rlm.core.rlm")
        return True
    except Exception:
        return False


def _scenario(latency_s: float, repeats: int, context: str) -> dict[str, Any]:
    from rlm_train.testing.mock_server import mock_server_process

    ideal = (ROOT_TURNS + 1) * latency_s  # the root calls + 1 round of parallel sub-calls
    out: dict[str, Any] = {"latency_ms": latency_s * 1000, "ideal_s": ideal}
    runners = [("rlm_train", _time_ours, "runtime_responder")]
    if _rlms_available():
        runners.append(("rlms", _time_rlms, "rlms_runtime_responder"))
    for label, runner, responder in runners:
        with mock_server_process(f"rlm_train.bench.scenario:{responder}", latency_ms=latency_s * 1000) as base_url:
            runner(base_url, context, 1)  # warm-up: fork-server, imports
            walls, _ = runner(base_url, context, repeats)
        out[label] = {"median_s": statistics.median(walls), "min_s": min(walls), "runs": len(walls)}
    return out


CELL_CPU_SESSIONS = 64
CELL_CPU_CELLS = 40  # per session
GOAL_CELL_CPU_MS = 0.08


class _InstantSubModel:
    """A sub-model stand-in that answers at once, on the loop: what is left is the host's cost."""

    async def llm_batch(self, prompts: list[str]) -> list[str]:
        return ["ok"] * len(prompts)

    async def rlm_batch(self, requests: list[tuple[str, Any]]) -> list[str]:
        return ["ok"] * len(requests)


def host_cpu_per_cell(sessions: int = CELL_CPU_SESSIONS, cells: int = CELL_CPU_CELLS,
                      code: str = "x = 1") -> float:
    """Milliseconds of this process's CPU per cell when `sessions` episodes' sandboxes run
    `cells` cells each, all at once on one event loop through the RLM loop's own path
    (`rlm.sandboxes.EpisodeSandbox`); session start and close are not counted."""
    import asyncio

    from rlm_train import eventloop
    from rlm_train.repl.api import SandboxConfig
    from rlm_train.rlm.budget import SandboxSlots
    from rlm_train.rlm.sandboxes import CallTree, EpisodeSandbox

    async def go() -> float:
        tree = CallTree(asyncio.get_running_loop(), SandboxSlots(sessions, None, "bench"))
        boxes = [EpisodeSandbox(tree, await tree.slots.take(60), f"context {i}", SandboxConfig(), _InstantSubModel())
                 for i in range(sessions)]
        await asyncio.gather(*(box.execute("pass") for box in boxes))  # started, one cell run

        async def run(box: EpisodeSandbox) -> None:
            for _ in range(cells):
                result = await box.execute(code)
                assert result.error is None, result.error

        cpu = time.process_time()
        await asyncio.gather(*(run(box) for box in boxes))
        cpu = time.process_time() - cpu
        for box in boxes:
            box.close()
        await tree.wait_closed()
        return 1000 * cpu / (sessions * cells)

    return eventloop.run(go())


def bench_cell_cpu(rounds: int = 3) -> dict[str, Any]:
    trivial = [host_cpu_per_cell() for _ in range(rounds)]
    subcall = [host_cpu_per_cell(code="x = llm_query('hi')") for _ in range(rounds)]
    alone = [host_cpu_per_cell(sessions=1, cells=400) for _ in range(rounds)]
    return {"sessions": CELL_CPU_SESSIONS, "cells_per_session": CELL_CPU_CELLS,
            "trivial_ms": round(statistics.median(trivial), 4), "trivial_runs_ms": [round(v, 4) for v in trivial],
            "one_subcall_ms": round(statistics.median(subcall), 4), "one_subcall_runs_ms": [round(v, 4) for v in subcall],
            "alone_ms": round(statistics.median(alone), 4), "goal_ms": GOAL_CELL_CPU_MS}


def bench_runtime(repeats: int = 5) -> dict[str, Any]:
    from rlm_train.bench.sandbox import bench_layers, bench_roundtrip_ratio, bench_session_start

    results: dict[str, Any] = {}
    print("(a) trivial cell round trip, 10 MB context: every layer on, and without the layers issue 11 added "
          "(cgroups, minimal root, seccomp + keyring) in the same process, rounds alternating the order", flush=True)
    rt = bench_roundtrip_ratio(context_mb=10)
    results["roundtrip"] = rt
    goal = rt["goal_p50_ms"]
    print(f"    p50 {rt['p50_ms']:.3f} ms   p90 {rt['p90_ms']:.3f} ms   goal p50 < {goal:g} ms  {verdict(rt['p50_ms'] < goal)}")
    print(f"    without those layers p50 {rt['bare_p50_ms']:.3f} ms: ratio {rt['ratio']:.2f} (median of {rt['rounds']} "
          f"paired rounds, range {rt['ratio_min']:.2f}-{rt['ratio_max']:.2f}; {rt['added_ms'] * 1000:+.0f} us)  "
          f"goal <= {rt['goal_ratio']:g} (0.1 ms over the 0.068 ms a736554 measured quiet)  {verdict(rt['ratio'] <= rt['goal_ratio'])}")

    print("(b) new session, 50 MB context; 8 sessions sharing it", flush=True)
    ss = bench_session_start(context_mb=50, sessions=8)
    results["session_start"] = ss
    goal = ss["goal_start_ms"]
    print(f"    cold (ships the context) {ss['cold_start_ms']:.1f} ms   warm p50 {ss['warm_start_p50_ms']:.1f} ms   goal < {goal:g} ms  {verdict(ss['warm_start_p50_ms'] < goal)}")
    ratio, goal = ss["pss_ratio"], ss["goal_pss_ratio"]
    all_mb = ss[f"pss_{ss['sessions']}_mb"]
    print(f"    memory: 1 session {ss['pss_one_mb']:.0f} MB, {ss['sessions']} sessions {all_mb:.0f} MB  ratio {ratio:.2f}x  goal < {goal:g}x  {verdict(ratio < goal)}")

    results["layers"] = _print_layers(bench_layers())

    context = scenario_context(RUNTIME_KEY, "The quick brown fox jumps over the lazy dog. ", 1_000_000)
    print(f"(d) the shared scenario: {ROOT_TURNS} root turns + {RUNTIME_SUB_CALLS} batched sub-calls, 1 MB context, "
          "local mock server", flush=True)
    for latency in (0.1, 0.0):
        sc = _scenario(latency, repeats, context)
        results[f"scenario_{int(latency * 1000)}ms"] = sc
        ours = sc["rlm_train"]["median_s"]
        if latency:
            ratio = ours / sc["ideal_s"]
            line = f"    {latency * 1000:.0f} ms latency: rlm_train {ours:.3f} s  wall/ideal {ratio:.2f} (ideal {sc['ideal_s']:.1f} s)  goal <= 1.15  {verdict(ratio <= 1.15)}"
        else:
            line = f"      0 ms latency: rlm_train {ours * 1000:.1f} ms (the loop's own fixed cost)  goal < 60 ms  {verdict(ours < 0.060)}"
        if "rlms" in sc:
            theirs = sc["rlms"]["median_s"]
            line += f"\n                    reference rlms {theirs:.3f} s  (rlms / rlm_train = {theirs / ours:.2f}x)"
        print(line, flush=True)
    if not _rlms_available():
        print("    (install the reference library `rlms` to time it side by side)")

    print(f"(e) host CPU per cell: {CELL_CPU_SESSIONS} episodes' sandboxes running {CELL_CPU_CELLS} cells each at "
          "once on one event loop (the RLM loop's path; this process's CPU, not the workers')", flush=True)
    cc = bench_cell_cpu()
    results["cell_cpu"] = cc
    print(f"    trivial cell {cc['trivial_ms']:.3f} ms   goal <= {GOAL_CELL_CPU_MS:g} ms  "
          f"{verdict(cc['trivial_ms'] <= GOAL_CELL_CPU_MS)}   (runs: {', '.join(f'{v:.3f}' for v in cc['trivial_runs_ms'])})")
    print(f"    a cell with one llm_query (answered at once on the loop) {cc['one_subcall_ms']:.3f} ms; "
          f"one session alone, trivial cells {cc['alone_ms']:.3f} ms")
    return results


LAYER_LABELS = {
    "all_on": "all layers on",
    "cgroups_off": "cgroups off",
    "minimal_root_off": "minimal root off",
    "seccomp_off": "seccomp + keyring off",
    "all_off": "all 3 off (baseline)",
}


def _print_layers(lr: dict[str, Any]) -> dict[str, Any]:
    """Table (c): each variant's medians; cost = what the layer adds (all on - it off)."""
    from rlm_train.bench.sandbox import LAYER_METRICS
    print(f"(c) cost of each isolation layer: {lr['rounds']} rounds alternating the variants' order, round trip "
          f"pinned to CPU {lr['pinned_cpu']}; medians; cost = all on - layer off, paired per round ({lr['seconds']:.0f} s)")
    print(f"    {'':28}{'round trip p50 ms':>19}{'warm start p50 ms':>19}{'start CPU ms':>19}{'PSS 8 vs 1':>14}")
    print(f"    {'variant':28}{'value':>10}{'cost':>9}{'value':>10}{'cost':>9}{'value':>10}{'cost':>9}{'ratio':>7}{'cost':>7}")
    for name, label in LAYER_LABELS.items():
        v = lr["variants"][name]
        c = lr["cost"].get(name)
        rt_c, ws_c, cpu_c, pss_c = (f"{c['roundtrip_p50_ms']:+.4f}", f"{c['warm_start_p50_ms']:+.2f}",
                                    f"{c['worker_start_cpu_ms']:+.2f}", f"{c['pss_ratio']:+.3f}") if c else ("", "", "", "")
        print(f"    {label:28}{v['roundtrip_p50_ms']:>10.4f}{rt_c:>9}{v['warm_start_p50_ms']:>10.2f}{ws_c:>9}"
              f"{v['worker_start_cpu_ms']:>10.2f}{cpu_c:>9}{v['pss_ratio']:>7.3f}{pss_c:>7}")
    noise = {m: max(sp[m] for sp in lr["cost_spread"].values()) for m in LAYER_METRICS}
    print(f"    noise (largest half-IQR of the paired differences): round trip {noise['roundtrip_p50_ms']:.4f} ms, "
          f"warm start {noise['warm_start_p50_ms']:.2f} ms, worker start CPU {noise['worker_start_cpu_ms']:.2f} ms, "
          f"PSS ratio {noise['pss_ratio']:.3f}")
    return lr
