"""Hostile cells against the sandbox, each checked from the host's side.

Five classes (issue: the sandbox's second pass): a fresh machine gets every layer; the
host trusts nothing the worker sends; resources are bounded per session; the file
system is a minimal root; the kernel surface is closed (classes 4 and 5 are in
test_sandbox_hostile_fs_kernel.py). Every attack ends with the
same host-side checks (`attack`): the host stayed responsive (a heartbeat thread never
stalled for a second), no process of the session is left beside its worker, and the
session (or its fresh successor) runs the next cell.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from rlm_train.repl import REPLSession, SandboxConfig, isolation_report, shutdown
from rlm_train.repl import cgroup_host, cgroups
from rlm_train.repl.client import get_server
from rlm_train.repl.session import disable_layers, weakness_line

from sandbox_attack import CFG, attack, frame, hostile_session, needs_root, _rss_mb, _session_processes, _uid_of


# =========================================================================== 1. fresh machine
@needs_root
def test_fresh_machine_gets_every_layer():
    """No cgroup parent exists (conftest removed them before the run; here again after the
    fork-server's exit): the first session creates what it needs and has every layer."""
    shutdown()
    from conftest import remove_sandbox_cgroup_parents

    left = remove_sandbox_cgroup_parents()
    if left:
        # Only a live fork-server of another process may keep them (rmdir refuses a parent
        # with groups); ours has exited. Then this machine cannot show a first run now.
        owners = {name.partition(".")[0] for parent in left for name in os.listdir(parent)
                  if os.path.isdir(os.path.join(parent, name))}
        live = sorted(o for o in owners if o.isdigit() and cgroups._owner_alive(o))
        assert live, f"parents {left} stayed with no live fork-server holding them"
        pytest.skip(f"another rlm-train process (fork-server pid {', '.join(live)}) holds the cgroup parents")
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
        time.sleep(cgroup_host.FREEZE_DELAY_S + 0.1)
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
