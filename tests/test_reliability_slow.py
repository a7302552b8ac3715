"""A slow server is not a dead one, seen from `generate`: a server that streams slowly but
steadily (each turn longer than the request timeout) finishes every episode, with progress
shown per turn and per token while it runs; one that stops answering stops the run fast,
saying so."""

import time

import pytest

from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
from rlm_train.errors import UserError
from rlm_train.records import Outcome
from rlm_train.rlm import RLMConfig
from rlm_train.rollouts import store
from rlm_train.rollouts.generate import GenerateConfig, run_generate
from rlm_train.testing.mock_server import MockOpenAIServer


def config(tmp_path, url, **kw):
    return GenerateConfig(tasks=str(tmp_path / "tasks.jsonl"), out=str(tmp_path / "out"), policy="openai:mock-model",
                          base_urls=[url], rlm=RLMConfig(max_iterations=4), **kw)


def test_a_slow_steady_server_finishes_every_episode_and_progress_shows_turns_and_tokens(tmp_path, capsys):
    write_scenario_tasks(tmp_path / "tasks.jsonl", 4)
    # Tokens 40 ms apart: a root turn of ~25 tokens takes ~1 s, over three times the 0.3 s timeout.
    with MockOpenAIServer(responder=scenario_responder, token_latency_s=0.04) as server:
        # stderr is no terminal here: progress is a plain line every progress_every_s.
        summary = run_generate(config(tmp_path, server.base_url, concurrency=4, progress=True, progress_every_s=0.2,
                                      client={"request_timeout_s": 0.3, "max_retries": 0}))
        slowest = max(r["latency_s"] for rec in store.read_records(tmp_path / "out") for r in rec["turns"])
    assert summary["records"] == 4 and summary["outcomes"] == {Outcome.FINAL: 4}
    assert summary["this_run"]["retries"] == 0 and slowest > 0.6
    err = capsys.readouterr().err
    # The bar moved with turns and tokens, not only with finished episodes.
    assert "turns=" in err and "tokens=" in err and "/s)" in err
    shown = [int(part.split("=")[1]) for part in err.replace("\r", " ").split() if part.startswith("turns=")]
    assert max(shown) >= 8 and any(0 < n < 8 for n in shown), shown


def test_a_server_that_stops_answering_stops_the_run_fast_with_the_right_hint(tmp_path):
    write_scenario_tasks(tmp_path / "tasks.jsonl", 30)
    with MockOpenAIServer(responder=scenario_responder, latency_s=0.02) as server:
        cfg = config(tmp_path, server.base_url, concurrency=4, progress=False, max_consecutive_failures=4,
                     client={"request_timeout_s": 0.5, "max_retries": 5})
        from rlm_train.models.openai_client import OpenAIPolicy

        policy = OpenAIPolicy("mock-model", [server.base_url], request_timeout_s=0.5, max_retries=5,
                              health_timeout_s=0.5)
        original = policy.chat

        async def chat(*args, **kwargs):
            if server.requests >= 20:
                server.freeze()  # mid-run: the port stays open, nothing answers, /health neither
            return await original(*args, **kwargs)

        policy.chat = chat  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(UserError) as info:
            run_generate(cfg, policy=policy)
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert "episodes in a row got no answer" in message and "stopped answering" in message
    assert "/health gave no answer" in message and "re-run the same command" in message
    # One silent timeout and one silent health check per request: seconds, not 6 attempts each.
    assert elapsed < 8, elapsed
    recorded = len(store.read_records(tmp_path / "out"))
    assert recorded < 30  # the unanswered episodes are not recorded: a re-run retries them
