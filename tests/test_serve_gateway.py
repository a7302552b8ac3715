"""The RLM gateway (rlm_train/serve/gateway.py) on uvicorn at 127.0.0.1:0, in front of the
local mock server playing RLM turns (rlm_train/bench/scenario.py): every episode peeks,
fans out 8 sub-calls, then answers the key its context states.

Concurrency through both endpoints, the official `openai` client as a real client, streams,
and the refusals: oversize 413, malformed 422, path escapes 403, no token 401, full 429
(with nothing lost)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the gateway needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the gateway needs fastapi and uvicorn")

from rlm_train.bench.scenario import scenario_context, scenario_responder
from rlm_train.rlm import RLMConfig
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway import create_app
from rlm_train.serve.gateway_chat import ChatMessage, split_chat
from rlm_train.serve.gateway_thread import GatewayThread
from rlm_train.testing.mock_server import MockOpenAIServer

MODEL = "mock-model"


@pytest.fixture(scope="module")
def upstream():
    with MockOpenAIServer(responder=scenario_responder, model=MODEL) as srv:
        yield srv


@contextlib.contextmanager
def gateway(upstream, **overrides):
    cfg = {"base_urls": [upstream.base_url], "models": [MODEL, "other-model"],
           "rlm": RLMConfig(max_iterations=4, max_wall_s=120), "max_body_bytes": 256 * 1024, **overrides}
    with GatewayThread(create_app(GatewayConfig(**cfg)), "127.0.0.1", 0) as gw:
        yield gw


def post(url: str, body: object, headers: dict[str, str] | None = None, raw: bytes | None = None):
    """(status, parsed JSON body, headers) of a POST; error statuses are returned, not raised."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            text = resp.read()
            is_json = resp.headers.get("content-type", "").startswith("application/json")
            return resp.status, (json.loads(text) if is_json else text), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def get(url: str, headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def context_for(i: int) -> str:
    return scenario_context(f"key{i}", f"Filler sentence number {i}. ", 1600)


def rlm_call(gw, i: int, **extra):
    return post(f"{gw.url}/v1/rlm", {"query": "What is the answer?", "context": context_for(i), **extra})


def chat_call(gw, i: int):
    body = {"model": MODEL, "messages": [{"role": "user", "content": context_for(i) + "\n\nWhat is the answer?"}]}
    return post(f"{gw.url}/v1/chat/completions", body)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_32_concurrent_requests_through_both_endpoints(upstream):
    upstream.latency_s = 0.1  # episodes long enough (4 model latencies) to overlap
    with gateway(upstream, max_concurrent=32, max_queue=32) as gw:
        with ThreadPoolExecutor(32) as pool:
            rlm = [pool.submit(rlm_call, gw, i) for i in range(16)]
            chat = [pool.submit(chat_call, gw, 100 + i) for i in range(16)]
            rlm_results = [f.result() for f in rlm]
            chat_results = [f.result() for f in chat]
        for i, (status, body, _) in enumerate(rlm_results):
            assert status == 200, body
            assert body["answer"] == f"key{i}" and body["outcome"] == "final", body
            assert body["usage"]["turns"] == 3 and body["usage"]["sub_calls"] == 8
            assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0
            traj = body["trajectory"]
            assert traj["schema"] == "rlm-train/trajectory/v1" and len(traj["turns"]) == 3
            assert traj["policy"] == f"openai:{MODEL}"
        for i, (status, body, _) in enumerate(chat_results):
            assert status == 200, body
            assert body["object"] == "chat.completion" and body["model"] == MODEL
            assert body["choices"][0]["message"] == {"role": "assistant", "content": f"key{100 + i}"}
            assert body["choices"][0]["finish_reason"] == "stop"
            assert body["rlm"]["outcome"] == "final" and body["rlm"]["turns"] == 3
            assert body["usage"]["prompt_tokens"] > 0
        status, text = get(f"{gw.url}/metrics")
        assert status == 200
        assert metric(text, 'rlm_gateway_episodes_total{outcome="final"}') == 32
        assert metric(text, 'rlm_gateway_requests_total{endpoint="/v1/rlm",status="200"}') == 16
        assert metric(text, 'rlm_gateway_requests_total{endpoint="/v1/chat/completions",status="200"}') == 16
        assert metric(text, "rlm_gateway_sub_calls_total") == 32 * 8
        assert metric(text, "rlm_gateway_episodes_running") == 0 and metric(text, "rlm_gateway_episodes_queued") == 0
        assert metric(text, "rlm_gateway_episodes_running_max") >= 24  # they did run side by side
    upstream.latency_s = 0.0


def test_the_official_openai_client_uses_the_gateway(upstream):
    openai = pytest.importorskip("openai")
    with gateway(upstream) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL, "other-model"]
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "Answer with the key only."},
                                   {"role": "user", "content": context_for(7) + "\n\nWhat is the answer?"}])
        assert reply.choices[0].message.content == "key7" and reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.total_tokens > 0
        assert reply.model_extra["rlm"]["outcome"] == "final"
        # The context given explicitly (extra_body), with a request budget above the server's cap.
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the answer?"}],
            extra_body={"rlm": {"context": context_for(8), "budget": {"max_iterations": 50}, "include_trajectory": True}})
        assert reply.choices[0].message.content == "key8"
        rlm = reply.model_extra["rlm"]
        assert rlm["budget"]["max_iterations"] == 4 and rlm["budget"]["capped"] == ["max_iterations"]
        assert "What is the answer?" in rlm["trajectory"]["messages"][1]["content"]
        # Streaming (SSE) through the client.
        stream = client.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": context_for(9) + "\n\nWhat is the answer?"}])
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "key9"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
        # Errors come back as the client's own exceptions, with the gateway's message.
        with pytest.raises(openai.NotFoundError, match="'nope' is not served here"):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_rlm_stream_sends_each_turn_then_the_result(upstream):
    with gateway(upstream) as gw:
        status, text, headers = post(f"{gw.url}/v1/rlm", {"query": "What is the answer?", "context": context_for(3),
                                                          "stream": True, "include_trajectory": False})
        assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in text.decode().splitlines()]
        kinds = [e["event"] for e in events if e["event"] != "ping"]
        assert kinds == ["queued", "start", "turn", "turn", "turn", "result"]
        assert [e["turn"]["index"] for e in events if e["event"] == "turn"] == [0, 1, 2]
        assert events[-1]["answer"] == "key3" and events[-1]["trajectory"] is None


