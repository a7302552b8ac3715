"""The host is bounded by what it accepts, not by what it is sent (issue 24, third pass).

Hostile cells through the public REPL API, each checked from the host's side:
1. a legal frame under the size cap whose values would expand ~25x when decoded is
   refused from its bytes, before decoding: no host thread stalls on it;
2. the session's CPU budget holds while its cell waits on sub-calls (the session is
   frozen then, or its CPU time polled where background work is allowed);
3. the host's checking of sub-call requests runs on the cell's clock, and a session
   without a sub-model refuses a request before it looks at its items.
"""

from __future__ import annotations

import os
import threading
import time

from rlm_train.repl import REPLSession, SandboxConfig
from rlm_train.repl.client import get_server

from sandbox_attack import Heartbeat, needs_root, _session_processes, _uid_of


def _request_cell(payload: bytes, times: int | None = 1) -> str:
    """Cell code that writes `payload` to the host channel as one frame, `times` times
    (None: until the cell is stopped), reading the host's reply after each."""
    loop = "while True:" if times is None else f"for _ in range({times}):"
    return ("import os, pickle, socket, struct\n"
            f"p = {payload!r}\n"
            "sock = socket.socket(fileno=os.dup(3))\n"
            f"{loop}\n"
            "    sock.sendall(struct.pack('<Q', len(p)) + p)\n"
            "    n = struct.unpack('<Q', sock.recv(8, socket.MSG_WAITALL))[0]\n"
            "    reply = pickle.loads(sock.recv(n, socket.MSG_WAITALL))\n"
            "print(reply['error'])")


def _empty_lists(n: int) -> bytes:
    return b"[" + b"[]," * (n - 1) + b"[]]"


# =========================================================================== 1. frames that expand
def test_a_frame_that_would_expand_is_refused_from_its_bytes():
    """31 MB of `[],` (legal, under the 32 MB cap) decodes to ~11M lists, ~25x its bytes,
    with the GIL held for seconds. The host counts its values first and ends the session:
    a heartbeat thread and another session's round trips go on meanwhile."""
    cfg = SandboxConfig(timeout_s=20, memory_mb=512)
    assert cfg.max_message_mb == 32
    n = ((31 << 20) - 40) // 3
    code = ("import os, socket, struct\n"
            f"p = b'{{\"op\": \"llm\", \"items\": [' + b'[],' * {n - 1} + b'[]]}}'\n"
            "socket.socket(fileno=os.dup(3)).sendall(struct.pack('<Q', len(p)) + p)\n"
            "import time\ntime.sleep(30)")
    worst_trip = [0.0]
    errors: list = []
    stop = threading.Event()

    def neighbour(s: REPLSession):
        while not stop.is_set():
            t = time.monotonic()
            r = s.execute("x = 1")
            worst_trip[0] = max(worst_trip[0], time.monotonic() - t)
            if r.error:
                errors.append(r.error)
            time.sleep(0.005)

    with REPLSession("ctx", config=cfg, llm=lambda p: "ok") as s, REPLSession("other", config=cfg) as other:
        s.execute("keep = 1")
        thread = threading.Thread(target=neighbour, args=(other,), daemon=True)
        thread.start()
        beat = Heartbeat()
        t0 = time.monotonic()
        try:
            r = s.execute(code)
        finally:
            gap = beat.close()
            stop.set()
            thread.join()
        took = time.monotonic() - t0
        assert gap < 0.5, f"the host stalled for {gap:.2f}s"
        assert worst_trip[0] < 0.5 and not errors, f"another session's round trip took {worst_trip[0]:.2f}s {errors}"
        assert r.restarted and r.error_kind == "sandbox" and "more than 100,000 values" in r.error, r
        assert took < 5, took
        assert s.execute("print(40 + 2)").stdout == "42\n"


def test_text_full_of_commas_is_one_value_and_too_many_values_are_a_cell_error():
    """Counting from bytes reads strings as strings: 6 MB of ',:[{' inside one prompt pass
    intact. A request with more values than the host takes fails in the cell, before
    anything is sent, and the session goes on."""
    seen: list[str] = []
    with REPLSession("ctx", config=SandboxConfig(timeout_s=20, memory_mb=512),
                     llm=lambda p: seen.append(p) or str(len(p))) as s:
        r = s.execute("print(llm_query('\\\\\"a,b:[{' * 600_000))")
        assert r.error is None and r.stdout == f"{len(seen[0])}\n" and seen[0] == '\\"a,b:[{' * 600_000, r
        r = s.execute("llm_query_batched(['x'] * 120_000)")
        assert not r.restarted and "ValueError" in r.error and "more than 100,000 values" in r.error, r
        assert len(seen) == 1
        assert s.execute("print(40 + 2)").stdout == "42\n"


