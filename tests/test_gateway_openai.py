"""The RLM gateway as OpenAI clients see it (rlm_train/serve/gateway_chat.py), over real HTTP on
127.0.0.1 with the official `openai` client, in front of the local mock server (a mock LM):
which text is the question and which the context, `max_tokens` / `stop` on the answer,
unsupported parameters refused with 400 naming them, and one access line per request."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the gateway needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the gateway needs fastapi and uvicorn")
openai = pytest.importorskip("openai", reason="the official client is in the dev extra")

from rlm_train.bench.scenario import scenario_context, scenario_responder
from rlm_train.rlm import RLMConfig
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway import create_app
from rlm_train.serve.gateway_thread import GatewayThread
from rlm_train.testing.mock_server import MockOpenAIServer
from rlm_train.testing.tiny_models import build_tokenizer

MODEL = "mock-model"
LONG_ANSWER = "The answer is " + "very " * 40 + "long."


def long_answer_responder(messages, body):
    """Root turns answer LONG_ANSWER at once; sub-calls (no system prompt) a short reply."""
    if not any(m.get("role") == "system" for m in messages):
        return "a short reply"
    return f"```repl\nFINAL({LONG_ANSWER!r})\n```"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@contextlib.contextmanager
def gateway(responder, **overrides):
    with MockOpenAIServer(responder=responder, model=MODEL) as upstream:
        cfg = {"base_urls": [upstream.base_url], "models": [MODEL], "rlm": RLMConfig(max_iterations=4, max_wall_s=120),
               **overrides}
        with GatewayThread(create_app(GatewayConfig(**cfg)), "127.0.0.1", 0) as gw:
            yield gw, openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


def test_the_last_user_message_is_the_question_and_a_lone_message_is_both():
    document = ("Para one of the report.\n\n" + scenario_context("k42", "Filler sentence. ", 6000)
                + "\n\nThe report's last paragraph, which is not a question.")
    with gateway(scenario_responder) as (_, client):
        # "Summarize the following:\n\n<doc>" in one message: the whole message is the context, and the
        # question keeps its instruction (its last paragraph is not taken for the question).
        message = "Find the answer in the following:\n\n" + document
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": message}],
                                               extra_body={"rlm": {"include_trajectory": True}})
        assert reply.choices[0].message.content == "k42"
        trajectory = reply.model_extra["rlm"]["trajectory"]
        assert trajectory["query"].startswith("Find the answer in the following:")
        assert "is the variable `context`" in trajectory["query"]
        assert str(len(message)) in trajectory["turns"][0]["feedback"]  # the peek printed len(context)
        # The document as one message, the question as the next: the document is the context.
        reply = client.chat.completions.create(
            model=MODEL, extra_body={"rlm": {"include_trajectory": True}},
            messages=[{"role": "system", "content": "Answer with the key only."},
                      {"role": "user", "content": document}, {"role": "user", "content": "What is the answer?"}])
        assert reply.choices[0].message.content == "k42"
        trajectory = reply.model_extra["rlm"]["trajectory"]
        assert trajectory["query"] == "Answer with the key only.\n\nWhat is the answer?"
        assert str(len(document)) in trajectory["turns"][0]["feedback"]
        # A conversation that does not end with the question is refused, naming where.
        with pytest.raises(openai.BadRequestError, match=r"messages\[1\]: the conversation must end with the user"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a prefill"}])
        with pytest.raises(openai.BadRequestError, match=r"messages: no user message"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "s"}])


def test_max_tokens_and_stop_cut_the_answer(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    question = [{"role": "user", "content": "Say it."}]
    with gateway(long_answer_responder, tokenizer=str(tokenizer_dir)) as (_, client):
        whole = client.chat.completions.create(model=MODEL, messages=question)
        assert whole.choices[0].message.content == LONG_ANSWER and whole.choices[0].finish_reason == "stop"
        assert len(tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"]) > 8
        for limit in ({"max_tokens": 8}, {"max_completion_tokens": 8}, {"max_tokens": 100, "max_completion_tokens": 8}):
            reply = client.chat.completions.create(model=MODEL, messages=question, **limit)
            content = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "length", limit
            assert len(tokenizer(content, add_special_tokens=False)["input_ids"]) <= 8 and LONG_ANSWER.startswith(content)
            assert len(content) > 5
        stream = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, stream=True)
        chunks = [c for c in stream if c.choices]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == content and chunks[-1].choices[0].finish_reason == "length"
        reply = client.chat.completions.create(model=MODEL, messages=question, stop=["very", "long"])
        assert reply.choices[0].message.content == "The answer is " and reply.choices[0].finish_reason == "stop"
    with gateway(long_answer_responder) as (_, client):  # no tokenizer: refused, saying how
        with pytest.raises(openai.BadRequestError, match="max_tokens: this gateway has no tokenizer to count"):
            client.chat.completions.create(model=MODEL, messages=question, max_tokens=8)


@pytest.mark.parametrize("parameters, named", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     r"messages\[0\].content\[0\]"),
])
def test_unsupported_parameters_are_refused_with_400_naming_them(parameters, named, caplog):
    with gateway(scenario_responder) as (gw, client):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], **parameters}
        with pytest.raises(openai.BadRequestError, match=rf"{named}: ") as refused:
            client.chat.completions.create(**body)
        assert refused.value.status_code == 400
        # Sampling knobs that cannot change an answer are accepted (and not used).
        reply = client.chat.completions.create(model=MODEL, top_p=0.5, seed=1, user="u", presence_penalty=0.1,
                                               messages=[{"role": "user", "content": scenario_context("k1", "F. ", 900)}])
        assert reply.choices[0].message.content == "k1"
    assert not [r for r in caplog.records if "episode" in r.getMessage() and r.levelno >= logging.ERROR]


def test_one_access_line_per_request(caplog):
    caplog.set_level(logging.INFO, logger="rlm_train.serve.gateway.access")
    with gateway(scenario_responder) as (gw, client):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": scenario_context(
            "k5", "Filler. ", 2000)}])
        assert reply.choices[0].message.content == "k5"
        request = urllib.request.Request(f"{gw.url}/v1/rlm", data=json.dumps({"query": "q"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=30)
        with urllib.request.urlopen(f"{gw.url}/health", timeout=30) as resp:
            assert resp.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "rlm_train.serve.gateway.access"]
    assert len(lines) == 3, lines
    pattern = r"access 127\.0\.0\.1:\d+ {} {} {} \d+\.\d{{3}} s {} tokens"
    assert re.fullmatch(pattern.format("POST", "/v1/chat/completions", 200, r"\d+"), lines[0]), lines[0]
    assert int(lines[0].split()[-2]) == reply.usage.total_tokens > 0
    assert re.fullmatch(pattern.format("POST", "/v1/rlm", 422, "-"), lines[1]), lines[1]
    assert re.fullmatch(pattern.format("GET", "/health", 200, "-"), lines[2]), lines[2]
