"""A seccomp-bpf filter for the worker: the kernel surface a cell has no use for is closed.

Denied (EPERM): new namespaces (unshare, setns, clone with CLONE_NEW*), mounts and
pivots, io_uring, the kernel keyrings, bpf, perf events, ptrace and cross-process memory
access, module and kexec loading, clock and host settings. Sockets: AF_UNIX only (EAFNOSUPPORT
for IP, netlink, vsock, packet...). clone3 answers ENOSYS: its flags sit in memory a
filter cannot read, and glibc falls back to clone, whose flags it can. Syscalls of
another ABI (i386 through int 0x80, x32) are refused.

The program is assembled once (in the fork-server) and installed by each worker with a
single prctl, after no_new_privs. No libseccomp needed: the syscall numbers below were
taken from libseccomp's tables for both architectures.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# name -> (x86_64, aarch64); None where the syscall does not exist on that architecture.
_SYSCALLS = {
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "userfaultfd": (323, 282), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "acct": (163, 89), "swapon": (167, 224), "swapoff": (168, 225),
    "reboot": (169, 142), "syslog": (103, 116), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "lookup_dcookie": (212, 18), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "fanotify_init": (300, 262), "vhangup": (153, 58),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266),
    "adjtimex": (159, 171), "pidfd_getfd": (438, 438), "kcmp": (312, 272), "uselib": (134, None),
    "personality": (135, 92), "sethostname": (170, 161), "setdomainname": (171, 162),
    "move_pages": (279, 239), "migrate_pages": (256, 238), "memfd_secret": (447, 447),
    "iopl": (172, None), "ioperm": (173, None),
}
_CLONE, _CLONE3, _SOCKET, _SOCKETPAIR = {"x86_64": (56, 435, 41, 53), "aarch64": (220, 435, 198, 199)}.get(
    os.uname().machine, (None, None, None, None))
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_ARCH_INDEX = {"x86_64": 0, "aarch64": 1}
KEYCTL = {"x86_64": 250, "aarch64": 219}

DENIED = tuple(_SYSCALLS)
CLONE_NEW_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
AF_UNIX = 1
_X32_BIT = 0x40000000

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h)
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def _assemble(prog: list[tuple]) -> bytes:
    """(op, k, jt_label, jf_label) or ("label", name) entries -> struct sock_filter[]."""
    labels, pc = {}, 0
    for ins in prog:
        if ins[0] == "label":
            labels[ins[1]] = pc
        else:
            pc += 1
    out, pc = [], 0
    for ins in prog:
        if ins[0] == "label":
            continue
        op, k, jt, jf = (*ins, None, None)[:4]
        jt_off = labels[jt] - pc - 1 if jt else 0
        jf_off = labels[jf] - pc - 1 if jf else 0
        if not (0 <= jt_off < 256 and 0 <= jf_off < 256):
            raise ValueError("seccomp program: jump out of range")
        out.append(struct.pack("=HBBI", op, jt_off, jf_off, k & 0xFFFFFFFF))
        pc += 1
    return b"".join(out)


def build_filter(machine: str | None = None) -> bytes | None:
    """The filter program for this machine, or None where no syscall table is known."""
    machine = machine or os.uname().machine
    if machine not in _AUDIT_ARCH:
        return None
    index = _ARCH_INDEX[machine]
    prog: list[tuple] = [(_LD_W_ABS, _OFF_ARCH), (_JEQ_K, _AUDIT_ARCH[machine], "native", "deny"),
                         ("label", "native"), (_LD_W_ABS, _OFF_NR)]
    if machine == "x86_64":
        prog.append((_JGE_K, _X32_BIT, "deny", None))
    for name in DENIED:
        nr = _SYSCALLS[name][index]
        if nr is not None:
            prog.append((_JEQ_K, nr, "deny", None))
    prog += [(_JEQ_K, _CLONE3, "enosys", None), (_JEQ_K, _SOCKET, "socket", None),
             (_JEQ_K, _SOCKETPAIR, "socket", None), (_JEQ_K, _CLONE, "clone", None),
             (_RET_K, _RET_ALLOW),
             ("label", "deny"), (_RET_K, _RET_ERRNO | errno.EPERM),
             ("label", "enosys"), (_RET_K, _RET_ERRNO | errno.ENOSYS),
             ("label", "socket"), (_LD_W_ABS, _OFF_ARG0), (_JEQ_K, AF_UNIX, "allow", None),
             (_RET_K, _RET_ERRNO | errno.EAFNOSUPPORT),
             ("label", "clone"), (_LD_W_ABS, _OFF_ARG0), (_JSET_K, CLONE_NEW_FLAGS, "deny_clone", "allow"),
             ("label", "allow"), (_RET_K, _RET_ALLOW),
             ("label", "deny_clone"), (_RET_K, _RET_ERRNO | errno.EPERM)]
    return _assemble(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)


def install(program: bytes) -> None:
    """Apply the filter to this process and every child it makes (needs no_new_privs)."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


def join_fresh_session_keyring() -> None:
    """A new, empty session keyring for this worker (KEYCTL_JOIN_SESSION_KEYRING, NULL):
    nothing an earlier process of the host's session keyring holds is reachable."""
    nr = KEYCTL.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "no keyctl number known for this architecture")
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_long(1), None, None, None, None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")


def apply(report: dict, program: bytes | None) -> None:
    """In the worker, after no_new_privs: a fresh session keyring, then the filter."""
    try:
        join_fresh_session_keyring()
        report["session_keyring"] = True
    except OSError as exc:
        report["session_keyring"] = False
        report["keyring_error"] = str(exc)
    if program is None:
        report["seccomp"] = False
        return
    try:
        install(program)
        report["seccomp"] = True
    except OSError as exc:
        report["seccomp"] = False
        report["seccomp_error"] = str(exc)
