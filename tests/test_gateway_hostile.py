"""The RLM gateway's HTTP layer under hostile clients (issue 24): a real uvicorn server on
127.0.0.1 in front of the local mock server (rlm_train/bench/scenario.py plays the model),
attacked through raw sockets and HTTP clients.

Slowloris (header and body deadlines, the connection cap under a small descriptor limit),
context_path limits before resolution, Host checking and the token made for a non-loopback
bind, error bodies without host paths, and one 4xx with one log line per refused request.
Request bodies (read before admission, under the reading budget; counted before decoded):
tests/test_gateway_bodies.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the gateway needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the gateway needs fastapi and uvicorn")

import test_serve_gateway
from test_serve_gateway import MODEL, context_for, gateway, get, metric, post

from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway import create_app
from rlm_train.serve.gateway_thread import GatewayThread

LOG = "rlm_train.serve.gateway"
upstream = test_serve_gateway.upstream  # the fixture: the mock model every test here talks to


def connect(port: int, data: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if data:
        sock.sendall(data)
    return sock


def reply(sock: socket.socket, timeout_s: float) -> tuple[int | None, dict, bool]:
    """(status, JSON body, closed by the server) of what arrives within timeout_s."""
    sock.settimeout(timeout_s)
    data, closed = b"", False
    try:
        while chunk := sock.recv(65536):
            data += chunk
        closed = True
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    return status, (json.loads(body) if body.startswith(b"{") else {}), closed


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout_s: float = 30, source: str = "127.0.0.1") -> tuple[int, dict, int]:
    """(status, JSON body, this client's port) of one request through http.client, from `source`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s, source_address=(source, 0))
    conn.connect()
    client_port = conn.sock.getsockname()[1]
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    return resp.status, (json.loads(text) if text.startswith(b"{") else {}), client_port


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.getMessage().startswith("refused ")]


@contextlib.contextmanager
def health_latency(url: str):
    """/health asked every 50 ms in a thread; yields the list of latencies (seconds)."""
    samples: list[float] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert get(f"{url}/health")[0] == 200
            samples.append(time.monotonic() - started)
            stop.wait(0.05)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(30)


HALF_HEADERS = b"POST /v1/rlm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
HALF_BODY = (b"POST /v1/rlm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"query\": ")

