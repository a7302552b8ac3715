"""Fork-server, per-context zygotes and worker spawning.

Process tree (the host never forks itself; it may hold torch and threads):

    host --subprocess--> fork-server (warm interpreter, worker module imported)
                           +-- zygote per context (holds the context once; fork-server child)
                           |     +-- worker (pid 1 of its own pid namespace, unprivileged uid,
                           |                 runs the cells)
                           +-- pooled workers (small contexts, sent over the socket)

Each worker is cloned straight into a new pid namespace (sandbox.fork_pid_namespace),
so its parent, the zygote or the fork-server, supervises it directly: it reaps the
worker and writes its wait status to a pipe the host reads.
That is how the host learns how a worker died (it is not the worker's parent).

Sessions on one context share the zygote's pages copy-on-write. The host talks
to the fork-server and to each zygote over its own socket, and to each worker
over a socketpair the zygote made and handed up with SCM_RIGHTS (then closed),
so no frame of a running session passes through another process.

A shared zygote keeps one spare worker, fully isolated and already `ready`,
built right after each claim: the next session with the same config claims it
in one round trip. Before it exits, a zygote kills and reaps every worker it still
has; a spare's uid is reserved by the host like a session's. cgroups are per session uid
and reused by the uid's next worker, limits included (cgroups.enter_session_groups); a
worker is cloned straight into its v2 group where it exists. The fork-server removes
them all when it exits.

Small contexts (< 256 kB, plain data) skip the zygote: the fork-server keeps a few
pre-isolated, context-less workers (POOL_SIZE) for the current config and hands
one over per `claim`; the host then sends the context as the worker's first frame.
The fork-server only clones and answers; every worker isolates itself in parallel and
reports `ready` straight to the host, so concurrent starts do not queue behind it.

Run as `python -m rlm_train.repl.forkserver FD` with FD a Unix socket to the host.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import struct
import sys
import time

from rlm_train.repl import cgroups, child_context, context_copy, protocol, rootfs, sandbox, seccomp, worker

# What the fork-server set up for every worker (minimal root, cgroup layout...), copied
# into each worker's isolation report; and the seccomp program each worker installs.
_server_report: dict = {}
_seccomp_program: bytes | None = None


# --------------------------------------------------------------------------- workers
class _Children:
    """The workers we cloned. Each is our own child (pid 1 of its pid namespace when the
    kernel allows), so we reap it and write its wait status to a pipe the host reads: that
    is how the host learns how a worker died, and that close() may return (the status
    comes once the worker and every process of its pid namespace are gone)."""

    def __init__(self):
        self.workers: dict[int, tuple[int, int, bool]] = {}  # pid -> (status pipe, uid, own pid namespace)
        self.me = os.pidfd_open(os.getpid())  # a worker checks it to see whether we are still alive
        self.wakeup, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD reaches the wakeup pipe

    def add(self, pid: int, status_w: int, uid: int, own_pidns: bool) -> None:
        self.workers[pid] = (status_w, uid, own_pidns)

    def reap(self) -> None:
        """Collect every child that exited (zygotes too: they need no report)."""
        try:
            while os.read(self.wakeup, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._finish(pid, status)

    def wait(self, pid: int) -> None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reap() collected it already
            return
        self._finish(pid, status)

    def kill_all(self) -> None:
        """Before we exit: no worker of ours outlives us."""
        for pid in self.workers:
            os.kill(pid, signal.SIGKILL)
        for pid in list(self.workers):
            self.wait(pid)

    def _finish(self, pid: int, status: int) -> None:
        if pid not in self.workers:
            return
        status_w, uid, own_pidns = self.workers.pop(pid)
        if not own_pidns:
            _kill_uid(uid)  # no pid namespace: sweep whatever the cell left behind
        try:
            os.write(status_w, struct.pack("<i", status))
        except OSError:  # nobody reads it any more (a discarded spare)
            pass
        os.close(status_w)


def _worker_entry(sock_fd: int, req: dict, context, parent_pidfd: int, own_pidns: bool, in_v2: bool,
                  report: dict) -> None:
    """Runs in the worker, just cloned from the zygote or fork-server. Never returns."""
    try:
        sandbox.die_with_parent_pidfd(parent_pidfd)
        sandbox.set_name("rlm-worker")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        report.update(root=os.geteuid() == 0, pdeathsig=True, pid_namespace=own_pidns)
        sandbox.enter_namespaces(report)
        cgroups.enter_session_groups(report, req["uid"], req["config"], in_v2)
        cgroups.forget_written()  # the fork-server's record of limits: gone before any cell runs
        sandbox.close_fds_except({sock_fd})  # the cgroup dir fds too: nothing of /sys stays reachable
        _worker_main(sock_fd, req, context, report)
    finally:
        os._exit(71)


def _kill_uid(uid: int) -> None:
    """kill(-1) as the session's own uid reaches exactly its processes."""
    if os.geteuid() != 0:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _worker_main(sock_fd: int, req: dict, context, report: dict) -> None:
    """Lock the process down, say ready, then serve cells."""
    cfg = req["config"]
    uid = req["uid"]
    os.setsid()  # own session and process group: kill(0, ...) from a cell reaches nothing else
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with EFBIG instead of killing us
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    rootfs.private_mounts(report, uid, tmp_mb=max(cfg["max_file_mb"], 16), in_new_pidns=report["pid_namespace"])
    if not report.get("private_tmp"):
        os.makedirs(f"/tmp/rlm-{uid}", exist_ok=True)  # best effort; reported as missing
    os.dup2(sock_fd, worker.PROTO_FD)
    if sock_fd != worker.PROTO_FD:
        os.close(sock_fd)
    sandbox.close_fds_except({worker.PROTO_FD})
    os.chdir("/tmp" if report.get("private_tmp") else f"/tmp/rlm-{uid}")
    worker.clean_environment()
    worker.redirect_std_fds()
    if os.geteuid() == 0:
        os.chown(worker.FD_OUTPUT, uid, uid)
    sandbox.apply_rlimits(report, memory_mb=cfg["memory_mb"], max_processes=cfg["max_processes"],
                          cpu_time_s=cfg["cpu_time_s"], max_file_mb=cfg["max_file_mb"])
    sandbox.drop_privileges(report, uid)
    # Changing uid clears the parent-death signal, so it is set after the drop.
    sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGKILL)
    if "seccomp" not in _server_report["disabled_layers"]:
        seccomp.apply(report, _seccomp_program)  # last: it denies keyctl, mount, unshare...
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    sock = socket.socket(fileno=worker.PROTO_FD)
    # CPU this worker used to get here (from its clone on): what a start costs, read by benches.
    report["start_cpu_ms"] = round(time.process_time() * 1000, 3)
    protocol.send_data(sock, {"op": "ready", "isolation": report})
    if req.get("pooled"):
        # Built before anyone asked for it: the host sends the (small) context once it
        # claims us. EOF here means the pool discarded us unclaimed.
        try:
            context = protocol.recv(sock)
            if isinstance(context, child_context.EncodedContext):  # built here, where the session pays
                context = child_context.load(sock, context)
        except (OSError, protocol.ProtocolError):
            os._exit(0)
    worker.run(sock, context, cfg["max_output_chars"], bool(cfg.get("allow_background")))


