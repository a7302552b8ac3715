"""OS isolation primitives for the worker (Linux), called through ctypes.

Python 3.11 has no os.unshare / mount wrappers, so these go straight to libc.
Every layer is attempted and the outcome recorded in a dict; the host turns
missing layers into one loud warning (see session.isolation_report).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal

from rlm_train.repl import protocol

libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def set_name(name: str) -> None:
    """Name the process (ps, top, perf show it): every role in the tree is `python` otherwise."""
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent(expected_ppid: int) -> None:
    """SIGKILL us when the parent dies; bail out if it already has."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_ppid and os.getppid() != expected_ppid:
        os._exit(1)


def die_with_parent_pidfd(parent_pidfd: int) -> None:
    """die_with_parent for a child in its own pid namespace, where getppid() is 0:
    the parent's pidfd turns readable once the parent has exited."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if protocol.wait_ready([parent_pidfd], 0):
        os._exit(1)


_pyapi = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL held across the call, as os.fork does
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
_SYS_CLONE3 = 435  # one number on every architecture
CLONE_INTO_CGROUP = 0x200000000


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal",
                                                     "stack", "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


_clone3_works = True  # cleared where the kernel has no clone3 or no CLONE_INTO_CGROUP (before 5.7)


def _raw_fork(call) -> tuple[int, int]:
    """Run a fork-like syscall between the interpreter's fork hooks: (pid, errno)."""
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = call()
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    return pid, err


def fork_pid_namespace(cgroup_fd: int = -1) -> tuple[int, bool]:
    """os.fork(), except that the child is pid 1 of a new pid namespace; the caller stays
    its parent and reaps it. With `cgroup_fd` (a cgroup v2 directory) the child starts in
    that group (clone3 CLONE_INTO_CGROUP), which saves it the join. Returns (pid, whether
    it started in the group). Raises OSError where the kernel refuses a pid namespace.

    A raw clone syscall skips glibc's fork handlers (malloc and stdio locks, the cached
    thread id); that is safe because every caller is single-threaded, so no other thread
    can hold those locks. The interpreter's own fork hooks run as in os.fork."""
    global _clone3_works
    if cgroup_fd >= 0 and _clone3_works:
        args = _CloneArgs(flags=CLONE_NEWPID | CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
        pid, err = _raw_fork(lambda: _pyapi.syscall(ctypes.c_long(_SYS_CLONE3), ctypes.byref(args),
                                                    ctypes.c_size_t(ctypes.sizeof(args))))
        if pid >= 0:
            return pid, True
        if err in (errno.ENOSYS, errno.E2BIG):
            _clone3_works = False
        # Any other refusal (a group that cannot take processes, a full pids.max): clone
        # plainly below, and the worker joins by writing cgroup.procs.
    if _SYS_CLONE is None:
        raise OSError(errno.ENOSYS, f"no clone syscall number known for {os.uname().machine}")
    pid, err = _raw_fork(lambda: _pyapi.syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(CLONE_NEWPID | signal.SIGCHLD),
                                                None, None, None, None))
    if pid < 0:
        raise OSError(err, f"clone(CLONE_NEWPID): {os.strerror(err)}")
    return pid, False


def enter_namespaces(report: dict) -> None:
    """unshare mount+ipc, and net unless the fork-server's shared one can be used (see
    prepare_network_namespace). The pid namespace comes from fork_pid_namespace."""
    if _shared_net and _enter_shared_network(report):
        flags = CLONE_NEWNS | CLONE_NEWIPC
    else:
        flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
    try:
        unshare(flags)
        report.update(net_namespace=True, mount_namespace=True)
        return
    except OSError as exc:
        report["namespace_error"] = str(exc)
    # Without CAP_SYS_ADMIN try the layers one at a time so the report is exact.
    for flag, key in ((CLONE_NEWNET, "net_namespace"), (CLONE_NEWNS, "mount_namespace")):
        try:
            unshare(flag)
            report[key] = True
        except OSError:
            report[key] = False