def test_context_files_only_inside_allowed_directories(upstream, tmp_path):
    allowed = tmp_path / "contexts"
    allowed.mkdir()
    (allowed / "doc.txt").write_text(context_for(5))
    (tmp_path / "secret.txt").write_text(context_for(6))
    (allowed / "link.txt").symlink_to(tmp_path / "secret.txt")
    with gateway(upstream, context_dirs=[str(allowed)]) as gw:
        url = f"{gw.url}/v1/rlm"
        status, body, _ = post(url, {"query": "What is the answer?", "context_path": "doc.txt"})
        assert status == 200 and body["answer"] == "key5"
        status, body, _ = post(url, {"query": "What is the answer?", "context_path": str(allowed / "doc.txt")})
        assert status == 200 and body["answer"] == "key5"
        for escape in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "sub/../../secret.txt"):
            status, body, _ = post(url, {"query": "q", "context_path": escape})
            assert status == 403, (escape, body)
            assert "outside the directories" in body["error"]["message"] and body["error"]["code"] == 403
        status, body, _ = post(url, {"query": "q", "context_path": "missing.txt"})
        assert status == 404 and "no such file" in body["error"]["message"]
        # Through the chat endpoint as well.
        status, body, _ = post(f"{gw.url}/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "q"}], "rlm": {"context_path": "../secret.txt"}})
        assert status == 403, body
    with gateway(upstream) as gw:  # no --context-dir: files are off
        status, body, _ = post(f"{gw.url}/v1/rlm", {"query": "q", "context_path": "doc.txt"})
        assert status == 403 and "context files are off" in body["error"]["message"]


def test_oversize_and_malformed_requests(upstream):
    with gateway(upstream, max_query_chars=1000) as gw:
        url = f"{gw.url}/v1/rlm"
        status, body, _ = post(url, {"query": "q", "context": "x" * 300_000})
        assert status == 413 and "larger than the gateway's limit of 262,144 bytes" in body["error"]["message"]
        # A chunked body (no Content-Length) is counted while it is read.
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        chunk = json.dumps({"query": "q", "context": "y" * 300_000}).encode()
        conn.request("POST", "/v1/rlm", body=iter([chunk[:100_000], chunk[100_000:]]),
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "larger than" in json.loads(resp.read())["error"]["message"]
        conn.close()
        cases = [
            (b"{not json", "not valid JSON"),
            (json.dumps({"context": "c"}).encode(), "query: Field required"),
            (json.dumps({"query": "q"}).encode(), "exactly one of `context`"),
            (json.dumps({"query": "q", "context": "c", "context_path": "f"}).encode(), "exactly one of `context`"),
            (json.dumps({"query": "q", "context": "c", "budget": {"max_iterations": 0}}).encode(), "budget.max_iterations"),
            (json.dumps({"query": "q", "context": "c", "surprise": 1}).encode(), "surprise: Extra inputs"),
            (json.dumps({"query": "q" * 2000, "context": "c"}).encode(), "over the gateway's limit of 1,000"),
            (json.dumps(["a list"]).encode(), "invalid request"),
        ]
        for raw, message in cases:
            status, body, _ = post(url, None, raw=raw)
            assert status == 422 and message in body["error"]["message"], (raw[:60], body)
        chat = f"{gw.url}/v1/chat/completions"
        for payload, message in [
            ({"model": MODEL, "messages": []}, "messages"),
            ({"model": MODEL, "messages": [{"role": "wizard", "content": "s"}]}, "messages.0.role"),
            ({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "q"}]}, "max_tokens"),
        ]:
            status, body, _ = post(chat, payload)
            assert status == 422 and message in body["error"]["message"], (payload, body)
        status, text = get(f"{gw.url}/metrics")
        assert metric(text, 'rlm_gateway_rejected_total{reason="too_large"}') == 2
        assert metric(text, 'rlm_gateway_episodes_started_total') == 0