# --------------------------------------------------------------------------- zygote

class _Started:
    """A worker we cloned, with the host's ends of its channels until we hand them over."""

    def __init__(self, pid: int, pidfd: int, sock: socket.socket, status_r: int, uid: int, config: dict):
        self.pid, self.pidfd, self.sock, self.status_r, self.uid, self.config = pid, pidfd, sock, status_r, uid, config

    def discard(self, children: _Children) -> None:
        """Kill an unclaimed spare and reap it."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:  # it died and was reaped already
            pass
        self._close()
        children.wait(self.pid)

    def send_to_host(self, host: socket.socket, reply: dict) -> None:
        """Hand the host our ends of the worker's channels; we keep none."""
        try:
            protocol.send(host, reply, fds=[self.sock.fileno(), self.status_r, self.pidfd])
        finally:
            self._close()

    def _close(self) -> None:
        self.sock.close()
        os.close(self.status_r)
        os.close(self.pidfd)


# Errors that mean "this kernel or container never gives us a pid namespace" (not a passing
# shortage such as EAGAIN): the worker then runs without one and its report says so.
_NO_PIDNS = (errno.EPERM, errno.EINVAL, errno.ENOSYS)


def _start_worker(children: _Children, uid: int, config: dict, context, pooled: bool = False) -> _Started:
    """Clone the worker straight into its own pid namespace; it isolates itself in parallel
    with us (we only clone) and says `ready` to the host."""
    ours, theirs = socket.socketpair()
    status_r, status_w = os.pipe()
    report: dict = dict(_server_report)
    group_fd = cgroups.v2_group_fd(uid)
    try:
        try:
            (pid, in_v2), own_pidns = sandbox.fork_pid_namespace(group_fd), True
        except OSError as exc:
            if exc.errno not in _NO_PIDNS:
                raise
            report["pid_namespace_error"] = str(exc)
            pid, own_pidns, in_v2 = os.fork(), False, False
    except OSError:
        for fd in (status_r, status_w):
            os.close(fd)
        ours.close()
        theirs.close()
        raise
    finally:
        if group_fd >= 0:  # in the child too: it is in the group already, or joins it by path
            os.close(group_fd)
    if pid == 0:
        _worker_entry(theirs.fileno(), {"uid": uid, "config": config, "pooled": pooled}, context,
                      children.me, own_pidns, in_v2, report)
    theirs.close()
    children.add(pid, status_w, uid, own_pidns)
    return _Started(pid, os.pidfd_open(pid), ours, status_r, uid, config)


