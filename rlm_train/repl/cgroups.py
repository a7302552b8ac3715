"""Per-session cgroups: memory (with shmem, memfd, tmpfs and swap), processes, CPU share,
CPU-time budget and freezing between cells, on cgroup v2, v1, or the hybrid of both.

Every session uid owns one group per hierarchy, named `<fork-server pid>.<uid>` under an
`rlm_repl` parent this module creates (a fresh machine has none). The worker makes and
joins its groups itself while still root; the groups stay for the uid's next worker and
the fork-server removes them when it exits. A fork-server killed before it could clean
up leaves groups that the next one sweeps. A uid, and so its groups, passes to a new
session only once everything of the previous one is dead (client.py).

Limits are written once per group, not once per worker: the fork-server keeps, in
memory shared with its zygotes, the limits each uid's groups hold (`_Written`), so a
worker whose groups already hold its config's limits only joins them, one write per
hierarchy, and none for v2, which it enters as it is cloned (CLONE_INTO_CGROUP, see
`v2_group_fd`). Each worker unmaps that record before it runs a cell.

Which hierarchy serves which role is decided once, in the fork-server:
- v2 (`/sys/fs/cgroup` when it is the unified root, else `/sys/fs/cgroup/unified` on
  hybrid hosts): freezing (`cgroup.freeze` costs nothing measurable per cell; the v1
  freezer costs time per cell and cannot kill a frozen task) and CPU time (`cpu.stat`, present
  without any controller); memory, pids and cpu too where their controllers can be
  enabled below our parent.
- v1 (`/sys/fs/cgroup/<controller>`): memory, pids, cpu and CPU time where v2 cannot.

The fork-server pivots into a minimal root without /sys, so every path here is opened
relative to a directory fd taken before the pivot (`setup`), inherited by zygotes and
workers. The host, outside the sandbox, uses plain paths (`host_paths`).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import time

ROOT = "/sys/fs/cgroup"
PARENT = "rlm_repl"
# Roles a session's limits need. `freeze` and `cpu_time` are read and written by the host.
ROLES = ("memory", "pids", "cpu", "cpu_time", "freeze")
CPU_PERIOD_US = 100_000
# The context pages were charged to the zygote; a worker's group pays for new pages only
# (copy-on-write copies, tmpfs and memfd files), so the limit is memory_mb plus this slack
# for the interpreter's own pages.
MEMORY_SLACK_MB = 64

# role -> (hierarchy key, parent dir fd). Set by setup() in the fork-server, inherited.
_roles: dict[str, tuple[str, int]] = {}
_parent_fds: dict[str, int] = {}  # hierarchy key ("v2" or a v1 controller) -> fd of its rlm_repl dir
_parent_paths: dict[str, str] = {}
_owner = 0


def _v2_root() -> str | None:
    for path in (ROOT, os.path.join(ROOT, "unified")):
        if os.path.exists(os.path.join(path, "cgroup.controllers")) and os.path.ismount(path):
            return path
    return None


def _write_at(fd: int, name: str, value) -> None:
    out = os.open(name, os.O_WRONLY, dir_fd=fd)
    try:
        os.write(out, str(value).encode())
    finally:
        os.close(out)


def _read_at(fd: int, name: str) -> str:
    src = os.open(name, os.O_RDONLY, dir_fd=fd)
    try:
        return os.read(src, 65536).decode()
    finally:
        os.close(src)


def _open_parent(key: str, base: str) -> str | None:
    """mkdir -p <base>/rlm_repl and keep a directory fd to it. None (and why) on failure."""
    path = os.path.join(base, PARENT)
    try:
        os.makedirs(path, exist_ok=True)
        _parent_fds[key] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _parent_paths[key] = path
        return None
    except OSError as exc:
        return f"{path}: {exc.strerror}"


def _enable_v2_controllers(v2: str, wanted: list[str]) -> set[str]:
    """Enable what we can of `wanted` for our groups: in the root's subtree_control (for
    rlm_repl) and in rlm_repl's (for its children). Controllers bound to a v1 hierarchy,
    or refused by the no-internal-processes rule, stay off."""
    available = set(open(os.path.join(v2, "cgroup.controllers")).read().split())
    enabled = set()
    for ctrl in wanted:
        if ctrl not in available:
            continue
        try:
            for where in (v2, os.path.join(v2, PARENT)):
                with open(os.path.join(where, "cgroup.subtree_control"), "w") as f:
                    f.write(f"+{ctrl}")
            enabled.add(ctrl)
        except OSError:
            pass
    return enabled


def setup(owner_pid: int) -> dict:
    """The fork-server, as root, before it leaves the host's file system: make the parents
    a fresh machine lacks, pick a hierarchy per role, sweep groups of dead fork-servers.
    Returns report entries (what is missing and why)."""
    global _owner, _written
    _owner = owner_pid
    _written = _Written()
    problems: list[str] = []
    v2 = _v2_root()
    if v2 is not None:
        why = _open_parent("v2", v2)
        if why:
            problems.append(why)
            v2 = None
    v2_ctrls = _enable_v2_controllers(v2, ["memory", "pids", "cpu"]) if v2 else set()
    if v2:
        _roles["freeze"] = ("v2", _parent_fds["v2"])
        _roles["cpu_time"] = ("v2", _parent_fds["v2"])
    v1_for = {"memory": "memory", "pids": "pids", "cpu": "cpu", "cpu_time": "cpuacct"}
    for role, ctrl in v1_for.items():
        if role in _roles:
            continue
        if role in v2_ctrls:
            _roles[role] = ("v2", _parent_fds["v2"])
            continue
        base = os.path.join(ROOT, ctrl)
        if not os.path.isdir(base) or not os.path.exists(os.path.join(base, "cgroup.procs")):
            continue
        if ctrl not in _parent_fds:
            why = _open_parent(ctrl, base)
            if why:
                problems.append(why)
                continue
        _roles[role] = (ctrl, _parent_fds[ctrl])
    sweep_stale()
    report = {"cgroup_version": "v2" if v2 and not any(k != "v2" for k, _ in _roles.values())
              else ("hybrid" if v2 else ("v1" if _roles else "none"))}
    if problems:
        report["cgroup_error"] = "; ".join(problems)
    return report


def host_paths() -> dict[str, str]:
    """Where the host finds a session's freeze and CPU-time files: role -> rlm_repl dir."""
    out: dict[str, str] = {}
    for role in ("freeze", "cpu_time"):
        if role in _roles:
            key = _roles[role][0]
            out[role] = _parent_paths[key]
            out[f"{role}_kind"] = "v2" if key == "v2" else "v1"
    return out


