"""The gateway's call trees under hostile requests (issue 24): child RLMs take at most their
request's share of the gateway's sandboxes, a wait for one is bounded and reported, and a
streaming client that leaves stops its whole call tree (children, sub-calls, running cells),
whose sandboxes are closed only after their cells returned (REPLSession's contract).

Real gateway on 127.0.0.1 in front of the local mock server (a stand-in for the model): its
responder (rlm_train/testing/gateway_attacks.py) plays the hostile episodes a query names and
the benchmark scenario for the rest.
Sandboxes are counted by wrapping the real REPLSession (`SessionCensus`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the gateway needs fastapi and uvicorn")

import rlm_train.repl
from rlm_train.bench.scenario import scenario_context
from rlm_train.repl.session import REPLSession
from rlm_train.rlm import RLMConfig
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway import create_app
from rlm_train.serve.gateway_thread import GatewayThread
from rlm_train.testing.gateway_attacks import attack_responder
from rlm_train.testing.mock_server import MockOpenAIServer

MODEL = "mock-model"


class SessionCensus:
    """Every REPLSession the gateway opens (counted by its context's tag), and any close()
    made while that session's execute() still runs in another thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total_live = 0
        self.total_peak = 0
        self.opened = 0
        self.closed = 0
        self.close_during_execute = 0

    def session_class(self) -> type[REPLSession]:
        census = self

        class CountedSession(REPLSession):
            def __init__(self, context: Any = None, config: Any = None, llm: Any = None):
                self.tag = census.tag_of(context)
                self.executing = 0
                self.open = False
                super().__init__(context, config=config, llm=llm)
                self.open = True
                census.change(self.tag, +1)

            def execute(self, code: str) -> Any:
                self.executing += 1
                try:
                    return super().execute(code)
                finally:
                    self.executing -= 1

            def close(self) -> None:
                with census.lock:
                    census.close_during_execute += getattr(self, "executing", 0) > 0
                    was_open, self.open = getattr(self, "open", False), False
                super().close()
                if was_open:
                    census.change(self.tag, -1)

        return CountedSession

    @staticmethod
    def tag_of(context: Any) -> str:
        found = re.search(r"(?:FANOUT \d+|CHILD) (\w+)", context) if isinstance(context, str) else None
        return found.group(1) if found else "other"

    def change(self, tag: str, delta: int) -> None:
        with self.lock:
            self.live[tag] += delta
            self.peak[tag] = max(self.peak[tag], self.live[tag])
            self.total_live += delta
            self.total_peak = max(self.total_peak, self.total_live)
            self.opened += delta > 0
            self.closed += delta < 0


@pytest.fixture
def census(monkeypatch):
    counted = SessionCensus()
    monkeypatch.setattr(rlm_train.repl, "REPLSession", counted.session_class())
    return counted


@pytest.fixture(scope="module")
def upstream():
    with MockOpenAIServer(responder=attack_responder, model=MODEL) as srv:
        yield srv


@contextlib.contextmanager
def gateway(upstream, **overrides):
    cfg = {"base_urls": [upstream.base_url], "models": [MODEL], **overrides}
    with GatewayThread(create_app(GatewayConfig(**cfg)), "127.0.0.1", 0) as gw:
        yield gw


def post(gw, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    try:
        conn.request("POST", "/v1/rlm", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def gauge(gw, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def child_episodes(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [call["child"] for turn in record["turns"] for call in turn["sub_calls"] if "child" in call]


def test_child_rlms_hold_at_most_their_requests_share_of_sandboxes(upstream, census):
    """e13e08c: three requests fanning out 85 child RLMs each started a sandbox per child at
    once (one request held 86); the process ran out of its 256 and honest episodes failed."""
    with gateway(upstream) as gw:  # defaults: max_concurrent=8, max_sandboxes=64: a share of 8
        with ThreadPoolExecutor(8) as pool:
            hostile = [pool.submit(post, gw, {"query": f"FANOUT 85 h{i}", "context": f"FANOUT 85 h{i}",
                                              "include_trajectory": True}) for i in range(3)]
            time.sleep(0.3)
            honest = [pool.submit(post, gw, {"query": "What is the answer?",
                                             "context": scenario_context(f"key{i}", "Filler. ", 1600)})
                      for i in range(10)]
            honest_results = [f.result() for f in honest]
            hostile_results = [f.result() for f in hostile]
        assert [(s, b.get("answer")) for s, b in honest_results] == [(200, f"key{i}") for i in range(10)]
        waited = 0
        for status, body in hostile_results:
            assert status == 200 and body["outcome"] == "final", body
            children = child_episodes(body["trajectory"])
            assert len(children) == 85 and {c["final"] for c in children} == {"ok"}
            waited += sum(1 for c in children if c["stats"].get("sandbox_wait_s", 0) > 0)
        assert waited > 0  # children beyond the share waited for one, and the record says so
        for i in range(3):  # each request: its episode and its child RLMs in parallel, within its share
            assert 2 <= census.peak[f"h{i}"] <= 8, dict(census.peak)
        assert census.total_peak <= 64
        assert gauge(gw, "rlm_gateway_sandboxes_max") <= 64
        assert wait_until(lambda: gauge(gw, "rlm_gateway_sandboxes") == 0, 10)
    assert census.opened == census.closed and census.close_during_execute == 0


def test_a_child_that_gets_no_sandbox_is_reported_not_stuck(upstream, census):
    """A tree whose every sandbox waits on its own children (rlm_query two deep, one child at
    a time): the grandchild gives up after sandbox_wait_s and its parent reads why."""
    rlm = RLMConfig(max_depth=2, max_iterations=2, child_concurrency=1, sandbox_wait_s=0.5)
    with gateway(upstream, rlm=rlm) as gw:
        started = time.monotonic()
        status, body = post(gw, {"query": "NEST", "context": "c", "include_trajectory": True})
        assert time.monotonic() - started < 20
    assert status == 200 and body["outcome"] == "final", body
    child = child_episodes(body["trajectory"])[0]
    grandchild = child_episodes(child)[0]
    assert grandchild["outcome"] == "budget_exhausted"
    assert "no sandbox came free for 0.5s" in grandchild["error"] and "this call tree's" in grandchild["error"]
    assert grandchild["stats"]["sandbox_wait_s"] >= 0.45
    assert "no sandbox came free" in child["final"]  # what rlm_query returned to the child's cell


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_whole_call_tree(upstream, census, stream):
    """e13e08c: the left stream's child RLMs kept calling the model, and its root session was
    closed while its cell still ran in another thread (a left plain request ran to its end)."""
    pings = lambda: sum(1 for b in upstream.bodies if b["messages"][-1]["content"] == "ping")  # noqa: E731
    with gateway(upstream, keepalive_s=0.2) as gw:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("POST", "/v1/rlm", body=json.dumps({"query": "STRAND", "context": "c", "stream": stream}),
                     headers={"Content-Type": "application/json"})
        if stream:
            assert json.loads(conn.getresponse().readline())["event"] == "queued"
        before = pings()
        # The root waits on two children: one calling the model in a loop, one sleeping.
        assert wait_until(lambda: census.live["LOOP"] == 1 and census.live["SLEEP"] == 1 and pings() > before + 3, 20)
        conn.close()  # the client leaves
        assert wait_until(lambda: census.total_live == 0, 5), dict(census.live)
        left = pings()
        time.sleep(1.0)
        assert pings() == left  # nothing of the tree calls the model any more
        assert census.close_during_execute == 0 and census.opened == census.closed == 3
        assert gauge(gw, "rlm_gateway_episodes_running") == 0 and gauge(gw, "rlm_gateway_sandboxes") == 0
        status, body = post(gw, {"query": "What is the answer?", "context": scenario_context("k9", "Filler. ", 800)})
        assert status == 200 and body["answer"] == "k9"


def test_sandbox_slots_hand_over_in_order_count_the_parent_and_give_back_once():
    import asyncio

    from rlm_train.rlm.budget import SandboxSlots, SandboxWaitExceeded

    async def scenario() -> None:
        gateway_wide = SandboxSlots(3, name="the gateway's")
        tree = SandboxSlots(2, gateway_wide, "this tree's")
        first, second = await tree.take(1.0), await tree.take(1.0)
        assert (tree.held, gateway_wide.held) == (2, 2)
        order: list[str] = []

        async def wait(name: str):
            slot = await tree.take(5.0)
            order.append(name)
            return slot

        waiters = [asyncio.ensure_future(wait(n)) for n in ("a", "b")]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(first.give_back)  # from a REPL thread, as a closed session does
        await asyncio.to_thread(first.give_back)  # a second time: no effect
        a = await waiters[0]
        assert order == ["a"] and (tree.held, gateway_wide.held) == (2, 2) and a.waited_s > 0.04
        waiters[1].cancel()  # a waiter that leaves takes nothing
        second.give_back()
        a.give_back()
        await asyncio.sleep(0.05)
        assert (tree.held, gateway_wide.held) == (0, 0) and tree.peak == 2
        other = SandboxSlots(5, gateway_wide, "another tree's")
        held = [await other.take(1.0) for _ in range(3)]
        with pytest.raises(SandboxWaitExceeded, match="all 3 of the gateway's"):
            await other.take(0.1)  # the gateway-wide budget bounds every tree together
        assert (other.held, gateway_wide.held) == (3, 3)
        for slot in held:
            slot.give_back()
        await asyncio.sleep(0.05)
        assert gateway_wide.held == 0

    asyncio.run(scenario())
