"""Requests longer than the model server's window (issue 14, defect 2): a 400 fails only its
own request, over-long sub-call prompts are refused before they are sent, child RLMs have a
token budget, and the server's window is sized from the RLM config."""

import asyncio
import json

from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.models.base import CallablePolicy
from rlm_train.records import ErrorKind, Outcome
from rlm_train.rlm import RLMConfig, run_episode
from rlm_train.rlm.window import server_window_tokens, sub_call_tokens
from rlm_train.rollouts import store
from rlm_train.rollouts.generate import GenerateConfig, run_generate
from rlm_train.testing.mock_server import MockOpenAIServer

WINDOW = 2000  # the mock server's window, in words

SUB_CALL_CELL = """try:
    reply = llm_query(context)
except Exception as exc:
    reply = 'ERR ' + str(exc)
print(reply[:300])"""


def block(code):
    return f"```repl\n{code}\n```"


def responder(messages, body):
    """Root turns: one sub-call over the whole context (too long for the window), then FINAL."""
    if not any(m["role"] == "system" for m in messages):
        return "a short answer"
    turn = sum(1 for m in messages if m["role"] == "assistant")
    return block(SUB_CALL_CELL) if turn == 0 else block("FINAL('done')")


def test_a_400_for_one_request_fails_only_that_request_and_the_run_goes_on(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 6)
    rows = [json.loads(line) for line in tasks.read_text().splitlines()]
    for row in rows:
        row["context"] = " ".join(f"w{i}" for i in range(3000))  # 3,000 words: over the window
    rows[2]["query"] = "q " * 2500  # this task's first root prompt is itself over the window
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with MockOpenAIServer(responder=responder, max_model_len=WINDOW) as server:
        summary = run_generate(GenerateConfig(
            tasks=str(tasks), out=str(tmp_path / "out"), policy="openai:mock-model", base_urls=[server.base_url],
            concurrency=3, progress=False, rlm=RLMConfig(max_iterations=3, root_max_tokens=64)))
        refusals = server.counts["error_400"]
    assert summary["records"] == 6 and refusals == 6  # 5 sub-calls and 1 root turn, each sent once
    records = {r["task_id"]: r for r in store.read_records(tmp_path / "out")}
    refused = records.pop("bench-2")
    assert refused["outcome"] == Outcome.ERROR and refused["error_kind"] == ErrorKind.REFUSED
    assert "maximum context length is 2000" in refused["error"]
    for record in records.values():
        # The sub-call's 400 reached the REPL as an exception; the episode went on and answered.
        assert record["outcome"] == Outcome.FINAL and record["final"] == "done"
        turn = record["turns"][0]
        call = turn["sub_calls"][0]
        assert "HTTP 400" in call["error"] and "maximum context length" in call["error"]
        assert turn["executions"][0]["stdout"].startswith("ERR ") and "HTTP 400" in turn["executions"][0]["stdout"]


def run(root, sub=None, **config):
    return asyncio.run(run_episode("q", "some context", root, sub, RLMConfig(**config)))


def test_a_sub_call_prompt_longer_than_sub_model_chars_is_refused_before_it_is_sent():
    sub = CallablePolicy(lambda messages, call: "never", name="sub")

    def root(messages, call):
        if call.turn == 0:
            return block("try:\n    llm_query_batched(['short', 'x' * 5000])\nexcept Exception as exc:\n    print(exc)")
        return block("FINAL('ok')")

    traj = run(CallablePolicy(root), sub, sub_model_chars=4000)
    out = traj["turns"][0]["executions"][0]["stdout"]
    assert "llm_query prompt 2 of 2 has 5,000 characters" in out and "rlm.sub_model_chars" in out
    assert "split the text" in out and sub.calls == 0  # nothing of the batch was sent
    assert traj["turns"][0]["sub_calls"][0]["error"].startswith("llm_query prompt 2 of 2")
    assert traj["outcome"] == Outcome.FINAL and traj["stats"]["subcalls_total"] == 0


def test_a_child_rlm_stops_at_its_token_budget_and_the_root_goes_on():
    def policy(messages, call):
        if call.depth == 0:
            if call.turn == 0:
                return block("r = rlm_query('look around', context=context)\nprint(r)")
            return block("FINAL('root done')")
        return block("print(context * 50)")  # the child never answers: each turn costs more tokens

    traj = run(CallablePolicy(policy), max_depth=1, child_max_tokens=1500, max_iterations=20)
    assert traj["outcome"] == Outcome.FINAL and traj["final"] == "root done"
    child = traj["turns"][0]["sub_calls"][0]["child"]
    assert child["outcome"] == Outcome.BUDGET and "child RLM token budget of 1500" in child["error"]
    assert len(child["turns"]) < 20
    assert "the child RLM gave no answer: budget_exhausted" in traj["turns"][0]["executions"][0]["stdout"]
    # What the child spent counts against the whole tree too.
    assert traj["stats"]["tokens_total"] > 1500


def test_the_server_window_is_sized_from_the_config():
    small = RLMConfig(sub_model_chars=3000, sub_max_tokens=100, max_iterations=2, root_max_tokens=64)
    big = RLMConfig(sub_model_chars=300_000)
    assert sub_call_tokens(big) >= 100_000 and server_window_tokens(big) >= sub_call_tokens(big)
    assert server_window_tokens(small) % 256 == 0 and server_window_tokens(small) < server_window_tokens(RLMConfig())
    # Every sub-call the loop lets through fits the window it asks for.
    assert 3000 / 3.0 + 100 <= server_window_tokens(small)


def test_the_grpo_batching_generator_is_not_made_fatal_by_one_refused_request():
    from rlm_train.models.base import PolicyError, RequestRefused, SamplingParams
    from rlm_train.train.grpo_backends import BatchingGenerator, GenOutput

    class WindowedServer:
        """Like TRL's vLLM client against a server with a 10-token window."""

        max_inflight = 4

        def __init__(self):
            self.batches = []

        def generate_batch(self, prompts, sampling):
            self.batches.append(len(prompts))
            if any(len(p) > 10 for p in prompts):
                raise Exception("Request failed: 400, {\"error\": \"maximum context length is 10 tokens\"}")
            if any(p == [666] for p in prompts):
                raise Exception("Request failed: 500, server crashed")
            return [GenOutput([t + 1 for t in p]) for p in prompts]

    async def go(generator, prompts):
        return await asyncio.gather(*(generator.generate(p, SamplingParams(max_tokens=4)) for p in prompts),
                                    return_exceptions=True)

    server = WindowedServer()
    generator = BatchingGenerator(server, wait_s=0.01)
    outs = asyncio.run(go(generator, [[1, 2], list(range(20)), [3]]))
    assert [o.ids for o in (outs[0], outs[2])] == [[2, 3], [4]]
    assert isinstance(outs[1], RequestRefused) and "maximum context length" in str(outs[1])
    assert generator.fatal is None and server.batches[0] == 3  # one batch, then each request alone
    assert asyncio.run(go(generator, [[5]]))[0].ids == [6]  # still usable
    # A broken backend (not a refusal) still stops the rollout.
    broken = asyncio.run(go(generator, [[666]]))[0]
    assert isinstance(broken, PolicyError) and generator.fatal is not None
    again = asyncio.run(go(generator, [[1]]))[0]
    assert isinstance(again, PolicyError) and "generation backend failed" in str(again)
