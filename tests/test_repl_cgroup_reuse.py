"""A session uid's cgroups are reused with the limits they hold: a worker whose groups hold
its config's limits only joins them (and is cloned into its v2 group), yet every session
gets exactly its own config's limits, a group removed between sessions is made again,
and no cell can reach the fork-server's record of what the groups hold. Checked from the
host, on the cgroup files themselves."""

from __future__ import annotations

import os

import psutil
import pytest

from rlm_train.repl import REPLSession, SandboxConfig, cgroups, shutdown
from rlm_train.repl.client import get_server

ROOT = cgroups.ROOT
needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir(os.path.join(ROOT, "memory")) or not os.path.isdir(os.path.join(ROOT, "pids")),
    reason="needs root and cgroup v1 memory + pids hierarchies (this host's layout)")

A = SandboxConfig(timeout_s=10, memory_mb=300, max_processes=12)
B = SandboxConfig(timeout_s=10, memory_mb=200, max_processes=9)


def _group(controller: str, session: REPLSession) -> str:
    uid = psutil.Process(session.pid).uids().real
    return os.path.join(ROOT, controller, cgroups.PARENT, f"{get_server().pid}.{uid}")


def _check_limits(session: REPLSession, config: SandboxConfig) -> None:
    memory, pids = _group("memory", session), _group("pids", session)
    assert int(open(f"{memory}/memory.limit_in_bytes").read()) == (config.memory_mb + cgroups.MEMORY_SLACK_MB) << 20
    assert int(open(f"{pids}/pids.max").read()) == config.max_processes
    for group in (memory, pids):
        assert str(session.pid) in open(f"{group}/cgroup.procs").read().split()


@needs_cgroups
def test_limits_are_reused_per_uid_and_rewritten_when_the_config_changes():
    shutdown()  # a fresh fork-server: no group holds any limits yet
    phases = []
    for config in (A, B, A):
        reused = []
        for _ in range(8):
            with REPLSession("x", config=config) as s:
                _check_limits(s, config)
                assert s.execute("print(1)").stdout == "1\n"
                reused.append(s.isolation["cgroup_limits_reused"])
                if s.isolation["cgroup_limits_reused"]:  # its v2 group existed: it was cloned into it
                    assert s.isolation["cgroup_v2_at_clone"] or s.isolation["cgroup_version"] == "v1"
        phases.append(reused)
    # Each phase starts on groups that hold the other config's limits (or none): those
    # are written; once the pool cycles through its uids, workers only join.
    assert not phases[0][0]
    assert all(any(p[4:]) for p in phases), phases


@needs_cgroups
def test_a_group_removed_between_sessions_is_made_again_with_its_limits():
    with REPLSession("x", config=A) as s:
        server = get_server().pid
        assert s.execute("x = 1").error is None
    removed: set[int] = set()
    for controller in os.listdir(ROOT):
        parent = os.path.join(ROOT, controller, cgroups.PARENT)
        if not os.path.isdir(parent):
            continue
        for name in os.listdir(parent):
            if name.startswith(f"{server}."):
                try:
                    os.rmdir(os.path.join(parent, name))  # only empty ones go: pooled workers keep theirs
                    removed.add(int(name.partition(".")[2]))
                except OSError:
                    pass
    assert removed
    seen = set()
    for _ in range(8):  # the pool hands out the freed uids again: their record says A, their groups are gone
        with REPLSession("x", config=A) as s:
            seen.add(psutil.Process(s.pid).uids().real)
            _check_limits(s, A)
            assert all(s.isolation[f"cgroup_{role}"] for role in ("memory", "pids", "cpu", "cpu_time", "freeze"))
            assert "MemoryError" in s.execute("x = bytearray(400 << 20)").error
    assert seen & removed  # workers did start on uids whose groups were gone


@needs_cgroups
def test_no_cell_sees_the_record_of_written_limits():
    """The fork-server shares the record with its zygotes through an anonymous shared
    mapping; each worker unmaps it before it runs a cell."""
    for context in ("small", "z" * (1 << 20)):  # a pooled worker, and a zygote's
        with REPLSession(context, config=A) as s:
            r = s.execute("print([l for l in open('/proc/self/maps') if ' rw-s ' in l or '/dev/zero' in l])")
            assert r.error is None and r.stdout == "[]\n", r
