"""The sandbox's processes: cgroups per session uid, reaping, the fork-server's pool and
the zygotes that share a context copy-on-write (real processes, no mocks)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid

import psutil
import pytest

from rlm_train.bench.sandbox import tree_pss_kb
from rlm_train.repl import REPLSession, SandboxConfig, SharedContext, shutdown
from rlm_train.repl.client import POOL_MAX_CONTEXT_BYTES
from test_repl import FAST, _alive


# --------------------------------------------------------------------------- processes, sharing
def _groups_of(uid: int) -> list[str]:
    """The session uid's cgroups: <fork-server pid>.<uid> under each controller."""
    return [f"/sys/fs/cgroup/{c}/rlm_repl/{n}" for c in ("memory", "pids") if os.path.isdir(f"/sys/fs/cgroup/{c}/rlm_repl")
            for n in os.listdir(f"/sys/fs/cgroup/{c}/rlm_repl") if n.endswith(f".{uid}")]


def test_close_reaps_everything():
    s = REPLSession("abc", config=SandboxConfig(timeout_s=10, memory_mb=512, allow_background=True))
    s.execute("import subprocess\np = subprocess.Popen(['sleep', '100'])")
    pid = s.pid
    uid = psutil.Process(pid).uids().real
    groups = _groups_of(uid)
    assert len(groups) == 2
    assert all(str(pid) in open(f"{g}/cgroup.procs").read().split() for g in groups)
    s.close()  # returns once the worker's parent has reaped it: its whole pid namespace is gone
    assert not _alive(pid)
    assert not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    zombies = [p for p in psutil.Process().children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
    # The uid's groups stay for its next session, empty.
    assert all(open(f"{g}/cgroup.procs").read() == "" for g in groups)


def test_cgroups_are_reused_and_removed_with_the_fork_server():
    with REPLSession("a", config=FAST) as s:
        uid, server = psutil.Process(s.pid).uids().real, s.zygote_pid
    with REPLSession("b", config=SandboxConfig(timeout_s=10, memory_mb=300)) as s:
        # The uid just freed is reused first, with its groups and this session's limits.
        assert psutil.Process(s.pid).uids().real == uid
        memory = [g for g in _groups_of(uid) if "/memory/" in g][0]
        assert int(open(f"{memory}/memory.limit_in_bytes").read()) == (300 + 64) << 20
        assert "MemoryError" in s.execute("x = bytearray(400 << 20)").error
    assert _groups_of(uid)
    shutdown()
    assert not _alive(server)
    assert not [g for c in ("memory", "pids") if os.path.isdir(f"/sys/fs/cgroup/{c}/rlm_repl")
                for g in os.listdir(f"/sys/fs/cgroup/{c}/rlm_repl") if g.startswith(f"{server}.")]


def test_concurrent_sessions_from_threads():
    text = "x" * 1000
    errors = []

    def run(i):
        try:
            with REPLSession(text, config=FAST, llm=lambda p: p * 2) as s:
                for j in range(3):
                    r = s.execute(f"v = {i} * 10 + {j}\nprint(v, llm_query('ab'), len(context))")
                    assert r.stdout == f"{i * 10 + j} abab 1000\n", r
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def _rlm_cgroups() -> set[str]:
    return {f"{c}/{n}" for c in ("memory", "pids") if os.path.isdir(f"/sys/fs/cgroup/{c}/rlm_repl")
            for n in os.listdir(f"/sys/fs/cgroup/{c}/rlm_repl")}


def test_spare_workers_are_claimed_once_and_never_leak():
    text = f"spare-{uuid.uuid4().hex}" + "x" * POOL_MAX_CONTEXT_BYTES  # big enough for a zygote
    other = SandboxConfig(timeout_s=10, memory_mb=300)
    with REPLSession(text, config=FAST) as a, REPLSession(text, config=FAST) as a2:
        zygote = a.zygote_pid
        time.sleep(0.3)  # the context is in use again: a spare was built after a2's claim
        spare = {p.pid for p in psutil.Process(zygote).children(recursive=True)} - {a.pid, a2.pid}
        assert len(spare) == 1  # one worker, the zygote's own child
        with REPLSession(text, config=FAST) as b:  # claims that spare
            assert {b.pid} == spare and b.execute("x = 1").error is None
            with REPLSession(text, config=other) as c:  # other limits: not the FAST spare
                assert c.pid not in spare
                assert "MemoryError" in c.execute("x = bytearray(400 << 20)").error
                workers = {s.pid for s in (a, a2, b, c)}
                uids = {psutil.Process(s.pid).uids().real for s in (a, a2, b, c)}
                assert len(workers) == 4 and len(uids) == 4
                assert a.execute("print(x)").error is not None  # namespaces are not shared
    tree = psutil.Process(zygote).children(recursive=True)
    assert len(tree) == 1  # only the next spare is left
    server = psutil.Process(zygote).ppid()
    shutdown()  # stops the zygotes, which stop their spares; the fork-server removes the cgroups
    assert not _alive(zygote) and not any(_alive(p.pid) for p in tree)
    assert not [g for g in _rlm_cgroups() if g.split("/")[1].startswith(f"{server}.")]


def test_32_concurrent_starts_on_distinct_contexts():
    """Starts on distinct small contexts overlap (pooled workers, pipelined fork-server
    requests); each session must still get its own context and its own worker."""
    results, errors = {}, []

    def run(i):
        try:
            context = f"ctx-{i}-" + "y" * (i * 997) if i % 2 else {"i": i, "docs": [f"d{i}"] * i}
            with REPLSession(context, config=FAST) as s:
                r = s.execute("import hashlib\nprint(hashlib.sha1(repr(context).encode()).hexdigest())")
                results[i] = (r.stdout, s.pid, psutil.Process(s.pid).uids().real)
                assert r.error is None and r.stdout == hashlib.sha1(repr(context).encode()).hexdigest() + "\n", r
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 32
    assert len({pid for _, pid, _ in results.values()}) == 32  # one worker each
    assert len({uid for _, _, uid in results.values()}) == 32  # and one uid each


def test_pooled_workers_never_leak():
    with REPLSession("small", config=FAST) as s:
        server = s.zygote_pid  # small contexts come from the fork-server's pool
        assert s.execute("print(context)").stdout == "small\n"
    time.sleep(0.3)  # the pool was refilled after the claim
    pooled = psutil.Process(server).children(recursive=True)
    assert pooled and all(p.name().startswith("rlm-") for p in pooled)
    shutdown()
    assert not _alive(server) and not any(_alive(p.pid) for p in pooled)
    assert not [g for g in _rlm_cgroups() if g.split("/")[1].startswith(f"{server}.")]


def test_pool_serves_two_configs_in_turn():
    """Sessions with other limits in between do not empty the pool of workers built for
    the first ones: a claim right after is served by a worker that was already there."""
    other = SandboxConfig(timeout_s=10, memory_mb=300)
    with REPLSession("a", config=FAST) as s:
        server = s.zygote_pid
    time.sleep(0.5)  # refilled for FAST while idle
    with REPLSession("b", config=other) as s:
        assert s.execute("x = bytearray(400 << 20)").error  # it got the other limits
    time.sleep(0.5)  # a refill for `other` took the place of one FAST worker
    before = {p.pid for p in psutil.Process(server).children()}
    with REPLSession("c", config=FAST) as s:
        assert s.pid in before and s.execute("print(context)").stdout == "c\n"


def test_list_and_dict_contexts():
    with REPLSession({"docs": ["a", "b"], "n": 2}, config=FAST) as s:
        assert s.execute("print(context['docs'][1], context['n'])").stdout == "b 2\n"
    shared = SharedContext(["p", "q"])
    with REPLSession(shared, config=FAST) as a, REPLSession(shared, config=FAST) as b:
        assert a.zygote_pid == b.zygote_pid
        assert b.execute("print(context)").stdout == "['p', 'q']\n"


@pytest.mark.slow
def test_sessions_share_the_context_copy_on_write():
    context = "abcdefghij" * (5 << 20)  # 50 MB
    cfg = SandboxConfig(timeout_s=20, memory_mb=256)
    one = REPLSession(context, config=cfg)
    one.execute("n = context.count('j')")
    pss_one = tree_pss_kb(one.zygote_pid)
    more = [REPLSession(context, config=cfg) for _ in range(7)]
    try:
        for s in more:
            assert s.zygote_pid == one.zygote_pid
            assert s.execute("n = context.count('j'); print(n)").stdout == f"{5 << 20}\n"
        pss_eight = tree_pss_kb(one.zygote_pid)
    finally:
        for s in [one, *more]:
            s.close()
    assert pss_one > 50_000  # the context is really in there
    assert pss_eight < 2 * pss_one, (pss_one, pss_eight)
