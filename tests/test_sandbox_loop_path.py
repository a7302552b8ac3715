"""Cells run on the event loop (`REPLSession.execute_async`, the RLM loop's path): the
loop keeps turning whatever a worker sends, sub-calls are answered on it, and a cancelled
cell leaves nothing running. Every hostile cell of `sandbox_attack.attack` runs this way
too; these are the cases that need a loop of their own (a neighbour session on it, a
cancellation, an async sub-model handler)."""

from __future__ import annotations

import asyncio
import time

import pytest

from rlm_train.repl import REPLSession, SandboxConfig
from rlm_train.rlm.budget import SandboxSlots
from rlm_train.rlm.loop import RLMConfig, run_episode

from sandbox_attack import CFG, _session_processes, _uid_of


class _LoopWatch:
    """Ticks every 10 ms on the loop: the longest gap is how long the loop was blocked."""

    def __init__(self):
        self.gap, self.last = 0.0, time.monotonic()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.gap, self.last = max(self.gap, now - self.last), now

    def close(self) -> float:
        self.task.cancel()
        return max(self.gap, time.monotonic() - self.last)


def test_a_value_bomb_frame_neither_blocks_the_loop_nor_a_neighbour_session_on_it():
    """31 MB of `[],` under the 32 MB cap: counted off the loop and refused; a neighbour
    session's round trips on the same loop go on meanwhile."""
    cfg = SandboxConfig(timeout_s=20, memory_mb=512)
    n = ((31 << 20) - 40) // 3
    code = ("import os, socket, struct\n"
            f"p = b'{{\"op\": \"llm\", \"items\": [' + b'[],' * {n - 1} + b'[]]}}'\n"
            "socket.socket(fileno=os.dup(3)).sendall(struct.pack('<Q', len(p)) + p)\n"
            "import time\ntime.sleep(30)")

    async def go(s: REPLSession, other: REPLSession):
        await s.execute_async("keep = 1")
        worst, errors = 0.0, []
        watch = _LoopWatch()
        hostile = asyncio.ensure_future(s.execute_async(code))
        while not hostile.done():
            t = time.monotonic()
            r = await other.execute_async("x = 1")
            worst = max(worst, time.monotonic() - t)
            if r.error:
                errors.append(r.error)
            await asyncio.sleep(0.005)
        return await hostile, watch.close(), worst, errors

    with REPLSession("ctx", config=cfg, llm=lambda p: "ok") as s, REPLSession("other", config=cfg) as other:
        t0 = time.monotonic()
        r, gap, worst, errors = asyncio.run(go(s, other))
        assert time.monotonic() - t0 < 5
        assert gap < 0.5, f"the loop stalled for {gap:.2f}s"
        assert worst < 0.5 and not errors, (worst, errors)
        assert r.restarted and r.error_kind == "sandbox" and "more than 100,000 values" in r.error, r
        assert s.execute("print(40 + 2)").stdout == "42\n"


@pytest.mark.parametrize("code, kind, says", [
    # a header, then nothing: the cell clock ends it, the loop never waits on it
    ("import os, struct\nos.write(3, struct.pack('<Q', 100) + b'{')\nimport time\ntime.sleep(30)",
     "timeout", "TimeoutError"),
    # two frames in one write: the host takes one frame per read
    ("import os, struct\nf = b'{\"op\": \"done\"}'\nos.write(3, (struct.pack('<Q', len(f)) + f) * 2)\n"
     "import time\ntime.sleep(30)", "sandbox", "more than one frame"),
    # closes its channel and keeps running: killed after a short grace
    ("import os, time\nos.close(3)\ntime.sleep(30)", "sandbox", "WorkerDied"),
    # a frame over max_message_mb, refused from its header
    ("import os, struct\nos.write(3, struct.pack('<Q', 5 << 20))\nimport time\ntime.sleep(30)",
     "sandbox", "exceeds"),
])
def test_hostile_frames_on_the_loop_end_the_cell_without_blocking_it(code, kind, says):
    cfg = SandboxConfig(timeout_s=2, memory_mb=256, max_message_mb=4)

    async def go(s: REPLSession):
        watch = _LoopWatch()
        r = await s.execute_async(code)
        return r, watch.close()

    with REPLSession("ctx", config=cfg) as s:
        r, gap = asyncio.run(go(s))
        assert gap < 0.5, f"the loop stalled for {gap:.2f}s"
        assert r.restarted and r.error_kind == kind and says in r.error, r
        assert s.execute("print(40 + 2)").stdout == "42\n"


class _AsyncSubModel:
    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.prompts: list[str] = []

    async def llm_batch(self, prompts: list[str]) -> list[str]:
        self.loop = asyncio.get_running_loop()  # answered on the cell's own loop
        self.prompts += prompts
        await asyncio.sleep(0.05)
        return [p.upper() for p in prompts]

    async def rlm_batch(self, requests):
        return await self.llm_batch([p for p, _ in requests])


def test_sub_calls_are_answered_on_the_loop_and_off_the_cell_clock():
    sub = _AsyncSubModel()

    async def go(s: REPLSession):
        return await s.execute_async("print(llm_query('a'), llm_query_batched(['b', 'c']))"), asyncio.get_running_loop()

    with REPLSession("ctx", config=CFG, llm=sub) as s:
        r, loop = asyncio.run(go(s))
        assert r.error is None and r.stdout == "A ['B', 'C']\n", r
        assert sub.loop is loop and sub.prompts == ["a", "b", "c"]
        assert r.subcall_wait_s >= 0.1
        # a blocking caller cannot await an async handler: the cell says so, the session goes on
        r = s.execute("llm_query('a')")
        assert "execute_async" in r.error and not r.restarted, r
    with REPLSession("ctx", config=CFG, llm=lambda p: p + "!") as s:  # a blocking handler, in a thread
        assert asyncio.run(s.execute_async("print(llm_query('hi'))")).stdout == "hi!\n"


