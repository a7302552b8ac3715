"""REPL sandbox benchmarks (wired into `rlm-train bench runtime`). Each returns a dict of numbers."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import psutil

from rlm_train.repl.api import SandboxConfig
from rlm_train.repl.session import REPLSession, _get_server


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def tree_pss_kb(root: int) -> int:
    """PSS of a zygote and every process under it: its sessions and its spare worker."""
    procs = [psutil.Process(root)]
    procs += procs[0].children(recursive=True)
    return sum(pss_kb(p.pid) for p in procs)


def _make_context(mb: int, salt: str) -> str:
    # A fresh object each call, so the zygote cache (keyed by identity) misses.
    block = (salt + "abcdefghijklmnopqrstuvwxyz0123456789 ") * 1024
    return (block * ((mb << 20) // len(block) + 1))[: mb << 20]


def bench_roundtrip(context_mb: int = 10, n: int = 500) -> dict:
    """Host -> worker -> host latency of a trivial cell (`x = 1`) with a context loaded."""
    context = _make_context(context_mb, f"rt{time.time_ns()}")
    with REPLSession(context, config=SandboxConfig(timeout_s=10)) as s:
        for _ in range(20):
            s.execute("x = 1")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.execute("x = 1")
            times.append(time.perf_counter() - t0)
    ms = [t * 1000 for t in times]
    return {"context_mb": context_mb, "n": n, "p50_ms": _pct(ms, 0.5), "p90_ms": _pct(ms, 0.9),
            "p99_ms": _pct(ms, 0.99), "mean_ms": statistics.fmean(ms), "goal_p50_ms": 1.0}


def bench_session_start(context_mb: int = 50, sessions: int = 8) -> dict:
    """Time to a ready session (cold: ships a new context; warm: context already shared)
    and the PSS of `sessions` sessions vs one (both counting the zygote and its spare
    worker). Baseline: spawning a bare interpreter."""
    t0 = time.perf_counter()
    _get_server()
    forkserver_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    baseline_spawn_s = time.perf_counter() - t0

    cfg = SandboxConfig(timeout_s=20, memory_mb=512)
    context = _make_context(context_mb, f"st{time.time_ns()}")
    started: list[REPLSession] = []
    try:
        t0 = time.perf_counter()
        first = REPLSession(context, config=cfg)
        cold_s = time.perf_counter() - t0
        started.append(first)
        first.execute("n = len(context)")  # touch the context like a real first cell
        pss_one = tree_pss_kb(first.zygote_pid)
        warm = []
        for _ in range(sessions - 1):
            t0 = time.perf_counter()
            s = REPLSession(context, config=cfg)
            warm.append(time.perf_counter() - t0)
            started.append(s)
            s.execute("n = len(context)")
        pss_all = tree_pss_kb(first.zygote_pid)
    finally:
        for s in started:
            s.close()
    return {
        "context_mb": context_mb,
        "sessions": sessions,
        "forkserver_start_ms": forkserver_s * 1000,
        "baseline_bare_python_spawn_ms": baseline_spawn_s * 1000,
        "cold_start_ms": cold_s * 1000,
        "warm_start_p50_ms": statistics.median(warm) * 1000 if warm else 0.0,
        "warm_start_max_ms": max(warm) * 1000 if warm else 0.0,
        "warm_vs_bare_spawn": (statistics.median(warm) / baseline_spawn_s) if warm else 0.0,
        "pss_one_mb": pss_one / 1024,
        f"pss_{sessions}_mb": pss_all / 1024,
        "pss_ratio": pss_all / pss_one,
        "goal_start_ms": 20.0,
        "goal_pss_ratio": 2.0,
    }


if __name__ == "__main__":
    print(bench_roundtrip())
    print(bench_session_start())