def test_bearer_token(upstream, monkeypatch):
    monkeypatch.setenv("RLM_TEST_GATEWAY_TOKEN", "s3cret")
    with gateway(upstream, token_env="RLM_TEST_GATEWAY_TOKEN") as gw:
        url = f"{gw.url}/v1/rlm"
        body = {"query": "What is the answer?", "context": context_for(1)}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, reply, response_headers = post(url, body, headers)
            assert status == 401 and "unauthorized" in reply["error"]["message"], headers
            assert response_headers["www-authenticate"] == "Bearer"
        # Refused before the body is read: a malformed body is still a 401.
        status, reply, _ = post(url, None, raw=b"{oops")
        assert status == 401
        assert get(f"{gw.url}/metrics")[0] == 401
        assert get(f"{gw.url}/health")[0] == 200  # health checks need no token
        status, reply, _ = post(url, body, {"Authorization": "Bearer s3cret"})
        assert status == 200 and reply["answer"] == "key1"
    monkeypatch.delenv("RLM_TEST_GATEWAY_TOKEN")
    from rlm_train.errors import UserError

    with pytest.raises(UserError, match="RLM_TEST_GATEWAY_TOKEN is not set"):
        create_app(GatewayConfig(base_urls=[upstream.base_url], models=[MODEL], token_env="RLM_TEST_GATEWAY_TOKEN"))


def test_full_gateway_answers_429_and_loses_nothing(upstream):
    upstream.latency_s = 0.25  # an episode takes ~1 s: 4 sequential model calls
    try:
        with gateway(upstream, max_concurrent=2, max_queue=2, retry_after_s=1) as gw:
            with ThreadPoolExecutor(10) as pool:
                results = list(pool.map(lambda i: rlm_call(gw, i), range(10)))
            ok = [i for i, (status, _, _) in enumerate(results) if status == 200]
            refused = [i for i, (status, _, _) in enumerate(results) if status == 429]
            assert len(ok) + len(refused) == 10 and len(ok) >= 4 and refused, [r[0] for r in results]
            for i in ok:
                assert results[i][1]["answer"] == f"key{i}"
            for i in refused:
                status, body, headers = results[i]
                assert headers["retry-after"] == "1" and "the gateway is full" in body["error"]["message"]
            status, text = get(f"{gw.url}/metrics")
            # Every admitted request ran to its answer; a refused one never started.
            assert metric(text, "rlm_gateway_episodes_started_total") == len(ok)
            assert metric(text, 'rlm_gateway_episodes_total{outcome="final"}') == len(ok)
            assert metric(text, 'rlm_gateway_rejected_total{reason="queue_full"}') == len(refused)
            # Retried, the refused ones are answered too.
            with ThreadPoolExecutor(4) as pool:
                retried = list(pool.map(lambda i: rlm_call(gw, i), refused[:4]))
            assert [(s, b["answer"]) for s, b, _ in retried] == [(200, f"key{i}") for i in refused[:4]]
    finally:
        upstream.latency_s = 0.0