def parent_fds() -> set[int]:
    """Directory fds a zygote keeps so that its workers can make their groups."""
    return set(_parent_fds.values())


# --------------------------------------------------------------------------- per session
def _group_name(uid: int) -> str:
    return f"{_owner}.{uid}"


def _set_v1_memory(fd: int, name: str, limit: int) -> None:
    """memory.limit_in_bytes and memsw (where swap is accounted). The kernel wants limit
    <= memsw at every step, so raising a reused group's limit writes memsw first. A reused
    group may still be charged for page cache above a lower new limit (EBUSY): drop it."""
    memsw = f"{name}/memory.memsw.limit_in_bytes"
    has_memsw = True
    try:
        os.stat(memsw, dir_fd=fd)
    except FileNotFoundError:
        has_memsw = False

    def write_both():
        if not has_memsw:
            _write_at(fd, f"{name}/memory.limit_in_bytes", limit)
            return
        try:
            _write_at(fd, f"{name}/memory.limit_in_bytes", limit)
            _write_at(fd, memsw, limit)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _write_at(fd, memsw, limit)
            _write_at(fd, f"{name}/memory.limit_in_bytes", limit)

    try:
        write_both()
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        _write_at(fd, f"{name}/memory.force_empty", 0)
        write_both()


def _limit_values(config: dict) -> tuple[int, int, int]:
    """What a session's groups hold for `config`: memory bytes, processes, CPU quota (us per period)."""
    quota = max(1000, int(config["max_cpus"] * CPU_PERIOD_US))
    return (config["memory_mb"] + MEMORY_SLACK_MB) << 20, config["max_processes"], quota


