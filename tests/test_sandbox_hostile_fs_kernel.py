"""Hostile cells, continued: the file system (a minimal root) and the kernel surface
(seccomp), plus an honest session next to a hostile one. Helpers: sandbox_attack.py."""

from __future__ import annotations

import os
import socket
import threading
import uuid

import pytest

from rlm_train.repl import REPLSession, SandboxConfig
from sandbox_attack import CFG, REPO, attack, frame, hostile_session, needs_root, _uid_of


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