_SERVE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway import create_app
from rlm_train.serve.gateway_thread import GatewayThread
gw = GatewayThread(create_app(GatewayConfig(**json.loads(sys.argv[1]))), "127.0.0.1", 0).start()
print(gw.port, flush=True)
sys.stdin.read()
gw.stop()
"""


@pytest.mark.slow
def test_slowloris_cannot_starve_an_authorized_request(upstream):
    """A gateway process with 256 descriptors; 300 connections that never finish their headers.
    The authorized request is still answered, and the gateway holds at most its cap of them."""
    cfg = {"base_urls": [upstream.base_url], "models": [MODEL], "token_env": "RLM_TEST_SLOWLORIS_TOKEN",
           "rlm": {"max_iterations": 4, "max_wall_s": 60}}
    env = {**os.environ, "RLM_TEST_SLOWLORIS_TOKEN": "s3cret"}
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    hostile: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(300):
            hostile.append(connect(port, HALF_HEADERS))
        time.sleep(1)
        held = len(os.listdir(f"/proc/{proc.pid}/fd"))
        started = time.monotonic()
        status, body, _ = request(port, "POST", "/v1/rlm", json.dumps({"query": "What is the answer?",
                                                                      "context": context_for(4)}).encode(),
                                  {"Authorization": "Bearer s3cret"}, timeout_s=15)
        took = time.monotonic() - started
        assert status == 200 and body["answer"] == "key4", (status, body)
        health = []
        for _ in range(5):
            t = time.monotonic()
            assert request(port, "GET", "/health")[0] == 200
            health.append(time.monotonic() - t)
        print(f"slowloris: 300 half-open connections, the gateway holds {held} descriptors (limit 256); "
              f"authorized episode {took:.2f} s, /health max {max(health) * 1000:.0f} ms")
        assert held <= 200 and max(health) < 1.0
    finally:
        for sock in hostile:
            sock.close()
        proc.stdin.close()
        proc.wait(30)


def test_half_sent_headers_and_bodies_are_timed_out(upstream, caplog):
    caplog.set_level("WARNING", logger=LOG)
    with gateway(upstream, header_timeout_s=1, body_timeout_s=1) as gw, health_latency(gw.url) as latency:
        half_headers = [connect(gw.port, HALF_HEADERS) for _ in range(20)]
        half_bodies = [connect(gw.port, HALF_BODY) for _ in range(10)]
        silent = [connect(gw.port) for _ in range(5)]
        keep_alive = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        keep_alive.request("GET", "/health")
        assert keep_alive.getresponse().read()
        keep_alive.sock.sendall(b"GET /hea")  # the next request on a kept-alive connection, never finished
        status, body, _ = post(f"{gw.url}/v1/rlm", {"query": "What is the answer?", "context": context_for(2)})
        assert status == 200 and body["answer"] == "key2"  # an honest client meanwhile
        time.sleep(1.5)
        for sock in [*half_headers, keep_alive.sock]:
            status, body, closed = reply(sock, 3)
            assert (status, closed) == (408, True)
            assert body["error"]["message"] == "the request's headers did not arrive within 1 s"
        for sock in half_bodies:
            status, body, closed = reply(sock, 3)
            assert (status, closed) == (408, True)
            assert body["error"]["message"] == "the request's body did not arrive within 1 s of its headers"
        for sock in silent:  # nothing sent: closed without a word, as an idle keep-alive is
            assert reply(sock, 3) == (None, {}, True)
        health = json.loads(get(f"{gw.url}/health")[1])
        assert health["queued"] == 0 and health["running"] == 0  # the half-sent bodies gave their places back
        text = get(f"{gw.url}/metrics")[1]
        assert metric(text, 'rlm_gateway_rejected_total{reason="header_timeout"}') == 26
        assert metric(text, 'rlm_gateway_rejected_total{reason="body_timeout"}') == 10
    lines = refusals(caplog)
    for sock in half_headers:
        port = sock.getsockname()[1]
        assert [line for line in lines if f"127.0.0.1:{port} " in line] == [
            f"refused 127.0.0.1:{port} (before its request line): 408 the request's headers did not arrive within 1 s"]
    for sock in half_bodies:
        port = sock.getsockname()[1]
        assert [line for line in lines if f"127.0.0.1:{port} " in line] == [
            f"refused 127.0.0.1:{port} POST /v1/rlm: 408 the request's body did not arrive within 1 s of its headers"]
    assert not any(f":{sock.getsockname()[1]} " in line for sock in silent for line in lines)
    print(f"deadlines: /health max {max(latency) * 1000:.0f} ms over {len(latency)} samples while 36 connections stalled")
    assert max(latency) < 0.5


def test_connection_cap_evicts_the_connection_waiting_longest(upstream, caplog):
    caplog.set_level("WARNING", logger=LOG)
    with gateway(upstream, max_connections=20, header_timeout_s=30) as gw:
        socks = [connect(gw.port, HALF_HEADERS) for _ in range(60)]
        for sock in socks[:40]:
            status, body, closed = reply(sock, 3)
            assert (status, closed) == (503, True) and "connection limit" in body["error"]["message"]
        for sock in socks[40:]:
            assert reply(sock, 0.05) == (None, {}, False)  # still open: the 20 newest
        assert len(gw.server.server_state.connections) == 20
        status, body, _ = post(f"{gw.url}/v1/rlm", {"query": "What is the answer?", "context": context_for(3)})
        assert status == 200 and body["answer"] == "key3"
        assert reply(socks[40], 3)[0] == 503  # the honest request took the oldest waiting one's place
        for sock in socks:
            sock.close()
    assert sum("connection limit" in line for line in refusals(caplog)) == 41
    upstream.latency_s = 0.3
    try:  # every open connection is being answered: a new one is refused, not an answered one
        with gateway(upstream, max_connections=2, keepalive_s=0.1) as gw:
            streams = []
            for i in range(2):
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
                conn.request("POST", "/v1/rlm", body=json.dumps({"query": "q", "context": context_for(i), "stream": True}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                assert json.loads(resp.readline())["event"] == "queued"
                streams.append((conn, resp))
            status, body, closed = reply(connect(gw.port), 3)
            assert (status, closed) == (503, True) and "all being answered" in body["error"]["message"]
            for i, (conn, resp) in enumerate(streams):
                events = [json.loads(line) for line in resp.read().splitlines()]
                assert events[-1]["event"] == "result" and events[-1]["answer"] == f"key{i}"
                conn.close()
    finally:
        upstream.latency_s = 0.0


def test_context_path_limits_before_resolution_and_no_host_paths(upstream, tmp_path):
    allowed = tmp_path / "contexts"
    allowed.mkdir()
    (allowed / "doc.txt").write_text(context_for(5))
    (tmp_path / "secret.txt").write_text("secret")
    (allowed / "loop").symlink_to(allowed / "loop")
    with gateway(upstream, context_dirs=[str(allowed)], max_body_bytes=1024 * 1024) as gw, \
            health_latency(gw.url) as latency:
        url = f"{gw.url}/v1/rlm"
        started = time.monotonic()
        status, body, _ = post(url, {"query": "q", "context_path": "a/" * 234_500})  # 469 kB
        took = time.monotonic() - started
        assert (status, body["error"]["message"][:100]) == \
            (422, "context_path is 469,000 characters, over the gateway's limit of 1,024")
        status, body, _ = post(url, {"query": "q", "context_path": "./" * 40 + "doc.txt"})
        assert status == 422 and "41 components, over the gateway's limit of 32" in body["error"]["message"]
        for raw, expected in [("a" * 300, 422), ("loop/doc.txt", 422), ("loop", 422),
                              (str(allowed / "missing.txt"), 404), ("../secret.txt", 403),
                              (str(tmp_path / "secret.txt"), 403)]:
            status, body, _ = post(url, {"query": "q", "context_path": raw})
            assert status == expected, (raw[:40], body)
            assert str(tmp_path) not in json.dumps(body) and "/contexts" not in json.dumps(body), body
        status, body, _ = post(url, {"query": "What is the answer?", "context_path": "doc.txt"})
        assert status == 200 and body["answer"] == "key5"
    print(f"context_path: 469 kB path refused in {took * 1000:.0f} ms; /health max {max(latency) * 1000:.0f} ms")
    assert took < 1.0 and max(latency) < 0.5


def test_foreign_host_header_is_refused(upstream, tmp_path, caplog):
    caplog.set_level("WARNING", logger=LOG)
    (tmp_path / "doc.txt").write_text(context_for(7))
    body = json.dumps({"query": "What is the answer?", "context_path": "doc.txt"}).encode()
    with gateway(upstream, context_dirs=[str(tmp_path)]) as gw:
        status, reply_body, client_port = request(gw.port, "POST", "/v1/rlm", body, {"Host": f"rebound.example:{gw.port}"})
        assert status == 403 and "key7" not in json.dumps(reply_body)
        message = reply_body["error"]["message"]
        assert "'rebound.example:" in message and "gateway.allowed_hosts" in message
        assert request(gw.port, "GET", "/v1/models", headers={"Host": "rebound.example"})[0] == 403
        assert request(gw.port, "GET", "/health", headers={"Host": "node7.cluster.example"})[0] == 200  # probes
        for host in (f"localhost:{gw.port}", f"127.0.0.1:{gw.port}", f"[::1]:{gw.port}", socket.gethostname()):
            status, reply_body, _ = request(gw.port, "POST", "/v1/rlm", body, {"Host": host})
            assert status == 200 and reply_body["answer"] == "key7", host
    assert [line for line in refusals(caplog) if f":{client_port} " in line] == [
        f"refused 127.0.0.1:{client_port} POST /v1/rlm: 403 {message}"]
    with gateway(upstream, allowed_hosts=["gw.example.org", ".corp.example"]) as gw:
        for host, expected in [("gw.example.org", 200), ("a.b.corp.example:80", 200), ("corp.example.evil", 403),
                               ("example.org", 403)]:
            assert request(gw.port, "GET", "/v1/models", headers={"Host": host})[0] == expected, host


def test_token_made_when_bound_beyond_loopback(upstream):
    app = create_app(GatewayConfig(base_urls=[upstream.base_url], models=[MODEL]))
    with GatewayThread(app, "0.0.0.0", 0) as gw:
        status, body, _ = request(gw.port, "GET", "/v1/models")
        assert status == 401 and "unauthorized" in body["error"]["message"]
        token_file = gw.token_file
        assert token_file is not None and (token_file.stat().st_mode & 0o777) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 40
        assert request(gw.port, "GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert request(gw.port, "GET", "/health")[0] == 200
    assert not token_file.exists()
    with gateway(upstream) as gw:  # on loopback: no token unless --token-env
        assert gw.token_file is None and request(gw.port, "GET", "/v1/models")[0] == 200


def test_every_refusal_is_a_4xx_with_one_log_line(upstream, tmp_path, caplog):
    caplog.set_level("WARNING", logger=LOG)
    (tmp_path / "doc.txt").write_text("doc")
    with gateway(upstream, context_dirs=[str(tmp_path)]) as gw:
        rlm = []
        for raw in [b"{not json", b'{"query": "q", "context": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                    b'{"query": "q", "context_path": "\\ud800.txt"}', b'{"query": "q", "context": [1e999999]}',
                    b'{"query": "\xff"}', b'{"query": 5, "context": "c"}', json.dumps(["a list"]).encode(),
                    json.dumps({"query": "q", "context_path": "x" * 5000}).encode(),
                    json.dumps({"query": "q", "context_path": "doc.txt/" + "a" * 300}).encode(),
                    json.dumps({"query": "q", "context": "c" * 300_000}).encode()]:
            rlm.append(request(gw.port, "POST", "/v1/rlm", raw))
        chat = request(gw.port, "POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode())
        others = [request(gw.port, "GET", "/nope"), request(gw.port, "PUT", "/v1/rlm", b"{}")]
        malformed = [connect(gw.port, data) for data in (
            b"POST /v1/rlm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", b"GARBAGE\r\n\r\n",
            b"GET /health HTTP/1.1\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n")]
        raw_replies = [reply(sock, 3) for sock in malformed]
        for status, body, port in [*rlm, chat, *others]:
            assert 400 <= status < 500 and body["error"]["message"], (status, body)
            assert "\n" not in body["error"]["message"] and "/" + tmp_path.name not in body["error"]["message"]
        assert [status for status, _, _ in raw_replies] == [400] * 4
        text = get(f"{gw.url}/metrics")[1]
        assert 'status="500"' not in text
    lines = refusals(caplog)
    ports = [port for _, _, port in [*rlm, chat, *others]] + [sock.getsockname()[1] for sock in malformed]
    for port in ports:
        mine = [line for line in lines if f"127.0.0.1:{port} " in line]
        assert len(mine) == 1 and " 4" in mine[0], (port, mine)
    print(f"bad input: {len(ports)} refusals, statuses {sorted({s for s, _, _ in [*rlm, chat, *others]})}")


def test_internal_errors_name_no_host_path(upstream, monkeypatch):
    import rlm_train.serve.gateway as gateway_module

    async def broken(*args, **kwargs):
        raise OSError(f"cannot open {os.getcwd()}/secret/place.txt")

    monkeypatch.setattr(gateway_module, "run_episode", broken)
    with gateway(upstream) as gw:
        status, body, _ = post(f"{gw.url}/v1/rlm", {"query": "q", "context": "c"})
        assert status == 500 and body["error"]["message"] == "internal error (OSError); the gateway's log has the details"
