"""The REPL host in a process with many open descriptors, and a start that fails.

A gateway holding ~1,000 client connections hands out descriptors numbered past 1024,
which select() refuses: every wait of the host (and of a fork-server started from it)
must work there. A start that fails, for whatever reason, gives back its sandbox uid
and closes what it opened, or the process runs out of sessions for good.
"""

from __future__ import annotations

import os
import resource

import pytest

from rlm_train.repl import REPLSession, SandboxConfig, client, protocol

FAST = SandboxConfig(timeout_s=20, memory_mb=512, max_output_chars=10_000_000)
FIRST_FREE_FD = 1100  # every descriptor the test opens after the filler is numbered above this


def _next_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


@pytest.fixture
def high_fds():
    """Fill the descriptor table up to FIRST_FREE_FD, and restart the fork-server so that
    its channel (in both processes) is numbered above it too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FIRST_FREE_FD + 1024
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    client.shutdown()  # first: it frees the descriptors of the old channels
    filler: list[int] = []
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        while not filler or filler[-1] <= FIRST_FREE_FD:
            filler.append(os.dup(null))
        assert _next_fd() > FIRST_FREE_FD
        yield
    finally:
        client.shutdown()  # the next test gets a fork-server with ordinary descriptors
        for fd in filler + [null]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class ChildHandler:
    """Sub-calls answered on the host: llm_query echoes, rlm_query runs the child's cell in
    its own REPLSession (a child RLM without a model: its one cell prints the context)."""

    def llm_batch(self, prompts):
        return [f"<{p}>" for p in prompts]

    def rlm_batch(self, requests):
        answers = []
        for prompt, context in requests:
            with REPLSession(context, config=FAST) as child:
                r = child.execute(f"print({len(prompt)}, context)")
                assert r.error is None, r.error
                answers.append(r.stdout.strip())
        return answers


def test_sessions_cells_and_subcalls_work_past_fd_1024(high_fds):
    big_context = "z" * (client.POOL_MAX_CONTEXT_BYTES + 1)  # a zygote, not the pool
    with REPLSession("ctx", config=FAST, llm=lambda p: f"<{p}>") as s:
        assert s._sock is not None and s._sock.fileno() > FIRST_FREE_FD
        r = s.execute("print(context, llm_query('a'), llm_query_batched(['b', 'c']))")
        assert r.error is None, r.error
        assert r.stdout == "ctx <a> ['<b>', '<c>']\n"
        # Frames bigger than a socket buffer make both sides wait for their peer: a 4 MB
        # cell in, a 4 MB output and a 4 MB sub-call answer back.
        r = s.execute("x = '" + "y" * (4 << 20) + "'\nprint(len(x))")
        assert r.error is None and r.stdout == f"{4 << 20}\n"
        r = s.execute("print('o' * (4 << 20))")
        assert r.error is None and len(r.stdout) == (4 << 20) + 1
        s.llm = lambda p: "a" * (4 << 20)
        r = s.execute("print(len(llm_query('big')))")
        assert r.error is None and r.stdout == f"{4 << 20}\n"
        # Workers that die, or close their channel and live on: the host learns which from
        # the status pipe, and kills the second.
        r = s.execute("import os\nos._exit(3)")
        assert r.restarted and "exited with code 3" in r.error, r.error
        r = s.execute("import os, time\nos.close(3)\ntime.sleep(30)")
        assert r.restarted and "it was killed" in r.error, r.error
        assert s.execute("print(1 + 1)").stdout == "2\n"
    with REPLSession(big_context, config=FAST, llm=ChildHandler()) as s:
        r = s.execute("print(len(context), rlm_query('four', context={'k': [1, 2]}))")
        assert r.error is None, r.error
        assert r.stdout == f"{len(big_context)} 4 {{'k': [1, 2]}}\n"
    assert _next_fd() > FIRST_FREE_FD


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.parametrize("context", ["pooled", "zygote"])
def test_a_start_that_fails_gives_back_its_uid_and_descriptors(monkeypatch, context):
    context = "q" * (client.POOL_MAX_CONTEXT_BYTES + 1) if context == "zygote" else "small " + os.urandom(4).hex()
    with REPLSession(context, config=FAST) as warm:  # the fork-server (and the zygote) are up
        warm.execute("pass")
    started: list[tuple[int, list[int]]] = []  # (uid, descriptors) of each worker handed over

    def recording(claim):
        def claim_and_record(self, config):
            reply, fds = claim(self, config)
            started.append((reply["uid"], list(fds)))
            return reply, fds
        return claim_and_record

    def fails(*args, **kwargs):
        raise ValueError("filedescriptor out of range in select()")

    monkeypatch.setattr(client.ForkServer, "claim", recording(client.ForkServer.claim))
    monkeypatch.setattr(client.Zygote, "spawn", recording(client.Zygote.spawn))
    monkeypatch.setattr(protocol, "recv_data", fails)  # the worker's `ready` frame, read once the uid is ours
    with pytest.raises(ValueError, match="out of range") as failed:
        REPLSession(context, config=FAST)
    # The failed session is still referenced (by the traceback): nothing is left for its close().
    assert failed.value.__traceback__ is not None
    assert len(started) == 1  # not retried: only a RuntimeError is
    uid, fds = started[0]
    server = client.get_server()
    assert uid - server.uid_base in server.free_slots, "the failed start kept its sandbox uid"
    assert all(_closed(fd) for fd in fds), "the failed start left its worker's descriptors open"
    monkeypatch.undo()
    with REPLSession(context, config=FAST) as s:
        assert s.execute("print(6 * 7)").stdout == "42\n"