# --------------------------------------------------------------------------- network
# A new network namespace per worker costs CPU to build (a large share of a worker's start:
# docs/measurements.md) and more to tear down, asynchronously. Where Landlock can scope abstract unix sockets
# (Linux 6.12+), workers share one namespace instead, made once by the fork-server: it
# has no interface up (not even lo), so IP goes nowhere; Landlock denies TCP bind/connect
# outright and keeps each worker from reaching another's abstract unix sockets or
# signalling outside its own tree. What workers then share is only the names: two
# concurrent cells binding the same UDP port or abstract socket name collide.
_shared_net = False

_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_RESTRICT_SELF = 444, 446  # one number on every architecture
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_ACCESS_NET_BIND_TCP, _LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 0, 1 << 1
_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, _LANDLOCK_SCOPE_SIGNAL = 1 << 0, 1 << 1
_LANDLOCK_SCOPE_ABI = 6  # the first ABI with `scoped`


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    version = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, version)


def landlock_scope_network() -> None:
    """This process and its children: no TCP bind or connect, no abstract unix socket and
    no signal reaching outside their own Landlock domain. Raises OSError where refused."""
    attr = _LandlockRulesetAttr(
        handled_access_fs=0,
        handled_access_net=_LANDLOCK_ACCESS_NET_BIND_TCP | _LANDLOCK_ACCESS_NET_CONNECT_TCP,
        scoped=_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | _LANDLOCK_SCOPE_SIGNAL)
    fd = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        # Root skips no_new_privs here: the worker sets it when it drops its uid.
        check(libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(fd)


def prepare_network_namespace() -> None:
    """The fork-server, once at start: a fresh network namespace that every worker
    shares, where Landlock can keep them apart in it. Otherwise each worker makes its own."""
    global _shared_net
    if landlock_abi() < _LANDLOCK_SCOPE_ABI:
        return
    try:
        unshare(CLONE_NEWNET)
    except OSError:
        return
    _shared_net = True


def _enter_shared_network(report: dict) -> bool:
    """In a worker: scope it with Landlock inside the shared namespace. False (and the
    worker makes its own namespace) where the kernel refuses."""
    try:
        landlock_scope_network()
    except OSError as exc:
        report["landlock_error"] = str(exc)
        return False
    report.update(net_shared=True, landlock_scoped=True)
    return True


def vm_size_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def apply_rlimits(report: dict, *, memory_mb: int, max_processes: int, cpu_time_s: float, max_file_mb: int) -> None:
    # RLIMIT_AS counts the (shared, copy-on-write) context already mapped, so the
    # budget is "what we have now + memory_mb".
    cpu = max(1, int(cpu_time_s))
    limits = {
        "RLIMIT_NPROC": (max_processes, max_processes),
        "RLIMIT_CPU": (cpu, cpu + 5),
        "RLIMIT_FSIZE": (max_file_mb << 20, max_file_mb << 20),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NOFILE": (256, 256),
    }
    try:
        mem = vm_size_bytes() + memory_mb * (1 << 20)
        limits["RLIMIT_AS"] = (mem, mem)
    except OSError as exc:  # no /proc of our own: the cgroup (where there is one) still bounds memory
        report.setdefault("rlimit_errors", []).append(f"RLIMIT_AS: {exc}")
    applied = []
    for name, value in limits.items():
        try:
            resource.setrlimit(getattr(resource, name), value)
            applied.append(name)
        except (OSError, ValueError) as exc:
            report.setdefault("rlimit_errors", []).append(f"{name}: {exc}")
    report["rlimits"] = applied


def drop_privileges(report: dict, uid: int) -> None:
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            report["uid_error"] = str(exc)
    report["uid_drop"] = os.geteuid() != 0 and os.getuid() == uid
    report["uid"] = os.getuid()
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        report["no_new_privs"] = True
    except OSError:
        report["no_new_privs"] = False


def close_fds_except(keep: set[int]) -> None:
    """Close every fd above 2 but `keep`: close_range(2) over the gaps, no /proc listing."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


