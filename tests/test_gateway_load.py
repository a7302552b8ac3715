"""The RLM gateway under hostile load (issue 24): honest clients at a steady rate, first alone,
then while hostile clients run every attack at once. The gateway runs as users run it
(`rlm-train serve --base-url`, its own process, default settings) in front of the mock
server (a stand-in for the model, in its own process, 100 ms a call as in `bench generate`;
an honest episode is 5 calls in a row); the honest clients run
here, the attacks in a third process (rlm_train/testing/gateway_attacks.py).

Figures (printed; goals asserted): honest requests answered right (all), honest p99 latency
under attack against the attack-free run (<= 2x), the gateway's RSS and open descriptors
(bounded), the bytes of bodies read at once (within the reading budget), /health's worst
latency, and afterwards nothing of any request left running or being read."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs fastapi and uvicorn")
psutil = pytest.importorskip("psutil")

from rlm_train.testing.gateway_attacks import Honest, metric, percentile, request
from rlm_train.repl.forkserver import POOL_SIZE
from rlm_train.testing.mock_server import mock_server_process

pytestmark = pytest.mark.slow

MODEL = "mock-model"
MODEL_MS = 100  # the mock model's latency per call
BASELINE_S = 20.0
ATTACK_S = 30.0
RAMP_S = 3.0
SLOWLORIS = 1100  # half-sent requests held at once: more than the gateway's connection cap
SLOW_BODIES = 60  # requests whose body trickles in: more than the gateway's admission places
SECRET = "the text of a context file only local clients may read"


class Sampler:
    """The gateway process's RSS and open descriptors, and /health's latency, every 0.25 s."""

    def __init__(self, proc: Any, port: int):  # a psutil.Process
        self.proc, self.port = proc, port
        self.rss: list[int] = []
        self.fds: list[int] = []
        self.health_s: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.rss.append(self.proc.memory_info().rss)
                self.fds.append(self.proc.num_fds())
            except psutil.Error:  # the gateway is gone: the test says why
                return
            began = time.monotonic()
            request(self.port, "GET", "/health", timeout_s=30)
            self.health_s.append(time.monotonic() - began)
            self.stop.wait(0.25)

    def window(self) -> tuple[int, int, float]:
        """(peak RSS, peak descriptors, worst /health) since the last call."""
        out = (max(self.rss), max(self.fds), max(self.health_s))
        self.rss, self.fds, self.health_s = [], [], []
        return out


def start_gateway(base_url: str, context_dir: str, log_path: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "rlm_train.cli", "serve", "--base-url", base_url, "--gateway-model", MODEL,
           "--gateway-port", "0", "--context-dir", context_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            found = re.search(r"RLM gateway ready: http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
            if found:
                return proc, int(found.group(1))
        assert proc.poll() is None, open(log_path).read()[-3000:]
    proc.kill()
    raise AssertionError("the gateway did not start: " + open(log_path).read()[-3000:])


def test_honest_clients_are_served_while_every_attack_runs_at_once(tmp_path):
    contexts = tmp_path / "contexts"
    contexts.mkdir()
    (contexts / "doc.txt").write_text(SECRET)
    log_path = str(tmp_path / "gateway.log")
    with mock_server_process("rlm_train.testing.gateway_attacks:attack_responder", latency_ms=MODEL_MS) as base_url:
        proc, port = start_gateway(base_url, str(contexts), log_path)
        gateway = psutil.Process(proc.pid)
        attackers: subprocess.Popen | None = None
        try:
            honest = Honest(port, clients=4, period_s=1.0)
            honest.run(2.0)  # warm: the fork-server, the pool, the upstream connections
            sampler = Sampler(gateway, port)
            sampler.thread.start()
            honest.latencies.clear()
            honest.run(BASELINE_S)
            baseline = list(honest.latencies)
            base_rss, base_fds, base_health = sampler.window()

            attackers = subprocess.Popen(
                [sys.executable, "-m", "rlm_train.testing.gateway_attacks", "--port", str(port),
                 "--seconds", str(RAMP_S + ATTACK_S), "--secret", SECRET, "--slowloris", str(SLOWLORIS),
                 "--slow-bodies", str(SLOW_BODIES)],
                stdout=subprocess.PIPE, text=True)
            time.sleep(RAMP_S)  # every attack under way
            honest.latencies.clear()
            honest.run(ATTACK_S)
            attacked = list(honest.latencies)
            tally = Counter(json.loads(attackers.communicate(timeout=150)[0].splitlines()[-1]))
            peak_rss, peak_fds, worst_health = sampler.window()
            sandboxes_max = metric(port, "rlm_gateway_sandboxes_max")
            reading_max = metric(port, "rlm_gateway_reading_bytes_max")

            # Afterwards: no episode, sandbox or worker of any request is left.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (metric(port, "rlm_gateway_sandboxes") != 0
                                                   or metric(port, "rlm_gateway_episodes_running") != 0
                                                   or metric(port, "rlm_gateway_reading_bytes") != 0):
                time.sleep(0.2)
            reading_after = metric(port, "rlm_gateway_reading_bytes")
            sandboxes_after = metric(port, "rlm_gateway_sandboxes")
            running_after = metric(port, "rlm_gateway_episodes_running")
            sampler.stop.set()
            processes_after = len(gateway.children(recursive=True))
            descendants = gateway.children(recursive=True)
        finally:
            if attackers is not None and attackers.poll() is None:
                attackers.kill()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    gone, alive = psutil.wait_procs(descendants, timeout=10)
    refusals = sum(1 for line in open(log_path) if " refused " in line)

    base_p50, base_p99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    p50, p99 = percentile(attacked, 0.5), percentile(attacked, 0.99)
    figures = (
        f"honest: {len(baseline)} answered alone, {len(attacked)} under attack, {len(honest.failures)} not\n"
        f"honest latency alone p50 {base_p50:.3f}s p99 {base_p99:.3f}s; under attack p50 {p50:.3f}s "
        f"p99 {p99:.3f}s ({p99 / base_p99:.2f}x)\n"
        f"gateway RSS {base_rss / 2**20:.0f} MB alone, peak {peak_rss / 2**20:.0f} MB under attack; descriptors "
        f"{base_fds} alone, peak {peak_fds}; /health worst {base_health:.3f}s alone, {worst_health:.3f}s under attack\n"
        f"bodies being read at once (max) {reading_max / 2**20:.0f} MB\n"
        f"sandboxes at once (max) {sandboxes_max:.0f}; after: sandboxes {sandboxes_after:.0f}, episodes running "
        f"{running_after:.0f}, bodies being read {reading_after:.0f} bytes, processes {processes_after} (the fork-server and its pool of {POOL_SIZE}); "
        f"left after exit: {len(alive)}\n"
        f"operator log: {refusals} refusal lines\n"
        "attacks: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    print("\n" + figures)
    assert not honest.failures, (honest.failures[:5], figures)
    assert p99 <= 2 * base_p99, figures
    assert peak_rss - base_rss < 400 * 2**20, figures
    # The connection cap (1000), and room for sandbox channels (3 a sandbox), upstream connections, closing sockets.
    assert peak_fds < base_fds + 1000 + 512, figures
    assert worst_health < 1.0, figures
    assert tally["foreign Host LEAKED"] == 0 and tally["foreign Host 200"] == 0, figures
    assert sandboxes_max <= 64 and sandboxes_after == 0 and running_after == 0, figures
    assert reading_max <= 256 * 2**20 and reading_after == 0, figures  # gateway.max_reading_bytes
    assert processes_after <= 1 + POOL_SIZE and not alive, figures  # the fork-server and its idle pool
    for attack in ("slowloris opened", "slow body opened", "huge body", "long context_path", "foreign Host",
                   "fan-out bomb", "streamer"):
        assert any(k.startswith(attack) for k in tally), (attack, figures)  # every attack did run
