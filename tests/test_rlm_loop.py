"""The RLM loop with mock LMs (their answers are code) against the real sandbox."""

import asyncio
import time

import pytest

from rlm_train.models.base import CallablePolicy
from rlm_train.records import TRAJECTORY_SCHEMA, Outcome
from rlm_train.rlm import RLMConfig, run_episode


def block(code):
    return f"```repl\n{code}\n```"


def turns_policy(*turns):
    """A root policy that plays the given assistant turns in order (the last one repeats)."""

    def answer(messages, call):
        done = sum(1 for m in messages if m["role"] == "assistant")
        return turns[min(done, len(turns) - 1)]

    return CallablePolicy(answer, name="mock-root")


def run(query, context, policy, sub_policy=None, **config):
    return asyncio.run(run_episode(query, context, policy, sub_policy, RLMConfig(**config)))


def test_peek_then_final_records_a_complete_trajectory():
    policy = turns_policy(block("print(len(context))"), block("n = len(context)\nFINAL(n * 2)"))
    traj = run("How long?", "x" * 1234, policy)
    assert traj["schema"] == TRAJECTORY_SCHEMA
    assert traj["outcome"] == Outcome.FINAL and traj["final"] == "2468"
    assert traj["turns"][0]["executions"][0]["stdout"] == "1234\n"
    # The model saw its own output as the next user message.
    roles = [m["role"] for m in traj["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert "1234" in traj["messages"][3]["content"]
    assert traj["stats"]["turns"] == 2 and traj["stats"]["wall_s"] > 0


def test_depth_two_recursion_degrades_to_llm_query_at_the_limit():
    def root(messages, call):
        depth = call.depth
        return block(f"r = rlm_query('level {depth + 1}', context=context + '|d{depth + 1}')\nFINAL('d{depth}<' + r)")

    def leaf(messages, call):
        return f"leaf({messages[-1]['content'].splitlines()[0]})"

    traj = run("go deep", "ctx", CallablePolicy(root), CallablePolicy(leaf), max_depth=2)
    assert traj["outcome"] == Outcome.FINAL
    assert traj["final"] == "d0<d1<d2<leaf(level 3)"
    child = traj["turns"][0]["sub_calls"][0]
    assert child["kind"] == "rlm" and child["depth"] == 1
    grandchild = child["child"]["turns"][0]["sub_calls"][0]
    assert grandchild["kind"] == "rlm" and grandchild["depth"] == 2
    leaf_call = grandchild["child"]["turns"][0]["sub_calls"][0]
    assert leaf_call["kind"] == "llm" and leaf_call["depth"] == 3
    # The child at depth 2 really got its own REPL with the context it was handed.
    assert grandchild["child"]["messages"][1]["content"].startswith("Query: level 2")
    assert traj["stats"]["sub_calls"] == 3


def test_32_batched_subcalls_of_100ms_run_concurrently():
    policy = turns_policy(block("rs = llm_query_batched([f'q{i}' for i in range(32)])\nFINAL(len(set(rs)))"))
    sub = CallablePolicy(lambda m, h: "a:" + m[-1]["content"], latency_s=0.1)
    started = time.monotonic()
    traj = run("fan out", "c", policy, sub, subcall_concurrency=32)
    wall = time.monotonic() - started
    assert traj["final"] == "32" and sub.calls == 32
    assert wall < 1.0, f"32 x 100 ms sub-calls took {wall:.2f}s; they should overlap (serial is 3.2 s)"


def test_runaway_fanout_is_stopped_by_the_subcall_budget():
    policy = turns_policy(block("rs = llm_query_batched(['x'] * 5000)\nFINAL('should not get here')"))
    sub = CallablePolicy(lambda m, h: "ok")
    traj = run("fan out", "c", policy, sub, max_subcalls=100)
    assert traj["outcome"] == Outcome.BUDGET
    assert "sub-call budget of 100" in traj["error"]
    assert sub.calls == 0  # refused before a single call went out
    assert traj["final"] is None


def test_sequential_subcalls_stop_exactly_at_the_budget():
    policy = turns_policy(block("for i in range(50):\n    llm_query(str(i))\nFINAL('done')"))
    sub = CallablePolicy(lambda m, h: "ok")
    traj = run("loop", "c", policy, sub, max_subcalls=10)
    assert traj["outcome"] == Outcome.BUDGET and sub.calls == 10


def test_token_budget_across_the_tree():
    policy = turns_policy(block("print('x')"))
    traj = run("q", "c", policy, max_tokens=50, max_iterations=50)
    assert traj["outcome"] == Outcome.BUDGET and "token budget" in traj["error"]
    assert traj["stats"]["turns"] < 50


def test_syntax_error_is_fed_back_and_the_episode_goes_on():
    policy = turns_policy(block("def broken(:\n    pass"), block("FINAL('recovered')"))
    traj = run("q", "c", policy)
    first = traj["turns"][0]["executions"][0]
    assert "SyntaxError" in first["error"]
    assert "SyntaxError" in traj["messages"][3]["content"]
    assert traj["final"] == "recovered" and traj["outcome"] == Outcome.FINAL


def test_final_var_of_undefined_name_is_an_error_not_an_answer():
    policy = turns_policy(block("FINAL_VAR('missing')"), block("missing = 7\nFINAL_VAR('missing')"))
    traj = run("q", "c", policy)
    err = traj["turns"][0]["executions"][0]["error"]
    assert "missing" in err and traj["turns"][0]["final"] is None
    assert traj["final"] == "7"


def test_final_in_prose_and_final_var_in_prose():
    traj = run("q", "c", turns_policy("The answer is clear.\nFINAL(Paris, France)"))
    assert traj["final"] == "Paris, France" and traj["outcome"] == Outcome.FINAL
    traj = run("q", "c", turns_policy(block("best = 'Lyon'") + "\nFINAL_VAR(best)"))
    assert traj["final"] == "Lyon"


def test_no_code_and_no_final_gets_feedback_then_answer_now():
    traj = run("q", "c", turns_policy("I am thinking about it."), max_iterations=2)
    assert traj["outcome"] == Outcome.MAX_ITERATIONS and traj["final"] is None
    assert [t["parse_error"] for t in traj["turns"]] == ["no code block and no FINAL"] * 3
    assert "no ```repl code block" in traj["messages"][3]["content"]
    assert traj["turns"][-1]["forced"] is True
    assert "used all your turns" in traj["messages"][-2]["content"]


def test_the_answer_now_turn_has_its_own_token_cap():
    asked: list[tuple[bool, int]] = []

    class Recording(CallablePolicy):
        async def chat(self, messages, sampling=None, call=None):
            asked.append((call.last_turn, sampling.max_tokens))
            return await super().chat(messages, sampling, call)

    policy = Recording(lambda messages, call: block("print(1)"))
    run("q", "c", policy, max_iterations=2, root_max_tokens=600, answer_max_tokens=64)
    assert asked == [(False, 600), (False, 600), (True, 64)]
    asked.clear()
    run("q", "c", policy, max_iterations=1, root_max_tokens=600)  # unset: the root cap
    assert asked == [(False, 600), (True, 600)]


def test_policy_failure_is_recorded_not_raised():
    from rlm_train.models.base import PolicyError

    def fail(messages, call):
        raise PolicyError("http://127.0.0.1:9/v1 unreachable after 3 retries")

    traj = run("q", "c", CallablePolicy(fail))
    assert traj["outcome"] == Outcome.ERROR and "unreachable" in traj["error"]


def test_cell_timeout_is_reported_and_the_next_turn_still_runs():
    policy = turns_policy(block("while True: pass"), block("FINAL('alive')"))
    traj = run("q", "c", policy, sandbox={"timeout_s": 1})
    assert traj["turns"][0]["executions"][0]["timed_out"] is True
    assert traj["final"] == "alive"


@pytest.mark.parametrize("sample", [0, 1, 2, 3])
def test_scripted_teacher_finds_the_needle(sample):
    from rlm_train.policies.scripted import ScriptedTeacher

    filler = "The quick brown fox jumps over the lazy dog near the river bank. " * 3000
    needle = "One of the special magic numbers for quiet-harbor is: 7310294."
    distractor = "One of the special magic numbers for quiet-harbour is: 1111111."
    context = filler[:90_000] + needle + filler[:50_000] + distractor + filler[:40_000]
    traj = asyncio.run(
        run_episode(
            "What is the special magic number for quiet-harbor mentioned in the provided text?",
            context,
            ScriptedTeacher(),
            config=RLMConfig(),
            hints={"family": "niah", "task_id": "t1", "sample": sample},
        )
    )
    assert traj["outcome"] == Outcome.FINAL, traj["error"]
    assert traj["final"] == "7310294"
    assert 2 <= traj["stats"]["turns"] <= 4


def test_a_cell_that_breaks_the_host_protocol_is_a_sandbox_error_and_the_episode_goes_on():
    forged = "import os, struct\nos.write(3, struct.pack('<Q', 1 << 34))\nimport time\ntime.sleep(30)"
    policy = turns_policy(block("x = 1"), block(forged), block("FINAL(len(context))"))
    traj = run("How long?", "abcd", policy, sandbox={"timeout_s": 5})
    bad = traj["turns"][1]["executions"][0]
    assert bad["error_kind"] == "sandbox" and "ProtocolError" in bad["error"]
    assert traj["turns"][0]["executions"][0]["error_kind"] is None
    assert traj["outcome"] == Outcome.FINAL and traj["final"] == "4"