# =========================================================================== 2. CPU while waiting
def _cpu_usage_s(uid: int) -> float:
    """CPU seconds the group of the session running as `uid` was charged so far (read from
    the cgroup itself: it outlives the session's worker)."""
    server = get_server()
    group = os.path.join(server.cgroup_paths["cpu_time"], f"{server.pid}.{uid}")
    if server.cgroup_paths.get("cpu_time_kind") == "v2":
        stat = dict(line.split() for line in open(os.path.join(group, "cpu.stat")))
        return int(stat["usage_usec"]) / 1e6
    return int(open(os.path.join(group, "cpuacct.usage")).read()) / 1e9


SPINNERS = ("import os\nfor _ in range(3):\n    if os.fork() == 0:\n        while True:\n            pass\n")


@needs_root
def test_cpu_budget_holds_while_the_cell_waits_on_sub_calls():
    """Three forked spinners (each under its own RLIMIT_CPU), then 4.5 s of sub-calls: the
    session is frozen while it waits, so it uses none of its budget then (unfrozen, the
    spinners used 2-6 CPU-s here, with the machine busy or not)."""
    cfg = SandboxConfig(timeout_s=20, memory_mb=256, cpu_time_s=2, max_cpus=2)
    with REPLSession("ctx", config=cfg, llm=lambda p: time.sleep(1.5) or "ok") as s:
        s.execute("pass")
        uid = _uid_of(s)
        before = _cpu_usage_s(uid)
        r = s.execute(SPINNERS + "for _ in range(3):\n    llm_query('x')\nprint('done')")
        used = _cpu_usage_s(uid) - before
        assert r.error is None and r.stdout == "done\n" and r.subcall_wait_s >= 4.5, r
        assert used < 0.3, f"the session used {used:.2f} CPU-s while its cell waited (budget 2)"
        assert _session_processes(uid) == [s.pid]


@needs_root
def test_cpu_budget_is_polled_while_a_cell_with_background_work_waits():
    """Background work allowed, so nothing is frozen: the host reads the session's CPU time
    while the cell waits and kills it at the budget, with a clear error."""
    cfg = SandboxConfig(timeout_s=20, memory_mb=256, cpu_time_s=0.5, max_cpus=2, allow_background=True)
    with REPLSession("ctx", config=cfg, llm=lambda p: time.sleep(5) or "ok") as s:
        s.execute("pass")
        uid = _uid_of(s)
        before = _cpu_usage_s(uid)
        r = s.execute(SPINNERS + "llm_query('x')")
        used = _cpu_usage_s(uid) - before
        assert r.restarted and r.error_kind == "limit" and "CPUTimeExceeded" in r.error, r
        assert used < 0.5 + 0.4, f"the session used {used:.2f} CPU-s against a budget of 0.5"
        assert _session_processes(uid) == []
        assert s.execute("print(40 + 2)").stdout == "42\n"


# =========================================================================== 3. checks on the cell's clock
WALKED = b'{"op": "rlm", "items": [["q", ' + _empty_lists(30_000) + b']]}'


def test_checking_sub_call_requests_runs_on_the_cell_clock():
    """A cell that sends requests in a loop, each costly to check, ends at timeout_s: the
    host's checking is the cell's time, not time waiting on the sub-model."""
    with REPLSession("ctx", config=SandboxConfig(timeout_s=1.5, memory_mb=256), llm=lambda p: "ok") as s:
        r = s.execute(_request_cell(WALKED, times=None))
        assert r.timed_out and r.error_kind == "timeout", r
        assert r.wall_s < 1.5 + 1.0, f"a cell with timeout_s=1.5 ran {r.wall_s:.1f}s"
        assert s.execute("print(40 + 2)").stdout == "42\n"


def test_a_session_without_a_sub_model_refuses_before_it_looks_at_a_request():
    with REPLSession("ctx", config=SandboxConfig(timeout_s=20, memory_mb=256)) as s:
        r = s.execute(_request_cell(WALKED, times=30))
        assert r.error is None and "no sub-model configured" in r.stdout, r
        assert r.subcall_wait_s < 0.05, f"{r.subcall_wait_s:.2f}s of checking was left off the cell's clock"