def _zygote_main(ctl: socket.socket, req: dict, memfd: int) -> None:
    sandbox.die_with_parent(req["server_pid"])
    sandbox.set_name("rlm-zygote")
    children = _Children()
    if memfd < 0:
        try:
            context = context_copy.load_remote(req)
        except Exception as exc:
            protocol.send(ctl, {"op": "load_failed", "error": str(exc)})
            os._exit(0)
    else:
        context = context_copy.load_context(req["kind"], memfd, req["size"])
    gc.collect()
    gc.freeze()  # keep the collector from touching (and so copying) shared pages in workers
    protocol.send(ctl, {"op": "loaded", "pid": os.getpid()})
    # One spare worker, already isolated, for the next session with the same config: a claim
    # is then one round trip. It is built right after a claim, off the claimer's path.
    spare: _Started | None = None
    idle_uid = None  # a spare uid whose fork failed: handed back with the next reply
    while True:
        if not _next_request(ctl, children):
            continue
        try:
            msg = protocol.recv(ctl)
        except (OSError, protocol.ProtocolError):
            break
        if msg.get("op") != "spawn":
            continue
        uids, config = list(msg["uids"]), msg["config"]  # fresh uids the host reserved for us
        unused = [idle_uid] if idle_uid is not None else []
        idle_uid = None
        if spare is not None and spare.config != config:
            spare.discard(children)
            unused.append(spare.uid)
            spare = None
        try:
            got = spare if spare is not None else _start_worker(children, uids.pop(0), config, context)
        except OSError as exc:  # fork failed (EAGAIN, ENOMEM): the host reports it
            protocol.send(ctl, {"op": "failed", "error": str(exc), "spare_uid": None, "unused": unused + uids})
            continue
        spare = None
        spare_uid = uids.pop(0) if msg.get("keep_spare") and uids else None
        try:
            got.send_to_host(ctl, {"op": "spawned", "pid": got.pid, "uid": got.uid, "spare_uid": spare_uid,
                                   "unused": unused + uids})
        except OSError:
            break
        if spare_uid is not None:
            try:
                spare = _start_worker(children, spare_uid, config, context)
            except OSError:
                spare, idle_uid = None, spare_uid
    children.kill_all()  # the spare, and any session the host did not close
    os._exit(0)


def _next_request(sock: socket.socket, children: _Children, timeout: float | None = None) -> bool:
    """Wait for a request on sock (at most timeout s), reaping workers as they exit.
    True when sock is readable."""
    readable = protocol.wait_ready([sock, children.wakeup], timeout)
    if children.wakeup in readable:
        children.reap()
    return sock.fileno() in readable


# --------------------------------------------------------------------------- fork-server
POOL_SIZE = 4  # pre-isolated context-less workers kept ready for small contexts


def _fork_zygote(host: socket.socket, msg: dict, fds: list[int]) -> None:
    ctl_fd, memfd = (fds + [-1])[:2]
    msg["server_pid"] = os.getpid()
    pid = os.fork()
    if pid == 0:
        host.close()
        try:
            # Drop our copies of the pool's channels: a worker must see EOF when the host closes its end.
            sandbox.close_fds_except({ctl_fd, memfd} | cgroups.parent_fds())
            _zygote_main(socket.socket(fileno=ctl_fd), msg, memfd)
        finally:
            os._exit(0)
    os.close(ctl_fd)
    if memfd >= 0:
        os.close(memfd)
    pidfd = os.pidfd_open(pid)  # lets the host wait for the zygote (and its workers) to exit
    try:
        protocol.send(host, {"op": "zygote", "pid": pid}, fds=[pidfd])
    finally:
        os.close(pidfd)