def _apply(role: str, key: str, fd: int, name: str, config: dict) -> None:
    v2 = key == "v2"
    limit, max_processes, quota = _limit_values(config)
    if role == "memory":
        if v2:
            _write_at(fd, f"{name}/memory.max", limit)
            _write_at(fd, f"{name}/memory.swap.max", 0)
        else:
            _set_v1_memory(fd, name, limit)
    elif role == "pids":
        _write_at(fd, f"{name}/pids.max", max_processes)
    elif role == "cpu":
        if v2:
            _write_at(fd, f"{name}/cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            _write_at(fd, f"{name}/cpu.cfs_period_us", CPU_PERIOD_US)
            _write_at(fd, f"{name}/cpu.cfs_quota_us", quota)
    elif role == "freeze":
        _write_at(fd, f"{name}/cgroup.freeze", 0)  # a reused group may have been left frozen


class _Written:
    """The limits each uid's groups hold, in memory the fork-server shares with its zygotes
    and their workers (an anonymous shared mapping: no file, no name). One record per uid
    slot (uids of one fork-server differ in their low 8 bits): the uid and its limit values.
    A worker clears its record before it writes limits and sets it once every role was
    written, so a record never names limits a group does not hold. Workers write it while
    still root and unmap it (`forget`) before any cell runs."""

    SLOTS = 256
    RECORD = struct.Struct("<qqqq")

    def __init__(self):
        self.map: mmap.mmap | None = mmap.mmap(-1, self.SLOTS * self.RECORD.size)

    def get(self, uid: int) -> tuple[int, ...] | None:
        if self.map is None:
            return None
        rec = self.RECORD.unpack_from(self.map, (uid % self.SLOTS) * self.RECORD.size)
        return rec[1:] if rec[0] == uid else None

    def put(self, uid: int, values: tuple[int, int, int] | None) -> None:
        if self.map is not None:
            self.RECORD.pack_into(self.map, (uid % self.SLOTS) * self.RECORD.size, uid, *(values or (-1, -1, -1)))

    def forget(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


_written: _Written | None = None


def forget_written() -> None:
    """A worker, before it runs anything of a cell: unmap the record of written limits."""
    if _written is not None:
        _written.forget()


def v2_group_fd(uid: int) -> int:
    """The fork-server or a zygote, before it clones a worker: an fd of the uid's v2 group
    (the worker is cloned straight into it), or -1 when there is none yet (the uid's first
    worker makes it) or no v2 role. The caller closes it."""
    role = _roles.get("freeze") or _roles.get("cpu_time")
    if role is None or role[0] != "v2":
        return -1
    try:
        return os.open(_group_name(uid), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=role[1])
    except OSError:
        return -1


def _make_groups(report: dict, uid: int, config: dict) -> list[tuple[str, int, str]]:
    """Create (or reuse) the uid's groups and write this session's limits; returns
    (hierarchy, dir fd, name) per hierarchy for the join. One report entry per role:
    cgroup_memory, cgroup_pids, cgroup_cpu, cgroup_cpu_time, cgroup_freeze."""
    name = _group_name(uid)
    joined: dict[str, tuple[str, int, str]] = {}
    for role in ROLES:
        if role not in _roles:
            report[f"cgroup_{role}"] = False
            continue
        key, fd = _roles[role]
        try:
            if key not in joined:
                try:
                    os.mkdir(name, dir_fd=fd)
                except FileExistsError:
                    pass  # this uid's group from an earlier session: empty now
            _apply(role, key, fd, name, config)
            joined[key] = (key, fd, name)
            report[f"cgroup_{role}"] = True
        except OSError as exc:
            report[f"cgroup_{role}"] = False
            report[f"cgroup_{role}_error"] = str(exc)
    return list(joined.values())


def _join(groups, in_v2: bool) -> None:
    for key, fd, name in groups:
        if not (in_v2 and key == "v2"):
            _write_at(fd, f"{name}/cgroup.procs", 0)


def enter_session_groups(report: dict, uid: int, config: dict, in_v2: bool) -> None:
    """The worker, as root: join the uid's groups (`in_v2`: it was cloned into the v2 one).
    When the record says they hold this config's limits already, that is all; otherwise
    (first use, another config, or a group that went away) make them and write the limits."""
    values = _limit_values(config)
    report.update(cgroup_limits_reused=False, cgroup_v2_at_clone=in_v2)  # how it went: tests and benches read it
    if _written is not None and _written.get(uid) == values:
        name = _group_name(uid)
        groups = [(key, fd, name) for key, fd in {k: f for k, f in _roles.values()}.items()]
        try:
            _join(groups, in_v2)
            report.update({f"cgroup_{role}": role in _roles for role in ROLES}, cgroup_limits_reused=True)
            return
        except FileNotFoundError:
            pass  # removed under us (not by this fork-server): made again below
    if _written is not None:
        _written.put(uid, None)  # from here on the groups may hold neither config's limits
    groups = _make_groups(report, uid, config)
    _join(groups, in_v2)
    if _written is not None and all(report[f"cgroup_{role}"] for role in _roles):
        _written.put(uid, values)


# --------------------------------------------------------------------------- cleanup
def _owner_alive(owner: str) -> bool:
    try:
        os.kill(int(owner), 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True


def _empty_and_remove(fd: int, name: str) -> None:
    """Thaw, kill what is left, rmdir. rmdir only succeeds on an empty group, so a live
    one is never disturbed unless we killed it on purpose."""
    try:
        _write_at(fd, f"{name}/cgroup.freeze", 0)
    except OSError:
        pass
    for attempt in range(50):
        try:
            os.rmdir(name, dir_fd=fd)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return
        try:
            pids = [int(p) for p in _read_at(fd, f"{name}/cgroup.procs").split()]
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _remove_groups(selected) -> None:
    for fd in _parent_fds.values():
        try:
            names = os.listdir(fd)
        except OSError:
            continue
        for name in names:
            if "." in name and selected(name):
                _empty_and_remove(fd, name)


def remove_own() -> None:
    """The fork-server, as it exits (its workers killed): every group it named."""
    _remove_groups(lambda name: name.partition(".")[0] == str(_owner))


def sweep_stale() -> None:
    """Groups whose fork-server is gone: left by one killed before it could clean up."""
    _remove_groups(lambda name: not _owner_alive(name.partition(".")[0]))


def thaw_own() -> None:
    """Before the fork-server kills its workers: frozen v2 tasks die on SIGKILL, but a
    thawed tree exits and is reaped without waiting on anything."""
    if "freeze" not in _roles:
        return
    _, fd = _roles["freeze"]
    try:
        names = os.listdir(fd)
    except OSError:
        return
    for name in names:
        if name.partition(".")[0] == str(_owner):
            try:
                _write_at(fd, f"{name}/cgroup.freeze", 0)
            except OSError:
                pass
