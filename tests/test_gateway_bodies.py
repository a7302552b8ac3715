"""Request bodies at the RLM gateway under hostile clients (issue 24): a real uvicorn server on
127.0.0.1 in front of the local mock server (rlm_train/bench/scenario.py plays the model),
clients on raw sockets from several loopback addresses (127.0.0.2-5: one client address each).

Bodies that trickle in hold no admission place; the reading budget, per client address and
gateway-wide: who is refused before a byte of the body is read (429, 503), who gives room to
whom (a body behind the pace of its deadline: 408); a body's JSON items counted before it is
decoded."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the gateway needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the gateway needs fastapi and uvicorn")

from test_gateway_hostile import LOG, connect, health_latency, refusals, reply, request
from test_serve_gateway import MODEL, chat_call, context_for, gateway, get, metric, post, rlm_call

from rlm_train.bench.scenario import scenario_responder
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway import create_app
from rlm_train.testing.mock_server import MockOpenAIServer


@pytest.fixture(scope="module")
def upstream():
    with MockOpenAIServer(responder=scenario_responder, model=MODEL) as srv:
        yield srv


def post_head(path: str, length: int) -> bytes:
    """A POST's request line and headers, announcing a body of `length` bytes (its answer closes the connection)."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_bodies_that_trickle_in_hold_no_admission_place(upstream, caplog):
    """More bodies trickling in than the gateway has admission places (running + queued): honest
    requests through both endpoints, as many at once as there are places, are all answered, and
    a trickling body is answered too once it is all in."""
    caplog.set_level("WARNING", logger=LOG)
    with gateway(upstream, max_concurrent=2, max_queue=2) as gw:
        bodies = [json.dumps({"query": "What is the answer?", "context": context_for(50 + i)}).encode()
                  if i % 2 == 0 else json.dumps({"model": MODEL, "messages": [{"role": "user", "content": context_for(
                      50 + i) + "\n\nWhat is the answer?"}]}).encode() for i in range(12)]
        paths = ["/v1/rlm" if i % 2 == 0 else "/v1/chat/completions" for i in range(12)]
        slow = [connect(gw.port, post_head(path, len(body)) + body[:1]) for path, body in zip(paths, bodies)]
        sent = [1] * len(slow)
        stop = threading.Event()

        def trickle() -> None:  # a byte a body every 0.2 s, never the last one
            while not stop.wait(0.2):
                for i, sock in enumerate(slow):
                    if sent[i] < len(bodies[i]) - 1:
                        sock.sendall(bodies[i][sent[i]:sent[i] + 1])
                        sent[i] += 1

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            time.sleep(0.5)
            with ThreadPoolExecutor(4) as pool:  # max_concurrent + max_queue at once
                honest = list(pool.map(lambda i: (rlm_call if i % 2 else chat_call)(gw, i), range(4)))
            assert [status for status, _, _ in honest] == [200] * 4, [body for _, body, _ in honest]
            assert [b["answer"] for _, b, _ in honest[1::2]] == ["key1", "key3"]
            assert [b["choices"][0]["message"]["content"] for _, b, _ in honest[::2]] == ["key0", "key2"]
            health = json.loads(get(f"{gw.url}/health")[1])
            assert (health["running"], health["queued"]) == (0, 0)
            for sock in slow:
                assert reply(sock, 0.01) == (None, {}, False)  # still trickling: neither answered nor cut
        finally:
            stop.set()
            thread.join(10)
        text = get(f"{gw.url}/metrics")[1]
        assert metric(text, "rlm_gateway_reading_bytes") == sum(len(b) for b in bodies)  # all 12 still reading
        slow[0].sendall(bodies[0][sent[0]:])  # the rest at once: answered like any other
        status, body, closed = reply(slow[0], 10)
        assert status == 200 and body["answer"] == "key50", body
        for sock in slow:
            sock.close()
    assert not refusals(caplog)


SOURCE_A, SOURCE_B, SOURCE_C, SOURCE_D = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