def test_unknown_model_and_upstream_failure(upstream):
    with gateway(upstream) as gw:
        status, body, _ = rlm_call(gw, 1, model="gpt-99")
        assert status == 404 and "'gpt-99' is not served here; choose one of: mock-model, other-model" in body["error"]["message"]
    dead = MockOpenAIServer(model=MODEL).start()
    url = dead.base_url
    dead.close()
    from rlm_train.policies.spec import ClientOptions

    with GatewayThread(create_app(GatewayConfig(base_urls=[url], models=[MODEL], client=ClientOptions(max_retries=0),
                                                rlm=RLMConfig(max_iterations=2))), "127.0.0.1", 0) as gw:
        status, body, _ = rlm_call(gw, 1)  # the episode ran, and says how it ended
        assert status == 200 and body["outcome"] == "error" and body["error_kind"] == "model"
        status, body, _ = chat_call(gw, 1)  # a chat completion cannot carry it: 502
        assert status == 502 and "the upstream model failed" in body["error"]["message"]


def test_split_chat():
    """The last user message is the question; the messages before it the context; a lone message both."""
    def msgs(*pairs):
        return [ChatMessage(role=r, content=c) for r, c in pairs]

    # A document, then the question: never split at a blank line.
    doc = "Para one.\n\nPara two.\n\nThe last paragraph of the document."
    assert split_chat(msgs(("user", doc), ("user", "What is X?")), False) == ("What is X?", doc)
    assert split_chat(msgs(("system", "Be brief."), ("user", doc), ("user", "Q?")), False) == ("Be brief.\n\nQ?", doc)
    # One message: the whole of it is the context and the question.
    one = "Summarize the following:\n\n" + doc
    assert split_chat(msgs(("user", one)), False) == (one, one)
    long_doc = "Summarize the following:\n\n" + "z" * 9000 + "\n\nThe last paragraph."
    query, context = split_chat(msgs(("user", long_doc)), False)
    assert context == long_doc and query.startswith("Summarize the following:") and query.endswith("The last paragraph.")
    assert "the whole message (9,047 characters) is the variable `context`" in query and len(query) < 3300
    # A conversation: earlier turns labelled by role.
    assert split_chat(msgs(("user", "old"), ("assistant", "a"), ("user", "Q?")), False) == ("Q?", "user: old\n\nassistant: a")
    parts = [{"type": "text", "text": "Q part 1"}, {"type": "text", "text": "Q part 2"}]
    assert split_chat([ChatMessage(role="user", content=parts)], True) == ("Q part 1\n\nQ part 2", None)
    assert split_chat(msgs(("user", "old"), ("assistant", "a"), ("user", "DOC\n\nQ?")), True) == ("DOC\n\nQ?", None)


def test_health(upstream):
    with gateway(upstream) as gw:
        status, text = get(f"{gw.url}/health")
        assert status == 200 and json.loads(text) == {"status": "ok", "running": 0, "queued": 0,
                                                      "models": [MODEL, "other-model"]}
        assert os.environ.get("RLM_TRAIN_CACHE")  # conftest's fresh cache: nothing here touches the real one


def test_a_stream_whose_client_leaves_frees_its_slot(upstream):
    upstream.latency_s = 0.5
    try:
        with gateway(upstream, max_concurrent=1, max_queue=0, keepalive_s=0.1) as gw:
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
            conn.request("POST", "/v1/rlm", body=json.dumps({"query": "q", "context": context_for(1), "stream": True}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert json.loads(resp.readline())["event"] == "queued"
            assert rlm_call(gw, 2)[0] == 429  # the one slot is taken
            conn.close()  # the client leaves mid-episode
            deadline = time.monotonic() + 10
            while json.loads(get(f"{gw.url}/health")[1])["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert json.loads(get(f"{gw.url}/health")[1])["running"] == 0
            upstream.latency_s = 0.0
            status, body, _ = rlm_call(gw, 3)
            assert status == 200 and body["answer"] == "key3"
            text = get(f"{gw.url}/metrics")[1]  # the left episode was stopped, not run to its end
            assert metric(text, "rlm_gateway_episodes_started_total") == 2
            assert metric(text, 'rlm_gateway_episodes_total{outcome="final"}') == 1
    finally:
        upstream.latency_s = 0.0
