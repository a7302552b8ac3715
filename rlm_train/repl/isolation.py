"""The isolation report: which of the sandbox's layers this machine gives, and the one
warning line naming those it does not (see docs/architecture.md, "Missing layers")."""

from __future__ import annotations

import logging
import threading

from rlm_train.repl import client

log = logging.getLogger("rlm_train.repl.session")

# Layers the contract promises, and what is weaker without each; a layer that is False in
# a worker's report is named in the one-line warning.
LAYERS = {
    "net_namespace": "cells can reach the host's network",
    "mount_namespace": "cells share the host's mounts",
    "pid_namespace": "cells see host processes",
    "minimal_root": "cells can read world-readable host files and reach host unix sockets",
    "private_tmp": "cells write into the host's /tmp",
    "private_dev": "cells can open host devices (/dev/ptmx)",
    "private_proc": "cells read the host's /proc",
    "uid_drop": "cells run as the host's user",
    "no_new_privs": "setuid programs can raise privileges",
    "seccomp": "cells can make namespaces, use io_uring, bpf, ptrace, any socket family",
    "session_keyring": "kernel keys can pass between sessions",
    "cgroup_memory": "memory is bounded per process only, tmpfs and memfd not at all",
    "cgroup_pids": "processes are bounded per uid only",
    "cgroup_cpu": "a session may keep every core busy",
    "cgroup_cpu_time": "CPU time is bounded per process only",
    "cgroup_freeze": "threads a cell leaves behind run between cells",
}
EXPECTED_LAYERS = tuple(LAYERS)

_report: dict | None = None
_report_lock = threading.Lock()


def weakness_line(report: dict) -> str | None:
    """One line naming every missing layer, what is weaker without it, and why it is
    missing where the report says; None when nothing is."""
    missing = [k for k in EXPECTED_LAYERS if not report.get(k)]
    if not missing:
        return None
    why = "; ".join(f"{k}: {str(v)[:120]}" for k, v in report.items() if k.endswith("_error") and v)
    parts = ", ".join(f"{k} ({LAYERS[k]})" for k in missing)
    return f"REPL sandbox is WEAKER than the contract on this machine: missing {parts}" + (f" [{why}]" if why else "")


def disable_layers(layers: tuple[str, ...] = ()) -> None:
    """Benchmarks only: restart the fork-server without some layers ("cgroups",
    "minimal_root", "seccomp") to price each; () puts every layer back."""
    global _report
    client.shutdown()
    client._disabled_layers = tuple(layers)
    _report = None


def note_report(report: dict) -> None:
    global _report
    if report.get("disabled_layers"):
        return  # left out on purpose (a bench): not a weakness of this machine
    with _report_lock:
        if _report is not None:
            return
        _report = {**report, "missing": [k for k in EXPECTED_LAYERS if not report.get(k)]}
    line = weakness_line(report)
    if line:
        log.warning("%s", line)


def isolation_report() -> dict:
    """What the sandbox enforces on this machine (starts a probe session if none ran yet)."""
    from rlm_train.repl.session import REPLSession

    if _report is None:
        with REPLSession("") as s:
            s.execute("pass")
    return dict(_report or {})