def test_reading_budget_per_address_and_gateway_wide(upstream, caplog):
    """Bodies of 4 KiB against a reading budget of 8 KiB per address and 16 KiB in all, with a
    600 s body deadline (a 4 KiB body keeps its pace with 7 bytes a second). A body that does not
    fit is refused before a byte of it is read (its client sent the headers only): 429 at the
    address's cap, 503 at the gateway's; a body behind its pace gives its room to a new one
    (408), its own address's first; a body keeping its pace keeps its room."""
    caplog.set_level("WARNING", logger=LOG)
    size = 4096
    with gateway(upstream, max_body_bytes=size, max_client_reading_bytes=2 * size, max_reading_bytes=4 * size,
                 body_timeout_s=600) as gw:
        def reading(expected: int) -> None:
            deadline = time.monotonic() + 5
            while metric(get(f"{gw.url}/metrics")[1], "rlm_gateway_reading_bytes") != expected:
                assert time.monotonic() < deadline, f"reading bytes never got to {expected}"
                time.sleep(0.02)

        def keeping_pace(source: str) -> socket.socket:  # 3 KiB of 4 in: on pace for 450 s
            return connect(gw.port, post_head("/v1/rlm", size) + b'{"query": "' + b"x" * 3061, source)

        def behind(source: str) -> socket.socket:  # one byte: behind its pace within 0.15 s
            return connect(gw.port, post_head("/v1/rlm", size) + b"{", source)

        def honest(source: str, i: int) -> tuple[int, dict, int]:
            payload = json.dumps({"query": "What is the answer?", "context": context_for(i)}).encode()
            return request(gw.port, "POST", "/v1/rlm", payload, source=source)

        # At its address's cap, with nothing behind: 429, sent before the body (none follows).
        a_pace = [keeping_pace(SOURCE_A), keeping_pace(SOURCE_A)]
        b_behind = behind(SOURCE_B)  # behind its pace, but not A's to take: A is at its own cap
        reading(3 * size)
        time.sleep(0.5)
        refused_a = connect(gw.port, post_head("/v1/rlm", 1600), SOURCE_A)
        status, body, closed = reply(refused_a, 3)
        assert (status, closed) == (429, True), body
        assert body["error"]["message"] == (
            "this client address is sending 2 request bodies (8,192 bytes) at once; this one's 1,600 more would "
            "pass the gateway's limit of 8,192 per address (gateway.max_client_reading_bytes); retry after 2 s")
        assert reply(b_behind, 0.01) == (None, {}, False)
        status, body, _ = honest(SOURCE_B, 1)  # another address is served meanwhile
        assert status == 200 and body["answer"] == "key1"
        b_behind.close()

        # The address's own body behind its pace gives its room; the one keeping pace keeps it.
        a_pace.pop().close()
        reading(size)
        a_behind = behind(SOURCE_A)
        time.sleep(0.5)
        status, body, _ = honest(SOURCE_A, 2)
        assert status == 200 and body["answer"] == "key2"
        status, body, closed = reply(a_behind, 3)
        assert (status, closed) == (408, True)
        assert body["error"]["message"].startswith("the request's body arrived too slowly (1 of 4,096 bytes in ")
        assert reply(a_pace[0], 0.01) == (None, {}, False)

        # At the gateway's cap, with nothing behind: 503 before the body.
        b_pace = [keeping_pace(SOURCE_B), keeping_pace(SOURCE_B)]
        c_pace = keeping_pace(SOURCE_C)
        reading(4 * size)
        refused_d = connect(gw.port, post_head("/v1/rlm", 1600), SOURCE_D)
        status, body, closed = reply(refused_d, 3)
        assert (status, closed) == (503, True), body
        assert body["error"]["message"] == (
            "the gateway is reading 16,384 bytes of request bodies at once; this one's 1,600 more would pass its "
            "limit of 16,384 (gateway.max_reading_bytes); retry after 2 s")
        # Another address's body behind its pace gives its room.
        c_pace.close()
        reading(3 * size)
        c_behind = behind(SOURCE_C)
        time.sleep(0.5)
        status, body, _ = honest(SOURCE_D, 3)
        assert status == 200 and body["answer"] == "key3"
        assert reply(c_behind, 3)[0] == 408
        for sock in [*a_pace, *b_pace]:
            assert reply(sock, 0.01) == (None, {}, False)
            sock.close()
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)  # no Content-Length: max_body_bytes
        payload = json.dumps({"query": "What is the answer?", "context": context_for(4)}).encode()
        conn.request("POST", "/v1/rlm", body=iter([payload[:100], payload[100:]]), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        assert json.loads(conn.getresponse().read())["answer"] == "key4"
        conn.close()
        reading(0)
        text = get(f"{gw.url}/metrics")[1]
        assert metric(text, "rlm_gateway_reading_bytes_max") == 4 * size
        assert [metric(text, f'rlm_gateway_rejected_total{{reason="{reason}"}}')
                for reason in ("client_reading_full", "reading_full", "slow_body")] == [1, 1, 2]
    lines = refusals(caplog)
    for sock, source, status in [(refused_a, SOURCE_A, 429), (refused_d, SOURCE_D, 503), (a_behind, SOURCE_A, 408),
                                 (c_behind, SOURCE_C, 408)]:
        port = sock.getsockname()[1]
        assert len([line for line in lines if f"{source}:{port} POST /v1/rlm: {status} " in line]) == 1, lines
    assert len(lines) == 4, lines


def test_reading_budget_settings_and_address_keys(upstream):
    from rlm_train.errors import UserError
    from rlm_train.serve.gateway_body import address_key

    # One IPv6 host holds a whole /64: its addresses share one room; IPv4-mapped ones are IPv4.
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert (address_key("::ffff:10.0.0.1"), address_key("10.0.0.1")) == ("10.0.0.1", "10.0.0.1")
    base = {"base_urls": [upstream.base_url], "models": [MODEL]}
    for fields in ({"max_body_bytes": 2 << 20, "max_client_reading_bytes": 1 << 20},
                   {"max_client_reading_bytes": 512 << 20}):
        with pytest.raises(UserError, match=r"^gateway.max_body_bytes=.* <= gateway.max_client_reading_bytes="
                                            r".* <= gateway.max_reading_bytes=.* must hold"):
            create_app(GatewayConfig(**base, **fields))


def test_bodies_counted_before_decoded(upstream):
    import psutil

    hostile = b'{"query": "q", "context": [' + b"{}," * 3_000_000 + b"{}]}"  # 9 MB, 3 M objects
    with gateway(upstream, max_body_bytes=32 * 1024 * 1024) as gw, health_latency(gw.url) as latency:
        rss = psutil.Process().memory_info().rss
        started = time.monotonic()
        for _ in range(2):
            status, body, _ = post(f"{gw.url}/v1/rlm", None, raw=hostile)
            assert status == 413 and "more than 1,000,000 JSON items" in body["error"]["message"], body
        took = (time.monotonic() - started) / 2
        grew_mb = (psutil.Process().memory_info().rss - rss) / 2**20
    print(f"bodies: 9 MB body of 3 M items refused in {took * 1000:.0f} ms; RSS +{grew_mb:.0f} MB; "
          f"/health max {max(latency) * 1000:.0f} ms")
    assert max(latency) < 0.5 and grew_mb < 100
    with gateway(upstream, max_body_items=100) as gw:  # the count looks outside strings only
        text = "x, [y], {z}, \\\", " * 300 + context_for(6)
        status, body, _ = post(f"{gw.url}/v1/rlm", {"query": "What is the answer?", "context": text})
        assert status == 200 and body["answer"] == "key6"
        status, body, _ = post(f"{gw.url}/v1/rlm", {"query": "q", "context": ["a"] * 100})
        assert status == 413 and "more than 100 JSON items" in body["error"]["message"]


def test_count_json_items():
    from rlm_train.serve.gateway_body import count_json_items

    # 1 + commas + openers outside strings: an empty container's opener counts one item too many.
    cases = {b'"a, [b] {c}"': 1, b"[1, 2, [3, {}]]": 7, b'{"k": "v, \\" ,", "l": [1, "\\\\", 2]}': 6,
             b'["\\\\\\"[,"]': 2, b"[" + b"0," * 999 + b"0]": 1001, b'["", "", "", ""]': 5}
    for text, items in cases.items():
        assert count_json_items(text, items) <= items, text
        assert count_json_items(text, items - 1) > items - 1, text
