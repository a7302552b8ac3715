"""`rlm-train bench soak`: 1,000 episodes against a local mock server that fails 5% of its
chat requests in every way it can (500s, hangs, reset connections, garbage bodies).

The episodes are the shared scenario (`rlm_train.bench.scenario`: 3 root turns + 8
sub-calls each, ~11 requests an episode), run by the same `run_generate` the CLI uses
(REPL sandbox, shards, scoring, summary). The server runs in a process of its own and is
left out of every count below.

Checked, each a verdict:
- exactly one record per (task, sample), every line whole;
- memory does not grow without bound: this process's RSS and the RSS of its whole tree
  (the REPL fork-server, zygotes and workers) are sampled every second and printed; the
  median of the last quarter of the run is compared with that of the second quarter (the
  first quarter is the warm-up: pools filling, caches loading);
- file descriptors and processes are back to their starting counts once the sandbox's
  fork-server is shut down (as it is when a CLI command exits); the starting counts are
  taken after a 4-episode warm-up, so one-time set-up (uvloop's wake-up pipe) is not counted.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rlm_train.bench import verdict
from rlm_train.bench.scenario import SUB_CALLS, write_scenario_tasks

EPISODES = 1000
FAIL_P = 0.05
CONCURRENCY = 32
LATENCY_MS = 20.0
GROWTH_LIMIT = 1.25  # last-quarter median RSS / second-quarter median, beyond which memory "grows"
GROWTH_SLACK_MB = 32  # ... and by more than this much (small processes jitter by a few MB)


class _Sampler:
    """RSS of this process and of its process tree (the server excepted), and the host's
    used memory, once a second while the run goes on."""

    def __init__(self, exclude: set[int], interval_s: float = 1.0):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.exclude = exclude
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int, int, int]] = []  # (t, self rss, tree rss, processes, host used)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def tree(self) -> list[Any]:
        return [p for p in [self.me, *self.me.children(recursive=True)] if p.pid not in self.exclude]

    def sample(self) -> tuple[float, int, int, int, int]:
        tree = 0
        procs = self.tree()
        for p in procs:
            try:
                tree += p.memory_info().rss
            except self.psutil.Error:  # a REPL worker that just exited
                pass
        vm = self.psutil.virtual_memory()
        return (time.monotonic() - self.started, self.me.memory_info().rss, tree, len(procs), vm.total - vm.available)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _start_server(fail_p: float, latency_ms: float, seed: int) -> tuple[subprocess.Popen, str]:
    import re
    import select

    cmd = [sys.executable, "-m", "rlm_train.testing.mock_server", "--port", "0", "--latency-ms", str(latency_ms),
           "--responder", "rlm_train.bench.scenario:scenario_responder", "--fail-p", str(fail_p),
           "--fail-mode", "mix", "--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline() if select.select([proc.stdout], [], [], 30)[0] else ""
    match = re.search(r"(http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"mock server did not start: {line!r}")
    return proc, match.group(1)


def _mb(n: float) -> float:
    return n / (1 << 20)


def _quarter_medians(values: list[int]) -> tuple[float, float]:
    """Median of the second quarter and of the last quarter of a series (a short series:
    its largest value for both, so nothing is called growth on too few samples)."""
    n = len(values)
    if n < 8:
        return float(max(values)), float(max(values))
    q = n // 4
    return statistics.median(values[q:2 * q]), statistics.median(values[-q:])


def bench_soak(episodes: int = EPISODES, fail_p: float = FAIL_P, concurrency: int = CONCURRENCY,
               latency_ms: float = LATENCY_MS, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    import psutil

    from rlm_train.repl import client as repl_client
    from rlm_train.rlm import RLMConfig
    from rlm_train.rollouts import store
    from rlm_train.rollouts.generate import GenerateConfig, run_generate

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    me = psutil.Process()
    server, url = _start_server(fail_p, latency_ms, seed)
    try:
        with tempfile.TemporaryDirectory(prefix="rlm-soak-warmup-") as tmp:
            # One-time set-up (the event loop's wake-up pipe, imports) is not what a soak looks for.
            write_scenario_tasks(Path(tmp) / "tasks.jsonl", 4)
            run_generate(GenerateConfig(tasks=str(Path(tmp) / "tasks.jsonl"), out=str(Path(tmp) / "run"),
                                        policy="scripted", progress=False))
        repl_client.shutdown()
        start_fds = me.num_fds()
        start_procs = len([p for p in me.children(recursive=True) if p.pid != server.pid])
        with tempfile.TemporaryDirectory(prefix="rlm-soak-") as tmp:
            tasks = Path(tmp) / "tasks.jsonl"
            write_scenario_tasks(tasks, episodes)
            run_out = Path(tmp) / "run"
            config = GenerateConfig(
                tasks=str(tasks), out=str(run_out), policy="openai:mock-model", base_urls=[url],
                concurrency=concurrency, progress=False, max_consecutive_failures=64,
                client={"request_timeout_s": 2.0, "max_retries": 8, "max_concurrency": concurrency * SUB_CALLS},
                rlm=RLMConfig(max_iterations=4, subcall_concurrency=SUB_CALLS))
            say(f"soak: {episodes} episodes, {concurrency} at a time, against {url} failing {fail_p:.0%} of chat "
                f"requests (500 / hang / reset / garbage)")
            sampler = _Sampler(exclude={server.pid})
            started = time.monotonic()
            with sampler:
                summary = run_generate(config)
            wall = time.monotonic() - started
            lines = [line for p in store.shard_files(run_out) for line in p.read_text().splitlines()]
            records = [json.loads(line) for line in lines]
            pairs = Counter((r["task_id"], r["sample"]) for r in records)
            procs_after_run = len(sampler.tree()) - 1
        repl_client.shutdown()  # what a CLI command's exit does
        time.sleep(0.5)
        end_fds = me.num_fds()
        end_procs = len([p for p in me.children(recursive=True) if p.pid != server.pid])
        injected = _server_counts(url)
    finally:
        server.terminate()
        server.wait(timeout=10)

    samples = sampler.samples or [sampler.sample()]
    self_rss = [s[1] for s in samples]
    tree_rss = [s[2] for s in samples]
    host = [s[4] for s in samples]
    self_mid, self_end = _quarter_medians(self_rss)
    tree_mid, tree_end = _quarter_medians(tree_rss)

    def bounded(mid: float, end: float) -> bool:
        return end <= mid * GROWTH_LIMIT or _mb(end - mid) <= GROWTH_SLACK_MB

    exactly_once = len(records) == episodes and set(pairs.values()) == {1}
    checks = {
        "exactly_once": exactly_once,
        "self_rss_bounded": bounded(self_mid, self_end),
        "tree_rss_bounded": bounded(tree_mid, tree_end),
        "fds_back": end_fds <= start_fds,
        "processes_back": end_procs <= start_procs,
    }
    result = {
        "episodes": episodes, "records": len(records), "wall_s": round(wall, 1),
        "episodes_per_s": round(episodes / wall, 2), "outcomes": summary["outcomes"],
        "retries": summary["this_run"]["retries"], "injected": injected,
        "rss_mb": {"self": {"second_quarter": round(_mb(self_mid), 1), "last_quarter": round(_mb(self_end), 1),
                            "max": round(_mb(max(self_rss)), 1)},
                   "tree": {"second_quarter": round(_mb(tree_mid), 1), "last_quarter": round(_mb(tree_end), 1),
                            "max": round(_mb(max(tree_rss)), 1)},
                   "host_used": {"first": round(_mb(host[0]), 1), "last": round(_mb(host[-1]), 1),
                                 "max": round(_mb(max(host)), 1)}},
        "samples": [[round(t, 1), round(_mb(a), 1), round(_mb(b), 1), n, round(_mb(h), 1)] for t, a, b, n, h in samples],
        "fds": {"start": start_fds, "end": end_fds},
        "processes": {"start": start_procs, "after_run": procs_after_run, "end": end_procs},
        "checks": checks,
    }
    say(f"  {len(records)} records for {episodes} episodes in {wall:.1f}s ({episodes / wall:.1f} ep/s), "
        f"outcomes {summary['outcomes']}, {summary['this_run']['retries']} retries; server injected {injected}"
        f"  [{verdict(exactly_once)}]")
    step = max(1, len(samples) // 12)
    say("  t(s)   self RSS MB   tree RSS MB   processes   host used MB")
    for t, a, b, n, h in samples[::step]:
        say(f"  {t:5.0f}   {_mb(a):11.1f}   {_mb(b):11.1f}   {n:9d}   {_mb(h):12.1f}")
    say(f"  RSS, median of the 2nd vs the last quarter: self {_mb(self_mid):.1f} -> {_mb(self_end):.1f} MB "
        f"[{verdict(checks['self_rss_bounded'])}], tree {_mb(tree_mid):.1f} -> {_mb(tree_end):.1f} MB "
        f"[{verdict(checks['tree_rss_bounded'])}]")
    say(f"  file descriptors {start_fds} -> {end_fds} [{verdict(checks['fds_back'])}], child processes "
        f"{start_procs} -> {procs_after_run} during the run -> {end_procs} after the sandbox shut down "
        f"[{verdict(checks['processes_back'])}]")
    return result


def _server_counts(url: str) -> dict[str, int]:
    """What the mock server counted (ok, error_500, hang, drop, garbage), from its /metrics."""
    import re
    import urllib.request

    origin = url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(origin + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {k: int(float(v)) for k, v in re.findall(r'^mock_requests_total\{outcome="(\w+)"\} (\S+)', text, re.M)}
