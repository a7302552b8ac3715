"""OpenAIPolicy against the real local mock server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request

import pytest

from rlm_train.models.base import CallContext, PolicyError, RequestRefused, Role, SamplingParams
from rlm_train.testing.mock_server import FailPlan, MockHTTPError, MockOpenAIServer
from rlm_train.models.openai_client import OpenAIPolicy

USER = [{"role": "user", "content": "what is two plus two"}]


def fast_policy(urls: list[str], **kw) -> OpenAIPolicy:
    # Tiny backoff so retry tests take milliseconds, not seconds.
    opts = dict(backoff_base_s=0.01, backoff_max_s=0.05, request_timeout_s=2, max_retries=5)
    opts.update(kw)
    return OpenAIPolicy("mock-model", urls, **opts)


async def call_and_close(policy: OpenAIPolicy, *args, **kw):
    try:
        return await policy.chat(*args, **kw)
    finally:
        await policy.aclose()


def dead_url() -> str:
    # A port nothing listens on: bind, read the port, close.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_success_captures_usage_and_maps_sampling():
    with MockOpenAIServer(responder=lambda msgs, body: "four is the answer") as srv:
        policy = fast_policy([srv.base_url], api_key="sk-test-key")
        sampling = SamplingParams(max_tokens=50, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=3)
        call = CallContext(role=Role.ROOT, depth=0, query="q", hints={"answer": "SECRET-HINT"})
        c = asyncio.run(call_and_close(policy, USER, sampling, call))

        assert c.text == "four is the answer"
        assert (c.prompt_tokens, c.completion_tokens) == (5, 4)
        assert c.finish_reason == "stop" and c.retries == 0 and c.latency_s > 0
        assert c.extra["server"] == srv.base_url
        body = srv.bodies[-1]
        assert body["model"] == "mock-model" and body["messages"] == USER
        assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
            50, 0.7, 0.9, ["\n\n"], 3)
        assert "SECRET-HINT" not in json.dumps(body) and "hints" not in body  # the call context never leaves the host
        assert srv.headers[-1]["authorization"] == "Bearer sk-test-key"
        assert "sk-test-key" not in repr(policy)
        assert policy.stats == {"requests": 1, "retries": 0, "failures": 0, "prompt_tokens": 5,
                                "completion_tokens": 4, "streamed_tokens": 8, "busy_timeouts": 0}
        assert body["stream"] is True  # streamed: a live server's tokens keep the request alive


def test_length_finish_reason_and_extra_body():
    with MockOpenAIServer(responder=lambda msgs, body: "one two three four five six") as srv:
        policy = fast_policy([srv.base_url], extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        c = asyncio.run(call_and_close(policy, USER, SamplingParams(max_tokens=2)))
        assert c.text == "one two" and c.finish_reason == "length" and c.completion_tokens == 2
        assert srv.bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}


def test_keep_alive_connections_are_reused():
    async def go(srv):
        policy = fast_policy([srv.base_url])
        for _ in range(5):
            await policy.chat(USER)
        await asyncio.gather(*(policy.chat(USER) for _ in range(3)))
        await policy.aclose()

    with MockOpenAIServer() as srv:
        asyncio.run(go(srv))
        # One connection for the 5 calls in a row, two more for the 3 at once.
        assert srv.requests == 8 and srv.connections == 3


def test_500s_then_success_counts_retries():
    with MockOpenAIServer(fail_plan=FailPlan(first_n=3)) as srv:
        policy = fast_policy([srv.base_url])
        c = asyncio.run(call_and_close(policy, USER))
        assert c.text.startswith("echo: what is two")
        assert c.retries == 3 and srv.requests == 4 and srv.counts["error_500"] == 3
        assert policy.stats["retries"] == 3 and policy.stats["failures"] == 0


def test_429_honors_retry_after():
    with MockOpenAIServer(fail_plan=FailPlan(first_n=1, first_status=429, retry_after_s=0.3)) as srv:
        policy = fast_policy([srv.base_url], backoff_max_s=1.0)
        t0 = time.perf_counter()
        c = asyncio.run(call_and_close(policy, USER))
        assert c.retries == 1 and time.perf_counter() - t0 >= 0.3


def test_server_down_then_up_on_same_port():
    srv = MockOpenAIServer().start()
    try:
        policy = fast_policy([srv.base_url], max_retries=40, backoff_base_s=0.02, backoff_max_s=0.1)

        async def scenario():
            first = await policy.chat(USER)  # leaves a keep-alive connection that the outage kills
            port = srv.port
            srv.stop()
            threading.Timer(0.5, srv.start).start()
            t0 = time.perf_counter()
            second = await policy.chat(USER)
            await policy.aclose()
            return first, second, port, time.perf_counter() - t0

        first, second, port, waited = asyncio.run(scenario())
        assert first.retries == 0 and second.text == first.text
        assert second.retries >= 1 and waited >= 0.4
        assert srv.port == port and srv.running
    finally:
        srv.close()


def test_a_busy_server_is_retried_only_with_a_longer_timeout_and_fewer_requests(caplog):
    # Chat requests hang, but /health answers: the server is up and busy, not down.
    with MockOpenAIServer(fail_plan=FailPlan(p=1.0, mode="hang")) as srv:
        policy = fast_policy([srv.base_url], request_timeout_s=0.2, max_retries=2, max_concurrency=8)
        t0 = time.perf_counter()
        with pytest.raises(PolicyError) as info:
            asyncio.run(call_and_close(policy, USER))
        elapsed = time.perf_counter() - t0
        assert 1.3 < elapsed < 3.0  # 0.2 + 0.4 + 0.8 s: each retry waited twice as long
        msg = str(info.value)
        assert "\n" not in msg and srv.base_url in msg and "3 attempts" in msg
        assert "busy, not down" in msg and "--request-timeout-s" in msg and "/health answered 200" in msg
        assert srv.counts["hang"] == 3
        assert policy.stats["failures"] == 1 and policy.stats["retries"] == 2 and policy.stats["busy_timeouts"] == 3
        assert policy._sem is not None and policy._sem.limit < 8  # fewer requests in flight after a busy timeout
    warnings = [r.getMessage() for r in caplog.records if "busy, not down" in r.getMessage()]
    assert len(warnings) == 1 and "retrying with a 0.4s timeout" in warnings[0]


def test_a_server_that_stops_answering_fails_fast_with_that_diagnosis():
    with MockOpenAIServer() as srv:
        policy = fast_policy([srv.base_url], request_timeout_s=0.3, max_retries=5, health_timeout_s=0.3)

        async def scenario():
            first = await policy.chat(USER)
            srv.freeze()  # like a stopped process: the port is open, nothing answers, /health neither
            t0 = time.perf_counter()
            with pytest.raises(PolicyError) as info:
                await policy.chat(USER)
            await policy.aclose()
            return first, time.perf_counter() - t0, str(info.value)

        first, elapsed, msg = asyncio.run(scenario())
        assert first.text.startswith("echo:")
        # One silent timeout and one silent health check, not 6 attempts x 0.3 s.
        assert elapsed < 1.2, elapsed
        assert "stopped answering" in msg and "/health gave no answer" in msg and "still running" in msg
        assert policy.stats["retries"] == 0 and policy.stats["failures"] == 1


def test_a_slow_but_steady_stream_outlives_the_timeout():
    # 40 tokens 50 ms apart: a 2 s answer, with a 0.5 s timeout between bytes.
    text = " ".join(f"w{i}" for i in range(40))
    with MockOpenAIServer(responder=lambda msgs, body: text, token_latency_s=0.05) as srv:
        policy = fast_policy([srv.base_url], request_timeout_s=0.5, max_retries=0)
        c = asyncio.run(call_and_close(policy, USER))
        assert c.text == text and c.completion_tokens == 40 and c.latency_s > 1.5
        assert policy.stats["retries"] == 0 and policy.stats["streamed_tokens"] >= 40
    # Without streaming the same answer is one silent wait longer than the timeout.
    with MockOpenAIServer(responder=lambda msgs, body: text, latency_s=1.0) as srv:
        policy = fast_policy([srv.base_url], request_timeout_s=0.5, max_retries=0, stream=False)
        with pytest.raises(PolicyError, match="busy, not down"):
            asyncio.run(call_and_close(policy, USER))


def test_garbage_bodies_are_retried_and_streams_parse_like_plain_answers():
    with MockOpenAIServer(fail_plan=FailPlan(first_n=0, p=1.0, mode="garbage")) as srv:
        policy = fast_policy([srv.base_url], max_retries=1)
        with pytest.raises(PolicyError, match="malformed response"):
            asyncio.run(call_and_close(policy, USER))
        assert srv.counts["garbage"] == 2 and policy.stats["retries"] == 1
    with MockOpenAIServer(responder=lambda msgs, body: "  two   spaces\nand a line ") as srv:
        streamed = asyncio.run(call_and_close(fast_policy([srv.base_url]), USER))
        plain = asyncio.run(call_and_close(fast_policy([srv.base_url], stream=False), USER))
        assert streamed.text == plain.text == "  two   spaces\nand a line "
        assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.finish_reason) == (
            plain.prompt_tokens, plain.completion_tokens, plain.finish_reason)


def test_nothing_listening_gives_clear_policy_error():
    url = dead_url()
    policy = fast_policy([url], max_retries=2)
    with pytest.raises(PolicyError) as info:
        asyncio.run(call_and_close(policy, USER))
    msg = str(info.value)
    assert url in msg and "Is the server running" in msg and "--base-url" in msg


def test_dropped_connections_are_retried():
    # Half the requests fail (500, hang past the timeout, or a cut connection); with 20
    # retries each the chance that a call runs out is ~1e-5.
    with MockOpenAIServer(fail_plan=FailPlan(p=0.5, mode="mix", hang_s=5, seed=7)) as srv:
        policy = fast_policy([srv.base_url], request_timeout_s=0.3, max_retries=20)

        async def many():
            out = await asyncio.gather(*[policy.chat([{"role": "user", "content": f"q{i}"}]) for i in range(30)])
            await policy.aclose()
            return out

        results = asyncio.run(many())
        assert [r.text for r in results] == [f"echo: q{i}" for i in range(30)]
        assert srv.counts["drop"] > 0 and srv.counts["error_500"] > 0
        assert sum(r.retries for r in results) == policy.stats["retries"] > 0


def test_4xx_fails_at_once_with_server_message():
    def too_long(msgs, body):
        raise MockHTTPError(400, "This model's maximum context length is 2048 tokens. You requested 9000.")

    with MockOpenAIServer(responder=too_long) as srv:
        policy = fast_policy([srv.base_url])
        with pytest.raises(RequestRefused, match="maximum context length is 2048") as info:
            asyncio.run(call_and_close(policy, USER))
        assert "HTTP 400" in str(info.value)
        assert srv.requests == 1 and policy.stats["retries"] == 0 and policy.stats["failures"] == 1


def test_two_servers_share_load():
    with MockOpenAIServer(latency_s=0.05) as a, MockOpenAIServer(latency_s=0.05) as b:
        policy = fast_policy([a.base_url, b.base_url])

        async def many():
            out = await asyncio.gather(*[policy.chat(USER) for _ in range(40)])
            await policy.aclose()
            return out

        results = asyncio.run(many())
        assert len(results) == 40 and a.requests + b.requests == 40
        assert a.requests >= 15 and b.requests >= 15
        assert {r.extra["server"] for r in results} == {a.base_url, b.base_url}


def test_one_dead_server_does_not_break_calls():
    with MockOpenAIServer() as live:
        dead = dead_url()
        policy = fast_policy([dead, live.base_url], max_retries=2, backoff_base_s=1.0, backoff_max_s=5.0)

        async def many():
            out = [await policy.chat(USER) for _ in range(10)]
            out += await asyncio.gather(*[policy.chat(USER) for _ in range(10)])
            await policy.aclose()
            return out

        t0 = time.perf_counter()
        results = asyncio.run(many())
        assert len(results) == 20 and live.requests == 20
        assert all(r.extra["server"] == live.base_url for r in results)
        # Failover to the live server is immediate, and the dead one is then avoided.
        assert policy.stats["retries"] <= 2 and time.perf_counter() - t0 < 1.0


def test_32_concurrent_calls_at_100ms_are_concurrent():
    with MockOpenAIServer(latency_s=0.1) as srv:
        policy = fast_policy([srv.base_url])

        async def burst():
            t0 = time.perf_counter()
            out = await asyncio.gather(*[policy.chat([{"role": "user", "content": f"n{i}"}]) for i in range(32)])
            wall = time.perf_counter() - t0
            await policy.aclose()
            return out, wall

        results, wall = asyncio.run(burst())
        assert [r.text for r in results] == [f"echo: n{i}" for i in range(32)]
        assert wall < 0.5 and srv.max_in_flight == 32


def test_concurrency_bound_is_respected():
    with MockOpenAIServer(latency_s=0.05) as srv:
        policy = fast_policy([srv.base_url], max_concurrency=4)

        async def many():
            await asyncio.gather(*[policy.chat(USER) for _ in range(16)])
            await policy.aclose()

        t0 = time.perf_counter()
        asyncio.run(many())
        assert srv.max_in_flight == 4 and time.perf_counter() - t0 >= 0.2  # 4 waves of 50 ms


def test_policy_survives_a_new_event_loop():
    with MockOpenAIServer() as srv:
        policy = fast_policy([srv.base_url])
        # aclose() ends a loop's connections; the next loop opens fresh ones.
        assert asyncio.run(call_and_close(policy, USER)).text == asyncio.run(call_and_close(policy, USER)).text
        assert policy.stats["requests"] == 2


def test_mock_server_info_endpoints():
    with MockOpenAIServer(model="tiny") as srv:
        with urllib.request.urlopen(srv.base_url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == "tiny"
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=5) as r:
            assert json.load(r) == {"status": "ok"}
        assert srv.requests == 0  # only chat requests count


def test_chunked_and_unframed_responses_and_server_closed_idle_connections():
    # Other servers and proxies frame responses differently; the stdlib server covers
    # chunked bodies, bodies that run to connection close, and closing idle keep-alives.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = json.dumps({"choices": [{"message": {"content": "framed"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.2  # closes idle keep-alive connections quickly, like uvicorn after 5 s

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            if self.path.startswith("/chunked"):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (answer[:10], answer[10:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
            else:  # no length, no chunking: the body ends when the connection does
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(answer)
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        policy = fast_policy([f"http://127.0.0.1:{port}/chunked/v1", f"http://127.0.0.1:{port}/plain/v1"])

        async def go():
            out = [await policy.chat(USER) for _ in range(4)]
            await asyncio.sleep(0.4)  # the server drops our idle keep-alive connection meanwhile
            out += [await policy.chat(USER) for _ in range(4)]
            await policy.aclose()
            return out

        results = asyncio.run(go())
        assert [r.text for r in results] == ["framed"] * 8
        assert {r.extra["server"].split("/")[3] for r in results} == {"chunked", "plain"}
        assert policy.stats["retries"] == 0  # a stale idle connection is not a server failure
    finally:
        server.shutdown()
        server.server_close()


def test_event_loop_without_uvloop_and_collector_settings_restored(monkeypatch):
    import gc
    import sys

    from rlm_train import eventloop

    async def call():
        with MockOpenAIServer(responder=lambda msgs, body: "fine") as srv:
            policy = fast_policy([srv.base_url])
            try:
                return type(asyncio.get_running_loop()).__module__, (await policy.chat(USER)).text
            finally:
                await policy.aclose()

    before = gc.get_threshold()
    assert eventloop.run(call())[1] == "fine"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now fails, as where no wheel exists
    module, text = eventloop.run(call())
    assert module.startswith("asyncio") and text == "fine"
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_http_module_parses_requests_and_writes_responses():
    # The one HTTP/1.1 module: the mock server parses requests and writes responses with it,
    # the client parses those responses with it.
    from rlm_train.models.http import format_response, parse_request, parse_response

    buf = bytearray(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                    b"GET /health HTTP/1.1\r\n\r\n")
    method, target, headers, body, used = parse_request(buf)
    assert (method, target, headers["host"], body) == ("POST", "/v1/chat/completions", "x", b"{}")
    del buf[:used]
    assert parse_request(buf)[:2] == ("GET", "/health")
    assert parse_request(bytearray(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")) is None  # body still coming
    with pytest.raises(ValueError):
        parse_request(bytearray(b"garbage\r\n\r\n"))
    response, keep, used = parse_response(bytearray(format_response(429, b"{}", {"Retry-After": "2"})), closed=False)
    assert (response.status, response.headers["retry-after"], response.body, keep) == (429, "2", b"{}", True)
    # A 100 Continue is skipped; a chunked body with an extension and a trailer is joined.
    chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" \
              b"2;x=y\r\nab\r\n1\r\nc\r\n0\r\nTrailer: t\r\n\r\n"
    response, keep, used = parse_response(bytearray(chunked), closed=False)
    assert (response.status, response.body, keep, used) == (200, b"abc", True, len(chunked))
    assert parse_response(bytearray(chunked[:-2]), closed=False) is None  # trailers not ended yet
    assert parse_response(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"), closed=False) is None
    with pytest.raises(ValueError):
        parse_response(bytearray(b"SMTP ready\r\n\r\n"), closed=False)


def test_mock_server_does_not_import_the_client():
    # Test servers live in rlm_train.testing and share only the HTTP module with the client.
    import subprocess
    import sys

    code = ("import sys, rlm_train.testing.mock_server; "
            "assert 'rlm_train.models.openai_client' not in sys.modules, 'mock server imports the client'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
