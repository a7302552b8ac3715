"""Hostile cells against the sandbox, each checked from the host's side.

Five classes (issue: the sandbox's second pass): a fresh machine gets every layer; the
host trusts nothing the worker sends; resources are bounded per session; the file
system is a minimal root; the kernel surface is closed. Every attack ends with the
same host-side checks (`attack`): the host stayed responsive (a heartbeat thread never
stalled for a second), no process of the session is left beside its worker, and the
session (or its fresh successor) runs the next cell.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

import psutil
import pytest

from rlm_train.repl import REPLSession, SandboxConfig, isolation_report, shutdown
from rlm_train.repl import cgroups
from rlm_train.repl.client import get_server
from rlm_train.repl.session import disable_layers, weakness_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = SandboxConfig(timeout_s=5, memory_mb=256, max_output_chars=2000, max_message_mb=4)
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the full sandbox needs root here")


class Heartbeat:
    """A thread that ticks every 10 ms: a host frozen by a worker's frame (GIL held,
    event loop stuck) shows up as a long gap between ticks."""

    def __init__(self):
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.01):
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - self.last)
            self.last = now

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.max_gap


def _uid_of(s: REPLSession) -> int:
    return psutil.Process(s.pid).uids().real


def _session_processes(uid: int) -> list[int]:
    return [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def hostile_session(config: SandboxConfig = CFG, context="ctx", llm=None):
    with REPLSession(context, config=config, llm=llm) as s:
        yield s


def attack(s: REPLSession, code: str, max_seconds: float | None = None):
    """Run one hostile cell and check the host's side: responsive throughout, back
    within the cell clock, nothing of the session left running, next cell works."""
    beat = Heartbeat()
    t0 = time.monotonic()
    try:
        r = s.execute(code)
    finally:
        gap = beat.close()
    took = time.monotonic() - t0
    assert gap < 1.0, f"the host stalled for {gap:.2f}s"
    assert took < (max_seconds or s.config.timeout_s + 3), f"execute took {took:.1f}s"
    if s.pid is not None and not s.config.allow_background:
        assert _session_processes(_uid_of(s)) == [s.pid]
    nxt = s.execute("print(40 + 2)")
    assert nxt.stdout == "42\n", nxt
    return r


def frame(payload: bytes, length: int | None = None) -> str:
    """Cell code writing one raw frame to the host channel (fd 3)."""
    n = len(payload) if length is None else length
    return f"import os, struct\nos.write(3, struct.pack('<Q', {n}) + {payload!r})\nimport time\ntime.sleep(30)"


# =========================================================================== 1. fresh machine
@needs_root
def test_fresh_machine_gets_every_layer():
    """No cgroup parent exists (conftest removed them before the run; here again after the
    fork-server's exit): the first session creates what it needs and has every layer."""
    shutdown()
    from conftest import remove_sandbox_cgroup_parents

    assert remove_sandbox_cgroup_parents() == []
    assert not any(os.path.isdir(os.path.join(cgroups.ROOT, c, cgroups.PARENT)) for c in ("memory", "pids", "cpu", "unified"))
    with REPLSession("fresh", config=CFG) as s:
        assert s.isolation.get("cgroup_memory") and s.isolation.get("cgroup_freeze"), s.isolation
    rep = isolation_report()
    assert rep["missing"] == [], rep
    assert weakness_line(rep) is None
    assert os.path.isdir(os.path.join(cgroups.ROOT, "memory", cgroups.PARENT))


def test_weakness_line_names_each_missing_layer_in_one_line():
    report = {k: True for k in ("net_namespace", "mount_namespace", "pid_namespace", "minimal_root", "private_tmp",
                                "private_dev", "private_proc", "uid_drop", "no_new_privs", "session_keyring",
                                "cgroup_pids", "cgroup_cpu", "cgroup_cpu_time", "cgroup_freeze")}
    report.update(seccomp=False, cgroup_memory=False, cgroup_memory_error="Permission denied", seccomp_error="no table")
    line = weakness_line(report)
    assert "\n" not in line and "{" not in line
    assert "seccomp (" in line and "cgroup_memory (memory is bounded per process only" in line
    assert "Permission denied" in line and "cgroup_pids" not in line


@needs_root
def test_without_layers_the_report_says_what_is_weaker():
    """A machine without cgroups, seccomp or the minimal root (here: left out on purpose):
    sessions still work, and one line names each missing layer and its consequence."""
    disable_layers(("cgroups", "minimal_root", "seccomp"))
    try:
        with REPLSession("x", config=CFG) as s:
            assert s.execute("print(len(context))").stdout == "1\n"
            line = weakness_line(s.isolation)
    finally:
        disable_layers(())
    assert "\n" not in line and "{" not in line
    for layer in ("minimal_root", "private_dev", "seccomp", "cgroup_memory", "cgroup_pids", "cgroup_cpu",
                  "cgroup_cpu_time", "cgroup_freeze"):
        assert f"{layer} (" in line, (layer, line)
    assert "net_namespace" not in line and "uid_drop" not in line


@pytest.mark.parametrize("field,value,minimum", [
    ("memory_mb", 8, "at least 32"), ("timeout_s", 0, "positive"), ("max_processes", 0, "at least 1"),
    ("max_cpus", 0, "between 0.01"), ("max_message_mb", 0, "at least 1"),
])
def test_impossible_limits_are_refused_naming_the_minimum(field, value, minimum):
    with pytest.raises(ValueError) as exc:
        SandboxConfig(**{field: value})
    assert f"SandboxConfig.{field}={value!r}" in str(exc.value) and minimum in str(exc.value)


@needs_root
def test_minimum_memory_runs_a_cell():
    with REPLSession("x", config=SandboxConfig(memory_mb=32)) as s:
        assert s.execute("print(len(context))").stdout == "1\n"


# =========================================================================== 2. the host channel
@pytest.mark.parametrize("name,payload,length", [
    ("deep nesting", b"[" * 200_000, None),
    ("16 GiB header", b"", 16 << 30),
    ("just over the cap", b"", (4 << 20) + 1),
    ("garbage bytes", bytes(range(256)) * 4, None),
    ("invalid utf-8", b'{"op": "done", "stdout": "\xff\xfe"}', None),
    ("not an object", b'[1, 2, 3]', None),
    ("a bare string", b'"done"', None),
    ("unknown op, long", b'{"op": "' + b"x" * 100_000 + b'"}', None),
    ("unknown op, nested", b'{"op": ' + b"[" * 900 + b"]" * 900 + b'}', None),
    ("op of the wrong type", b'{"op": {"a": [1, 2, {"b": null}]}}', None),
    ("huge number", b'{"op": "done", "truncated_chars": 1' + b"0" * 5000 + b'}', None),
    ("truncated then sleep", b'{"op": "do', 1000),
])
def test_malformed_frames_end_the_session_not_the_host(name, payload, length):
    with hostile_session() as s:
        s.execute("keep = 1")
        rss = _rss_mb()
        r = attack(s, frame(payload, length))
        assert r.restarted and r.error_kind in ("sandbox", "timeout"), (name, r)
        assert len(r.error) < 1000, len(r.error)  # never the worker's data, unbounded
        assert _rss_mb() - rss < 64


def test_truncated_frame_then_exit():
    with hostile_session() as s:
        r = attack(s, "import os, struct\nos.write(3, struct.pack('<Q', 100) + b'{\"op\"')\nos._exit(0)")
        assert r.restarted and r.error_kind == "sandbox" and ("WorkerDied" in r.error or "Protocol" in r.error)


@pytest.mark.parametrize("fields,check", [
    ('"stdout": "' + "A" * 3_000_000 + '"', lambda r: len(r.stdout) < 2200 and r.stdout.startswith("AAA")),
    ('"stderr": "' + "B" * 3_000_000 + '"', lambda r: len(r.stderr) < 2200),
    ('"final": "' + "C" * 3_000_000 + '"', lambda r: len(r.final) < 100_200),
    ('"error": "' + "D" * 3_000_000 + '"', lambda r: len(r.error) < 20_200),
    ('"stdout": [1, 2], "final": {"a": 1}, "error": 5', lambda r: r.stdout == "" and r.final is None and r.error is None),
    ('"truncated_chars": -5', lambda r: r.truncated_chars == 0),
    ('"truncated_chars": 1e308', lambda r: r.truncated_chars == 0),
])
def test_forged_done_frames_are_clipped_and_typed(fields, check):
    """A cell may answer for itself with a forged `done`: what it says is clipped and
    type-checked on the host before it reaches a result or a trajectory."""
    payload = ('{"op": "done", ' + fields + '}').encode()
    with hostile_session() as s:
        rss = _rss_mb()
        code = ("import os, struct\np = " + repr(payload) + "\nos.write(3, struct.pack('<Q', len(p)) + p)\n"
                "import time\ntime.sleep(0.2)")  # the real `done` follows; the host took the forged one
        r = s.execute(code)
        assert not r.restarted and check(r), r
        assert _rss_mb() - rss < 64
        s.execute("pass")  # the real `done` of the cell above is read here as this cell's answer
        assert s.execute("print(2)").stdout in ("2\n", "")


def test_forged_subcall_requests_never_reach_the_handler_malformed():
    seen = []

    def handler(prompt):
        seen.append(prompt)
        return "ok"

    with hostile_session(llm=handler) as s:
        for items in ('[1, 2]', '[]', '"x"', '[["a", 1]]', '[' + ','.join(['"p"'] * 10_001) + ']'):
            p = ('{"op": "llm", "items": ' + items + '}').encode()
            code = ("import os, struct, pickle\np = " + repr(p) + "\nos.write(3, struct.pack('<Q', len(p)) + p)\n"
                    "import socket\nsock = socket.socket(fileno=os.dup(3))\n"
                    "n = struct.unpack('<Q', sock.recv(8, socket.MSG_WAITALL))[0]\n"
                    "print(pickle.loads(sock.recv(n, socket.MSG_WAITALL))['error'])")
            r = attack(s, code)
            assert "ValueError" in r.stdout and not r.restarted, (items, r)
    assert all(isinstance(p, str) for p in seen) and seen == []


def test_worker_that_stops_reading_cannot_block_the_host():
    """The cell asks for a sub-call whose answer is 20 MB, then never reads: the host's
    send is bounded by the cell clock."""
    with hostile_session(config=SandboxConfig(timeout_s=2, memory_mb=256), llm=lambda p: "z" * (20 << 20)) as s:
        code = ("import os, struct, json\np = json.dumps({'op': 'llm', 'items': ['q']}).encode()\n"
                "os.write(3, struct.pack('<Q', len(p)) + p)\nimport time\ntime.sleep(60)")
        r = attack(s, code, max_seconds=5)
        assert r.timed_out and r.error_kind == "timeout" and r.restarted


def test_fds_passed_to_the_host_are_not_kept():
    with hostile_session() as s:
        before = psutil.Process().num_fds()
        code = ("import os, socket\nsock = socket.socket(fileno=os.dup(3))\n"
                "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(50)]\n"
                "socket.send_fds(sock, [b'\\x00'], fds[:50])\nimport time\ntime.sleep(30)")
        r = attack(s, code)
        assert r.restarted
        assert psutil.Process().num_fds() <= before + 2


@pytest.mark.parametrize("code,expect", [
    # Self-reference: the worker cannot encode it (refused in the cell, fast).
    ("a = []\na.append(a)\nrlm_query('q', context=a)", "TypeError"),
    # Shared references that would expand exponentially: bounded by the worker's own
    # memory and clock, never by the host's.
    ("a = ['x']\nfor _ in range(60):\n    a = [a, a]\nrlm_query('q', context=a)", None),
    # Nesting deeper than the host accepts for a child's context.
    ("a = 1\nfor _ in range(150):\n    a = [a]\nrlm_query('q', context=a)", "nest at most"),
    ("rlm_query('q', context={1: 'int key'})", "plain data"),
    ("rlm_query('q', context=b'bytes')", "plain data"),
])
def test_rlm_query_contexts_cannot_stall_the_host(code, expect):
    calls = []
    with hostile_session(config=SandboxConfig(timeout_s=5, memory_mb=128), llm=lambda p: calls.append(p) or "ok") as s:
        r = attack(s, code, max_seconds=10)
        assert r.error is not None
        if expect:
            assert expect in r.error, r.error
        assert calls == []


def test_surrogates_in_output_reach_the_host_as_text():
    with hostile_session() as s:
        r = attack(s, "print('bad \\udcff surrogate')")
        assert r.error is None and "bad" in r.stdout and "surrogate" in r.stdout


# =========================================================================== 3. resources per session
def _group_file(s: REPLSession, ctrl: str, leaf: str) -> str:
    server = get_server()
    return os.path.join(cgroups.ROOT, ctrl, cgroups.PARENT, f"{server.pid}.{_uid_of(s)}", leaf)


@needs_root
def test_children_share_one_memory_limit():
    """15 children x 200 MB would be 3 GB; the session's group holds all of them to
    memory_mb (+ slack), where RLIMIT_AS alone allowed 10x."""
    with hostile_session(config=SandboxConfig(timeout_s=20, memory_mb=256, max_processes=32)) as s:
        usage = _group_file(s, "memory", "memory.max_usage_in_bytes")
        with open(usage, "w") as f:
            f.write("0")
        code = ("import os\npids = []\nfor _ in range(15):\n    pid = os.fork()\n    if pid == 0:\n"
                "        try:\n            b = bytearray(200 << 20)\n            b[::4096] = b'x' * len(b[::4096])\n"
                "        finally:\n            os._exit(0)\n    pids.append(pid)\nfor p in pids:\n    os.waitpid(p, 0)")
        attack(s, code, max_seconds=25)
        assert int(open(usage).read()) <= (256 + cgroups.MEMORY_SLACK_MB) << 20


@needs_root
@pytest.mark.parametrize("code", [
    "import os\nfds = []\nfor _ in range(12):\n    fd = os.memfd_create('m')\n    os.write(fd, b'x' * (50 << 20))\n    fds.append(fd)",
    "import os, mmap\nm = mmap.mmap(-1, 600 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)\nm[::4096] = b'x' * len(m[::4096])",
])
def test_shared_memory_counts_against_the_session(code):
    with hostile_session(config=SandboxConfig(timeout_s=20, memory_mb=256)) as s:
        usage = _group_file(s, "memory", "memory.max_usage_in_bytes")
        r = attack(s, code, max_seconds=25)
        assert r.error is not None  # refused (ENOMEM, MemoryError) or the worker was killed
        assert int(open(usage).read()) <= (256 + cgroups.MEMORY_SLACK_MB) << 20


@needs_root
@pytest.mark.parametrize("code,expect", [
    ("open('/tmp/big', 'wb').write(b'x' * (40 << 20))", "No space left"),
    ("for i in range(20000):\n    open(f'/tmp/f{i}', 'w').close()", "No space left"),
    ("open('/dev/shm/big', 'wb').write(b'x' * (40 << 20))", "No space left"),
    ("open('/var/tmp/big', 'wb').write(b'x' * (40 << 20))", "No space left"),
])
def test_private_tmp_is_bounded(code, expect):
    with hostile_session(config=SandboxConfig(timeout_s=10, memory_mb=256, max_file_mb=16)) as s:
        r = attack(s, code)
        assert r.error and (expect in r.error or "File too large" in r.error), r.error


@needs_root
def test_threads_left_behind_do_not_run_between_cells():
    with hostile_session() as s:
        r = s.execute("import threading\ndef spin():\n    while True:\n        pass\n"
                      "for _ in range(2):\n    threading.Thread(target=spin, daemon=True).start()")
        assert r.error is None
        control = s._control
        time.sleep(cgroups.FREEZE_DELAY_S + 0.1)
        before = control.cpu_seconds()
        time.sleep(1.0)
        assert control.cpu_seconds() - before < 0.05  # frozen: nothing ran
        assert s.execute("print(threading.active_count())").stdout == "3\n"  # they are still there


@needs_root
def test_processes_left_behind_end_with_the_cell():
    with hostile_session() as s:
        uid = _uid_of(s)
        r = s.execute("import subprocess\nfor _ in range(3):\n    subprocess.Popen(['sh', '-c', 'while :; do :; done'])")
        assert r.error is None
        assert _session_processes(uid) == [s.pid]


@needs_root
def test_cpu_share_is_capped():
    with hostile_session(config=SandboxConfig(timeout_s=10, memory_mb=256, max_cpus=0.25)) as s:
        control = s._control
        before = control.cpu_seconds()
        t0 = time.monotonic()
        s.execute("import os, time\npids = []\nfor _ in range(2):\n    pid = os.fork()\n    if pid == 0:\n"
                  "        end = time.time() + 1.5\n        while time.time() < end:\n            pass\n        os._exit(0)\n"
                  "    pids.append(pid)\nfor p in pids:\n    os.waitpid(p, 0)")
        wall = time.monotonic() - t0
        used = control.cpu_seconds() - before
        assert used < 0.25 * wall + 0.3, (used, wall)  # two spinning processes, a quarter of one core


@needs_root
def test_cpu_time_budget_is_per_session():
    """Each child stays under its own RLIMIT_CPU; together they exceed the session's."""
    with hostile_session(config=SandboxConfig(timeout_s=15, memory_mb=256, cpu_time_s=1.5, max_cpus=2)) as s:
        code = ("import os, time\npids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
                "        t = time.process_time()\n        while time.process_time() - t < 0.9:\n            pass\n"
                "        os._exit(0)\n    pids.append(pid)\nfor p in pids:\n    os.waitpid(p, 0)")
        r = attack(s, code, max_seconds=15)
        assert r.restarted and r.error_kind == "limit" and "CPUTimeExceeded" in r.error, r


def test_ptys_are_not_available():
    with hostile_session() as s:
        r = attack(s, "import os\nfds = [os.openpty() for _ in range(14)]")
        assert r.error and ("No such file" in r.error or "Permission" in r.error), r.error
    master, slave = os.openpty()  # the host still has its ptys
    os.close(master)
    os.close(slave)


@needs_root
def test_threads_count_against_the_process_limit():
    with hostile_session(config=SandboxConfig(timeout_s=10, memory_mb=256, max_processes=8)) as s:
        r = attack(s, "import threading, time\nts = []\nfor _ in range(50):\n"
                      "    t = threading.Thread(target=time.sleep, args=(0.5,))\n    t.start()\n    ts.append(t)")
        assert r.error and "can't start new thread" in r.error, r.error


# =========================================================================== 4. file system
@pytest.fixture
def host_unix_listener():
    """A world-connectable socket where host services keep theirs (/run), and one in the host's /tmp."""
    paths = [f"/run/rlm-hostile-{uuid.uuid4().hex[:8]}.sock", f"/tmp/rlm-hostile-{uuid.uuid4().hex[:8]}.sock"]
    servers = []
    for path in paths:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        os.chmod(path, 0o777)
        srv.listen(4)
        srv.settimeout(0.3)
        servers.append(srv)
    yield paths, servers
    for srv, path in zip(servers, paths):
        srv.close()
        os.unlink(path)


@needs_root
def test_host_unix_sockets_are_unreachable(host_unix_listener):
    paths, servers = host_unix_listener
    with hostile_session() as s:
        for path in paths:
            r = attack(s, f"import socket\nc = socket.socket(socket.AF_UNIX)\nc.connect({path!r})")
            assert r.error and "No such file" in r.error, r.error
    for srv in servers:
        with pytest.raises(TimeoutError):
            srv.accept()  # the listener got nothing


HOST_PATHS = [os.path.join(REPO, name) for name in ("README.md", ".git", "rlm_train", "tests")] + [
    "/etc/passwd", "/etc/shadow", "/etc/hostname", "/sys/fs/cgroup", "/run", "/var/lib", "/opt", "/home", "/srv",
    os.path.expanduser("~/.bashrc"), os.path.expanduser("~/.cache")]


@needs_root
@pytest.mark.parametrize("path", [p for p in HOST_PATHS if os.path.exists(p)])
def test_host_files_are_not_visible(path):
    with hostile_session() as s:
        r = attack(s, f"import os\nprint(os.path.exists({path!r}))")
        assert r.stdout == "False\n", (path, r)


@needs_root
def test_directories_above_the_runtime_show_only_the_way_to_it():
    """The venv may live inside the checkout (and Python under /root): the worker sees
    the checkout's directory holding the venv and nothing else of it."""
    import sys

    with hostile_session() as s:
        for runtime in {sys.prefix, sys.base_prefix}:
            parent, leaf = os.path.split(runtime)
            r = attack(s, f"import os\nprint(os.listdir({parent!r}))")
            assert r.stdout == f"{[leaf]!r}\n", (parent, r)


@needs_root
def test_runtime_is_visible_read_only():
    import sys

    site = next(p for p in sys.path if p.endswith("site-packages"))
    with hostile_session() as s:
        r = attack(s, f"import os\nprint(os.path.isdir({site!r}))\nopen({site!r} + '/evil.py', 'w')")
        assert r.stdout == "True\n" and ("Read-only" in r.error or "Permission" in r.error), r
    assert not os.path.exists(os.path.join(site, "evil.py"))


@needs_root
def test_dev_holds_only_the_harmless_devices():
    with hostile_session() as s:
        r = attack(s, "import os\nprint(sorted(os.listdir('/dev')))\nopen('/dev/null', 'w').write('x')\n"
                      "print(len(open('/dev/urandom', 'rb').read(8)))")
        assert r.stdout.splitlines()[0] == str(sorted(["fd", "full", "null", "random", "shm", "stderr", "stdin",
                                                       "stdout", "urandom", "zero"]))
        assert r.stdout.splitlines()[1] == "8"


@needs_root
@pytest.mark.parametrize("code", [
    "open('/evil', 'w')", "import os\nos.mkdir('/usr/evil')", "import os\nos.symlink('/tmp', '/etc/evil')",
    "open('/dev/evil', 'w')",
])
def test_root_is_read_only(code):
    with hostile_session() as s:
        r = attack(s, code)
        assert r.error and ("Read-only" in r.error or "Permission" in r.error), r.error


@needs_root
def test_proc_shows_only_the_session():
    with hostile_session() as s:
        r = attack(s, "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
        assert r.stdout == "[1]\n", r.stdout


# =========================================================================== 5. kernel surface
SYSCALL = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _errno_of(call: str) -> str:
    return SYSCALL + f"ret = {call}\nprint(ret, os.strerror(ctypes.get_errno()) if ret == -1 else '')"


@needs_root
@pytest.mark.parametrize("name,call", [
    ("user namespace", "libc.unshare(0x10000000)"),
    ("net namespace", "libc.unshare(0x40000000)"),
    ("mount namespace", "libc.unshare(0x00020000)"),
    ("setns", "libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0)"),
    ("clone with CLONE_NEWUSER", "libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)"),
    ("io_uring_setup", "libc.syscall(425, 8, ctypes.create_string_buffer(120))"),
    ("keyctl", "libc.syscall(250, 0, -4, 0)"),
    ("add_key", "libc.syscall(248, b'user', b'secret', b'v', 1, -4)"),
    ("request_key", "libc.syscall(249, b'user', b'secret', None, -4)"),
    ("bpf", "libc.syscall(321, 0, ctypes.create_string_buffer(64), 64)"),
    ("perf_event_open", "libc.syscall(298, ctypes.create_string_buffer(128), 0, -1, -1, 0)"),
    ("ptrace", "libc.ptrace(0, 0, 0, 0)"),
    ("mount", "libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None)"),
    ("chroot", "libc.chroot(b'/tmp')"),
    ("userfaultfd", "libc.syscall(323, 0)"),
    ("process_vm_readv", "libc.syscall(310, 1, 0, 0, 0, 0, 0)"),
    ("personality", "libc.personality(0x0040000)"),
])
def test_kernel_surface_is_closed(name, call):
    with hostile_session() as s:
        r = attack(s, _errno_of(call))
        assert r.error is None and r.stdout.startswith("-1 Operation not permitted"), (name, r)


@needs_root
@pytest.mark.parametrize("family,kind,proto", [
    ("AF_INET", "SOCK_STREAM", 0), ("AF_INET6", "SOCK_DGRAM", 0), ("AF_NETLINK", "SOCK_RAW", 0),
    ("AF_PACKET", "SOCK_RAW", 0), ("AF_VSOCK", "SOCK_STREAM", 0), ("AF_ALG", "SOCK_SEQPACKET", 0),
    ("AF_INET", "SOCK_STREAM", 262),  # MPTCP
])
def test_socket_families_other_than_unix_are_refused(family, kind, proto):
    with hostile_session() as s:
        r = attack(s, f"import socket\nsocket.socket(socket.{family}, socket.{kind}, {proto})")
        assert r.error and "Address family not supported" in r.error, r.error


@needs_root
def test_threads_and_subprocesses_still_work_under_the_filter():
    with hostile_session() as s:
        r = attack(s, "import threading, subprocess\nout = []\nt = threading.Thread(target=lambda: out.append(1))\n"
                      "t.start(); t.join()\nprint(out, subprocess.run(['echo', 'hi'], capture_output=True).stdout)")
        assert r.stdout == "[1] b'hi\\n'\n", r


@needs_root
def test_keys_never_pass_to_the_next_session_of_a_uid():
    """A session cannot store a key at all, and the next session that gets the same uid
    starts from a fresh session keyring."""
    store = _errno_of("libc.syscall(248, b'user', b'rlm-secret', b'hunter2', 7, -4)")  # @u
    with hostile_session() as s:
        uid = _uid_of(s)
        assert attack(s, store).stdout.startswith("-1 Operation not permitted")
    for _ in range(8):  # pooled workers hold uids of their own: wait for this one to come back
        with hostile_session() as s:
            if _uid_of(s) != uid:
                continue
            r = attack(s, _errno_of("libc.syscall(250, 3, -4, 0)") + "\nprint(open('/proc/keys').read())")
            assert r.stdout.startswith("-1 Operation not permitted") and "rlm-secret" not in r.stdout, r
            return
    pytest.fail(f"uid {uid} was not reused by 8 sessions")


# =========================================================================== concurrency
@needs_root
def test_hostile_neighbour_leaves_an_honest_session_unchanged():
    attacks = [frame(b"[" * 100_000), frame(b"", 16 << 30), "x = bytearray(400 << 20)",
               "import os\nwhile True:\n    os.fork()", "while True:\n    pass"]
    results, errors = [], []

    def honest():
        try:
            with REPLSession(list(range(100)), config=CFG, llm=lambda p: p.upper()) as s:
                for i in range(20):
                    r = s.execute(f"print(sum(context) + {i}, llm_query('ab'))")
                    results.append(r.stdout)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    t = threading.Thread(target=honest)
    t.start()
    with hostile_session(config=SandboxConfig(timeout_s=2, memory_mb=256)) as bad:
        for code in attacks:
            bad.execute(code)
    t.join(60)
    assert errors == []
    assert results == [f"{4950 + i} AB\n" for i in range(20)]


@needs_root
def test_a_runtime_under_the_hosts_tmp_stays_visible(tmp_path):
    """A clone (and its venv) under /tmp: each worker's private /tmp covers it, so the
    worker binds those trees back, read-only, and can still import from them."""
    import subprocess
    import sys
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "ours.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # orjson & co. from our venv
    (site / "rlm_marker.py").write_text("X = 'from /tmp'\n")
    code = ("from rlm_train.repl import REPLSession\nwith REPLSession('x') as s:\n"
            "    r = s.execute('import rlm_marker; print(rlm_marker.X); open(rlm_marker.__file__, \"a\")')\n"
            "    print(r.stdout.strip(), '|', r.error.strip().splitlines()[-1])")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": REPO, "PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("from /tmp | ") and ("Read-only" in out.stdout or "Permission" in out.stdout), out.stdout