@pytest.mark.parametrize("where", ["running", "in a sub-call"])
def test_a_cancelled_cell_kills_its_worker_and_the_next_cell_starts_fresh(where):
    class Never:
        async def llm_batch(self, prompts):
            await asyncio.sleep(3600)

    code = "import time\ntime.sleep(30)" if where == "running" else "llm_query('x')"

    async def go(s: REPLSession):
        cell = asyncio.ensure_future(s.execute_async(code))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        cell.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cell
        return time.monotonic() - t0

    with REPLSession("ctx", config=CFG, llm=Never()) as s:
        s.execute("keep = 1")
        uid = _uid_of(s)
        took = asyncio.run(go(s))
        assert took < 1.0, took
        deadline = time.monotonic() + 5
        while _session_processes(uid) and time.monotonic() < deadline:  # SIGKILLed; reaped off the loop
            time.sleep(0.01)
        assert _session_processes(uid) == []
        r = s.execute("print('keep' in globals())")
        assert r.restarted and r.stdout == "False\n", r
        assert _session_processes(_uid_of(s)) == [s.pid]


def test_a_direct_policy_episode_starts_no_sandbox_and_a_code_block_starts_one():
    """A policy whose turns carry no code (`writes_code = False`, the direct baseline) gets
    no sandbox for a prose FINAL; the first code block it writes starts one after all."""
    from rlm_train.models.base import Completion

    class Prose:
        name = "prose"
        writes_code = False

        def __init__(self, replies):
            self.replies = list(replies)

        async def chat(self, messages, sampling=None, call=None):
            return Completion(text=self.replies.pop(0), prompt_tokens=1, completion_tokens=1)

    async def go(policy):
        slots = SandboxSlots(4, None, "test")
        traj = await run_episode("q", "ctx", policy, config=RLMConfig(max_iterations=3), sandboxes=slots)
        return traj, slots.peak

    answer = "it's \"42\"\nsee (a)"
    traj, peak = asyncio.run(go(Prose([f"FINAL({answer!r})"])))
    assert traj["final"] == answer and traj["outcome"] == "final" and peak == 0, traj
    assert traj["turns"][0]["executions"] == [] and "sandbox_wait_s" not in traj["stats"]
    traj, peak = asyncio.run(go(Prose(["```repl\nprint(len(context))\n```", "FINAL('3')"])))
    assert traj["final"] == "3" and peak == 1 and traj["turns"][0]["executions"][0]["stdout"] == "3\n", traj



def test_the_status_pipe_ends_a_wait_whose_channel_stays_open():
    """Without a pid namespace a process the worker forked may keep its end of the channel
    open after it died: the loop watches its parent's status pipe as well then."""
    import os
    import socket

    from rlm_train.repl import channel, protocol

    async def go(host: socket.socket, status_r: int):
        return await channel.recv_data(asyncio.get_running_loop(), host, status_r, max_bytes=1 << 20,
                                       deadline=time.monotonic() + 5)

    host, worker_end = socket.socketpair()  # worker_end stays open: a survivor holds it
    status_r, status_w = os.pipe()
    try:
        os.write(status_w, b"\0\0\0\0")  # the parent reports the worker's exit
        t0 = time.monotonic()
        with pytest.raises(protocol.PeerClosed):
            asyncio.run(go(host, status_r))
        assert time.monotonic() - t0 < 1
        # a frame sent before the death is still read first
        protocol.send_data(worker_end, {"op": "done"})
        assert asyncio.run(go(host, status_r)) == {"op": "done"}
    finally:
        host.close(), worker_end.close(), os.close(status_r), os.close(status_w)


def test_frames_larger_than_the_socket_buffer_go_both_ways_and_a_worker_that_stops_reading_times_out():
    big = "y" * (6 << 20)
    cfg = SandboxConfig(timeout_s=3, memory_mb=512, max_message_mb=16)
    code_in = f"x = '{'a' * (3 << 20)}'\nprint(len(x), len(llm_query('big')))"
    # asks, then never reads the answer: the host's send waits on the loop, bounded by the cell clock
    deaf = ("import os, struct\nf = b'{\"op\": \"llm\", \"items\": [\"big\"]}'\n"
            "os.write(3, struct.pack('<Q', len(f)) + f)\nimport time\ntime.sleep(30)")

    async def go(s: REPLSession, code: str):
        watch = _LoopWatch()
        r = await s.execute_async(code)
        return r, watch.close()

    with REPLSession("ctx", config=cfg, llm=lambda p: big) as s:
        r, gap = asyncio.run(go(s, code_in))
        assert r.error is None and r.stdout == f"{3 << 20} {6 << 20}\n" and gap < 0.5, (r.error, gap)
        t0 = time.monotonic()
        r, gap = asyncio.run(go(s, deaf))
        assert r.error_kind == "timeout" and r.restarted and time.monotonic() - t0 < 6 and gap < 0.5, (r, gap)
        assert s.execute("print(40 + 2)").stdout == "42\n"