class _Pool:
    """Pre-isolated, context-less workers, built for the config last claimed. A claim takes
    one built for its config, or clones one at once when there is none; refills happen
    only while no request waits (see serve), so a burst of claims (64 episodes starting
    together) is served first instead of each waiting behind the previous claim's refill.
    Workers built for other limits stay until a refill needs their place."""

    def __init__(self, children: _Children):
        self.children = children
        self.workers: list[_Started] = []
        self.config: dict | None = None
        self.refill_uids: list[int] = []  # reserved by the host for refills not built yet
        self.returned: list[int] = []  # uids the host gets back with the next reply

    def _ready(self) -> int:
        return sum(w.config == self.config for w in self.workers)

    def wants_refill(self) -> bool:
        return bool(self.refill_uids) and self.config is not None and self._ready() < POOL_SIZE

    def refill_one(self) -> None:
        """Build one pooled worker; only when wants_refill() (so the pool has a config)."""
        config = self.config
        if config is None:
            return
        if len(self.workers) >= POOL_SIZE:  # make room: the oldest one built for other limits
            stale = next(w for w in self.workers if w.config != self.config)
            self.workers.remove(stale)
            stale.discard(self.children)
            self.returned.append(stale.uid)
        uid = self.refill_uids.pop(0)
        try:
            self.workers.append(_start_worker(self.children, uid, config, None, pooled=True))
        except OSError:  # fork failed (EAGAIN, ENOMEM): the uid goes back, the next claim retries
            self.returned.append(uid)

    def claim(self, host: socket.socket, msg: dict) -> None:
        uids, config = list(msg["uids"]), msg["config"]
        self.config = config
        unused, self.returned = self.returned, []
        got = next((w for w in self.workers if w.config == config), None)
        if got is not None:
            self.workers.remove(got)
        else:
            try:
                got = _start_worker(self.children, uids.pop(0), config, None, pooled=True)
            except OSError as exc:  # the host reports it
                protocol.send(host, {"op": "failed", "error": str(exc), "unused": unused + uids})
                return
        # The claim's spare uid pays for a refill, unless enough are already on the way.
        if uids and self._ready() + len(self.refill_uids) < POOL_SIZE:
            self.refill_uids.append(uids.pop(0))
        got.send_to_host(host, {"op": "claimed", "pid": got.pid, "uid": got.uid, "unused": unused + uids})


def _prepare(disabled: set[str]) -> None:
    """Once, as the fork-server starts: what every worker inherits. `disabled` names
    layers to leave out (the runtime bench prices each layer this way)."""
    global _seccomp_program
    report = _server_report
    if os.geteuid() == 0:
        if "cgroups" not in disabled:
            report.update(cgroups.setup(os.getpid()))  # before the pivot: it needs /sys
        if "minimal_root" not in disabled:
            rootfs.build_and_pivot(report)
        sandbox.prepare_network_namespace()  # one namespace for all workers, where Landlock allows
    if "seccomp" not in disabled:
        _seccomp_program = seccomp.build_filter()
        if _seccomp_program is None:
            report["seccomp_error"] = f"no syscall table for {os.uname().machine}"
    report["disabled_layers"] = sorted(disabled)


def serve(host: socket.socket, disabled: set[str] | frozenset[str] = frozenset()) -> None:
    sandbox.set_name("rlm-forkserver")
    _prepare(set(disabled))
    children = _Children()
    gc.collect()
    gc.freeze()
    protocol.send(host, {"op": "hello", "pid": os.getpid(), "euid": os.geteuid(), "pool_size": POOL_SIZE,
                         "cgroups": cgroups.host_paths(), "layers": _server_report})
    pool = _Pool(children)
    while True:
        if pool.wants_refill() and not _next_request(host, children, timeout=0):
            pool.refill_one()  # nothing waits: build the next pooled worker now
            continue
        if not _next_request(host, children):
            continue
        try:
            msg, fds = protocol.recv(host, want_fds=True)
        except (OSError, protocol.ProtocolError):
            break  # the host is gone: our zygotes die with us (PDEATHSIG)
        try:
            if msg.get("op") == "zygote":
                _fork_zygote(host, msg, fds)
            elif msg.get("op") == "claim":
                pool.claim(host, msg)
            elif msg.get("op") == "exit":
                break
        except OSError:
            break  # the host channel broke mid-reply
    cgroups.thaw_own()
    children.kill_all()  # the pool, and any session the host did not close
    cgroups.remove_own()
    os._exit(0)


def main() -> None:
    fd = int(sys.argv[1])
    disabled = set(sys.argv[2].split(",")) - {""} if len(sys.argv) > 2 else set()
    serve(socket.socket(fileno=fd), disabled)


if __name__ == "__main__":
    main()
