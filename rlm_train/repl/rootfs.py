"""The worker's file system: a minimal root, private /dev, private /tmp and /proc.

The fork-server, once at start, builds a root of read-only bind mounts (what bubblewrap
users write as `--ro-bind /usr /usr ...`): /usr and the /bin, /lib, /sbin links or dirs,
the Python runtime (its prefixes and the sys.path trees it imports from, never the
project checkout), two files of /etc the dynamic loader and time zone need, and a
/dev that holds only null, zero, full, random and urandom (no ptmx, no disks, no
shm of the host). It then pivots into that root and drops the host's tree from its
mount namespace. Zygotes and workers inherit it, so nothing else of the host (home
directories, the checkout and its .git, /run and its unix sockets, /sys, other users'
files) exists for a cell; a worker's namespace copy holds a dozen mounts instead of the
host's, so making it is cheaper too.

Each worker then mounts its own tmpfs on /tmp (size= and nr_inodes= bound it; /var/tmp
and /dev/shm are links into it) and a procfs for its own pid namespace.
"""

from __future__ import annotations

import ctypes
import os
import sys

from rlm_train.repl import sandbox

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
DEVICES = ("null", "zero", "full", "random", "urandom")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr")
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

minimal_root = False  # set in the fork-server once the pivot succeeded; inherited by workers
# Runtime trees under /tmp (a checkout, and its venv, cloned there): each worker's private
# /tmp covers them, so the worker binds them back (from fds opened before its tmpfs).
_under_tmp: list[str] = []


def runtime_paths() -> list[str]:
    """Trees the worker's Python needs: prefixes and sys.path dirs, minus the checkout
    (the worker's own modules are already imported) and anything inside another entry."""
    candidates = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix,
                  *(p for p in sys.path if p and os.path.isdir(p))}
    keep: list[str] = []
    for path in sorted(os.path.abspath(p) for p in candidates):
        if path == _PKG_ROOT or path == "/":
            continue
        if any(path == k or path.startswith(k.rstrip("/") + "/") for k in keep):
            continue
        if any(path == t or path.startswith(t + "/") for t in ("/usr",)):
            continue  # /usr is bound whole
        keep.append(path)
    return keep


def _bind(source_fd: int, target: str, read_only: bool = True) -> None:
    sandbox.mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND | MS_REC)
    if read_only:
        sandbox.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _mkdirs(root: str, path: str) -> str:
    target = root + path
    os.makedirs(target, mode=0o755, exist_ok=True)
    return target


def _touch(root: str, path: str) -> str:
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    with open(target, "w"):
        pass
    return target


def build_and_pivot(report: dict) -> None:
    """Fork-server, as root, once at start: a private mount namespace of its own, the
    minimal root built in it, and a pivot into it; every worker's namespace copies it.
    On failure the report says why and workers see the host's root (with private /tmp
    and /proc still)."""
    global minimal_root
    sources: dict[str, int] = {}
    try:
        sandbox.unshare(sandbox.CLONE_NEWNS)
        # Private first: nothing mounted below may propagate back to the host's namespace.
        sandbox.mount(None, "/", None, MS_REC | MS_PRIVATE)
        # Sources are opened first: the new root's tmpfs may cover where they live (/tmp).
        wanted_dirs = [p for p in TOP_LEVEL if os.path.isdir(p) and not os.path.islink(p)] + runtime_paths()
        for path in wanted_dirs:
            sources[path] = os.open(path, os.O_PATH | os.O_DIRECTORY)
        files = [f for f in ETC_FILES if os.path.isfile(f) and not os.path.islink(f)] + [f"/dev/{d}" for d in DEVICES if os.path.exists(f"/dev/{d}")]
        for path in files:
            sources[path] = os.open(path, os.O_PATH)
        links = {p: os.readlink(p) for p in TOP_LEVEL + ETC_FILES if os.path.islink(p)}
        root = "/tmp"  # any existing dir works as the mount point; the host's /tmp is untouched
        sandbox.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
        for path in wanted_dirs:
            _bind(sources[path], _mkdirs(root, path))
        for path, dest in links.items():
            if path.startswith("/etc/") and not os.path.isabs(dest):
                dest = os.path.normpath(os.path.join("/etc", dest))
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(dest, root + path)
        for path in ETC_FILES:
            if path in sources:
                _bind(sources[path], _touch(root, path))
        _build_dev(root, sources)
        for path in ("/proc", "/tmp", "/var"):
            _mkdirs(root, path)
        os.symlink("/tmp", root + "/var/tmp")
        os.chdir(root)
        # pivot_root(".", "."): the old root ends up stacked under the new one; detach it.
        _pivot_root(".", ".")
        sandbox.check(sandbox.libc.umount2(b".", MNT_DETACH), "umount2(old root)")
        os.chdir("/")
        sandbox.mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
        minimal_root = True
        report["minimal_root"] = True
        _under_tmp.extend(p for p in runtime_paths() if p.startswith("/tmp/"))
    except OSError as exc:
        report["minimal_root"] = False
        report["minimal_root_error"] = str(exc)
    finally:
        for fd in sources.values():
            os.close(fd)


def _build_dev(root: str, sources: dict[str, int]) -> None:
    dev = _mkdirs(root, "/dev")
    sandbox.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name in DEVICES:
        if f"/dev/{name}" in sources:
            target = _touch(root, f"/dev/{name}")
            sandbox.mount(f"/proc/self/fd/{sources[f'/dev/{name}']}", target, None, MS_BIND)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(dest, f"{dev}/{name}")
    sandbox.mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")


def _pivot_root(new_root: str, put_old: str) -> None:
    nr = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "no pivot_root number known for this architecture")
    sandbox.check(sandbox.libc.syscall(ctypes.c_long(nr), new_root.encode(), put_old.encode()), "pivot_root")


WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def private_mounts(report: dict, uid: int, tmp_mb: int, in_new_pidns: bool) -> None:
    """Per worker, in its own mount namespace: a private tmpfs on /tmp (and, without the
    minimal root, on the host's other world-writable dirs), a procfs of its pid namespace."""
    if not report.get("mount_namespace"):
        report["private_tmp"] = False
        return
    # Opened in our own namespace before the tmpfs hides them: a bind must come from a
    # mount of the caller's namespace.
    hidden_runtime = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in _under_tmp}
    try:
        if not minimal_root:  # the fork-server's namespace is not private: make ours so
            sandbox.mount(None, "/", None, MS_REC | MS_PRIVATE)
        for path in ("/tmp",) if minimal_root else WORLD_WRITABLE:
            if os.path.isdir(path):
                sandbox.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV,
                              f"size={tmp_mb}m,nr_inodes=16384,mode=1777")
        os.chown("/tmp", uid, uid)
        os.chmod("/tmp", 0o700)
        report["private_tmp"] = True
    except OSError as exc:
        report["private_tmp"] = False
        report["mount_error"] = str(exc)
    report["private_dev"] = minimal_root
    if in_new_pidns:
        try:  # host processes become invisible (and /proc/<host>/environ with them)
            sandbox.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            report["private_proc"] = True
        except OSError as exc:
            report["private_proc"] = False
            report["proc_error"] = str(exc)
    try:
        if report.get("private_tmp") and report.get("private_proc"):
            for path, fd in hidden_runtime.items():
                _bind(fd, _mkdirs("", path))
    except OSError as exc:
        report["runtime_under_tmp_error"] = str(exc)
    finally:
        for fd in hidden_runtime.values():
            os.close(fd)
