"""GRPO's overlong policy on constructed episodes: one rule however an episode was cut (between turns,
mid-turn, by a budget, by the policy's own wall time), and time lost to a busy model server never counts
against the policy. No trainer here: the pure functions, the rewards, and real episodes in the sandbox."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from rlm_train.records import Outcome

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _cfg(*overrides: str):
    from rlm_train.config import load_config
    from rlm_train.train.grpo_config import GRPOConfig

    return load_config(GRPOConfig, REPO / "recipes" / "tiny-cpu-grpo.yaml",
                       ["model=m", "prompts=p.jsonl", "output_dir=o", *overrides])


def test_every_cut_is_the_same_overlong_end():
    from rlm_train.train.grpo_episodes import classify_episode

    budget, timeout = 300.0, 900.0
    # Cut between turns or mid-turn by rollout.max_completion_tokens (the loop records a budget end or a plain end).
    assert classify_episode(Outcome.BUDGET, 12.0, "tokens", 5.0, budget, timeout) == "overlong"
    assert classify_episode(Outcome.MAX_ITERATIONS, 12.0, "tokens", 5.0, budget, timeout) == "overlong"
    assert classify_episode(Outcome.FINAL, 12.0, "tokens", 5.0, budget, timeout) == "overlong"
    # The recorder's check of the policy's own time, and the loop's sub-call / token budgets.
    assert classify_episode(Outcome.BUDGET, 400.0, "wall", 301.0, budget, timeout) == "overlong"
    assert classify_episode(Outcome.BUDGET, 40.0, None, 30.0, budget, timeout) == "overlong"
    # The hard timeout: the policy's fault only if its own time was over its budget.
    assert classify_episode(Outcome.BUDGET, 901.0, None, 100.0, budget, timeout) == "infra"
    assert classify_episode(Outcome.BUDGET, 901.0, None, 350.0, budget, timeout) == "overlong"
    # Server or sandbox failures, and ordinary ends.
    assert classify_episode(Outcome.ERROR, 3.0, None, 1.0, budget, timeout) == "infra"
    assert classify_episode(Outcome.FINAL, 3.0, None, 1.0, budget, timeout) == "ok"
    assert classify_episode(Outcome.MAX_ITERATIONS, 3.0, None, 1.0, budget, timeout) == "ok"


def test_mask_and_penalty_rewards_on_constructed_episodes():
    from rlm_train.train.grpo_episodes import RolloutLog
    from rlm_train.train.rewards import make_reward_funcs

    ends = ["ok", "overlong", "overlong", "infra", "ok"]
    lengths = [100, 512, 512, 30, 480]
    kw = {"task_id": ["t"] * 5, "rlm_final": ["7", None, None, None, "1"], "rlm_end": ends, "rlm_length": lengths,
          "rlm_outcome": [Outcome.FINAL, Outcome.ERROR, Outcome.MAX_ITERATIONS, Outcome.ERROR, Outcome.FINAL],
          "rlm_turns": [2, 3, 2, 1, 2], "rlm_turns_with_code": [2, 3, 1, 0, 1], "rlm_episode_id": list("abcde")}
    tasks = {"t": {"answer": "7"}}

    def scorer(task, final):
        return float(final == task["answer"])

    def totals(cfg):
        funcs, weights = make_reward_funcs(cfg, tasks, scorer, RolloutLog(None))
        columns = [f(None, None, None, **kw) for f in funcs]
        rows = list(zip(*columns))
        return [None if all(v is None for v in row) else sum(w * v for w, v in zip(weights, row) if v is not None)
                for row in rows], [f.__name__ for f in funcs]

    masked, names = totals(_cfg("reward.overlong=mask"))
    assert names == ["task_score", "repl_format"]
    assert masked[1] is None and masked[2] is None and masked[3] is None  # out of the group's statistics
    assert masked[0] == pytest.approx(1 + 0.5 * 1.0) and masked[4] == pytest.approx(0 + 0.5 * 0.75)

    penalized, names = totals(_cfg("reward.overlong=penalty", "reward.overlong_penalty=1.0",
                                   "reward.overlong_buffer_tokens=64", "rollout.max_completion_tokens=512"))
    assert names == ["task_score", "repl_format", "overlong"]
    # Cut between turns (b) and mid-turn (c) get the same penalty on top of what they earned.
    assert penalized[1] == pytest.approx(0.5 * 0.5 * 1.0 - 1.0)
    assert penalized[2] == pytest.approx(0.5 * 0.5 * 0.5 - 1.0)
    assert penalized[3] is None  # infrastructure: never a penalty
    # Within the last 64 tokens before the 512 cap: a linear share (480 is 32 tokens in -> half the penalty).
    assert penalized[4] == pytest.approx(0.5 * 0.75 - 0.5)
    assert penalized[0] == masked[0]


def test_masked_episodes_are_not_trained():
    """_collect zeroes the loss mask of episodes left out (over-long under mask, infrastructure errors);
    under penalty the over-long ones keep their mask: they are trained with the penalty."""
    from rlm_train.train.grpo_episodes import EpisodeClock, RolloutLog
    from rlm_train.train.grpo_rollout import _collect

    class Rec:
        def __init__(self, cut):
            self.prompt_ids, self.completion_ids, self.env_mask = [1, 2], [5, 6, 7, 8], [1, 1, 0, 1]
            self.logprobs, self.has_logprobs, self.cut, self.clock = [0.0] * 4, False, cut, EpisodeClock()

    def episode(i, outcome, cut):
        traj = {"id": f"e{i}", "final": None, "outcome": outcome, "turns": [], "stats": {"wall_s": 1.0}}
        return {"task_id": "t", "recorder": Rec(cut), "trajectory": traj}

    class Tok:
        pad_token_id = 0

    episodes = [episode(0, Outcome.MAX_ITERATIONS, None), episode(1, Outcome.BUDGET, "tokens"),
                episode(2, Outcome.MAX_ITERATIONS, "tokens"), episode(3, Outcome.ERROR, None)]
    log = RolloutLog(None)
    out = _collect(_cfg("reward.overlong=mask"), episodes, Tok(), log, step=0)
    assert out["rlm_end"] == ["ok", "overlong", "overlong", "infra"]
    assert [sum(m) for m in out["env_mask"]] == [3, 0, 0, 0]
    assert [log.episodes[f"e{i}"]["trained"] for i in range(4)] == [True, False, False, False]
    out = _collect(_cfg("reward.overlong=penalty"), episodes, Tok(), RolloutLog(None), step=0)
    assert [sum(m) for m in out["env_mask"]] == [3, 3, 3, 0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.testing.tiny_models import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    build_tokenizer(root)
    (root / "config.json").write_text('{"model_type": "qwen3"}')
    return load_tokenizer(root)


def test_time_waiting_on_a_busy_server_never_counts_against_the_policy(tokenizer):
    """Real episodes in the sandbox with rlm.max_wall_s=0.6 of the policy's own time: a slow server
    (1 s per root turn) does not cut the episode; code that sleeps 1 s in the sandbox does."""
    from rlm_train.models.loading import end_of_turn_ids
    from rlm_train.rlm import run_episode
    from rlm_train.train.grpo_backends import BatchingGenerator, GenOutput
    from rlm_train.train.grpo_config import GRPORLMConfig
    from rlm_train.train.grpo_episodes import classify_episode
    from rlm_train.train.grpo_rollout import EpisodeRecorder

    stop = end_of_turn_ids(tokenizer)

    class Server:
        max_inflight = 4

        def __init__(self, turns, delay):
            self.turns, self.delay = turns, delay

        def generate_batch(self, prompts, sampling):
            import time

            time.sleep(self.delay)  # a busy server: queueing and generation
            turn = (prompts[0].count(stop[0]) - 2) // 2  # two <|im_end|> per turn after system + user
            text = self.turns[min(turn, len(self.turns) - 1)]
            return [GenOutput(tokenizer(text, add_special_tokens=False)["input_ids"] + [stop[0]]) for _ in prompts]

    async def episode(turns, delay):
        rec = EpisodeRecorder(BatchingGenerator(Server(turns, delay), 0), tokenizer, stop, 4000, max_wall_s=0.6)
        config = GRPORLMConfig(max_iterations=3, max_wall_s=None)
        return await run_episode("q?", "ctx", rec, None, config), rec

    slow_server = ["```repl\nx = 1\n```", "```repl\nx += 1\n```", "```repl\nFINAL(x)\n```"]
    traj, rec = asyncio.run(episode(slow_server, 1.0))
    assert traj["final"] == "2" and rec.cut is None
    assert traj["stats"]["wall_s"] > 2.5 and rec.clock.policy_s() < 0.6  # 3 s waiting, not the policy's time
    assert classify_episode(traj["outcome"], traj["stats"]["wall_s"], rec.cut, rec.clock.policy_s(), 0.6, 1.8) == "ok"

    slow_code = ["```repl\nimport time\ntime.sleep(1.0)\n```", "```repl\nFINAL(1)\n```"]
    traj, rec = asyncio.run(episode(slow_code, 0.0))
    assert rec.cut == "wall" and traj["final"] is None
    # Over-long is the policy's budget running out, never recorded as a model (server) error.
    assert traj["outcome"] == Outcome.BUDGET and traj["error_kind"] is None and "rlm.max_wall_s" in traj["error"]
    assert classify_episode(traj["outcome"], traj["stats"]["wall_s"], rec.cut, rec.clock.policy_s(), 0.6, 1.8) == "overlong"


def test_only_the_root_episodes_own_turns_are_trained_whatever_the_hints_say(tokenizer):
    """GRPO's recorder trains on a call's tokens from the loop's typed CallContext: depth-0 root turns.
    A child RLM's turns and the sub-calls (the recorder is also the sub-policy here) are generated but
    never trained, even with a typo'd hint and a sub-policy that tries to rewrite the call's hints."""
    import operator
    from dataclasses import FrozenInstanceError

    from rlm_train.models.loading import end_of_turn_ids
    from rlm_train.rlm import run_episode
    from rlm_train.train.grpo_backends import BatchingGenerator, GenOutput
    from rlm_train.train.grpo_config import GRPORLMConfig
    from rlm_train.train.grpo_rollout import EpisodeRecorder

    stop = end_of_turn_ids(tokenizer)
    root_turns = ["```repl\na = llm_query('SUBQ: one word')\nb = rlm_query('CHILDQ', context)\nprint(len(a), b)\n```",
                  "```repl\nFINAL('done')\n```"]
    child_turn = "```repl\n# CHILD-TOKENS\nFINAL('c')\n```"
    asked = {"root": 0, "sub": 0, "child": 0}

    class Server:
        max_inflight = 8

        def generate_batch(self, prompts, sampling):
            out = []
            for prompt in prompts:
                text = tokenizer.decode(prompt)
                if "ROOTQ" in text:
                    who, reply = "root", root_turns[min((prompt.count(stop[0]) - 2) // 2, 1)]
                elif "SUBQ" in text:
                    who, reply = "sub", "SUB-TOKENS"
                else:
                    who, reply = "child", child_turn
                asked[who] += 1
                out.append(GenOutput(tokenizer(reply, add_special_tokens=False)["input_ids"] + [stop[0]]))
            return out

    refused = []

    class Meddler:
        """A sub-policy that tries to pass its calls off as the root's before the recorder sees them."""

        name = "meddler"

        def __init__(self, inner):
            self.inner = inner

        async def chat(self, messages, sampling=None, call=None):
            for meddle in (lambda: operator.setitem(call.hints, "depth", 0), lambda: setattr(call, "depth", 0)):
                try:
                    meddle()
                except (TypeError, FrozenInstanceError) as exc:
                    refused.append(type(exc).__name__)
            return await self.inner.chat(messages, sampling, call)

        async def aclose(self):
            return None

    async def episode(hints):
        rec = EpisodeRecorder(BatchingGenerator(Server(), 0), tokenizer, stop, 4000)
        config = GRPORLMConfig(max_iterations=3, max_depth=1, max_wall_s=None)
        return await run_episode("ROOTQ?", "some context", rec, Meddler(rec), config, hints=hints), rec

    traj, rec = asyncio.run(episode({"family": "toy", "dpeth": 0}))  # a typo'd hint is side information only
    assert traj["final"] == "done" and asked == {"root": 2, "sub": 1, "child": 1}
    assert refused == ["TypeError", "FrozenInstanceError"]
    trained = [t for t, m in zip(rec.completion_ids, rec.env_mask) if m]
    expected = [t for reply in root_turns for t in tokenizer(reply, add_special_tokens=False)["input_ids"] + [stop[0]]]
    assert trained == expected
    assert "CHILD-TOKENS" not in tokenizer.decode(rec.completion_ids)  # never even in the feedback
    with pytest.raises(ValueError, match=r"\['depth'\] are set by the loop"):
        asyncio.run(episode({"depth": 0}))  # the old way of saying "root" is refused, not obeyed


# Qwen3's own template in its essentials: past assistant turns lose their <think> block.
DROPS_PAST_THINKING = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content and not loop.last -%}{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' ~ content ~ '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_a_template_that_drops_thinking_is_refused_and_stops_the_rollout(tokenizer, tmp_path):
    """The template check covers thinking blocks; if such a template gets through anyway, the recorder's
    prefix failure stops training with a config error instead of being counted as infrastructure."""
    import copy
    import json
    from types import SimpleNamespace

    from rlm_train.errors import UserError
    from rlm_train.models.loading import end_of_turn_ids
    from rlm_train.rollouts.rl_prompts import load_prompt_set
    from rlm_train.train.grpo_backends import GenOutput
    from rlm_train.train.grpo_episodes import RolloutLog
    from rlm_train.train.grpo_rollout import make_rollout_func
    from rlm_train.train.grpo_setup import check_template_extends

    check_template_extends(tokenizer)  # ours keeps <think> blocks verbatim
    official = copy.copy(tokenizer)
    official.chat_template = DROPS_PAST_THINKING
    with pytest.raises(UserError, match="<think>"):
        check_template_extends(official)

    stop = end_of_turn_ids(official)

    class Thinker:
        # "<think>...</think>" sampled as plain text pieces (this tiny tokenizer's <think> token is special,
        # and special tokens are dropped when decoding; Qwen3's is not).
        pieces = ["<", "think>\nwhere is it\n<", "/think>\n\n```repl\nprint(len(context))\n```"]

        def generate_batch(self, prompts, sampling):
            ids = [i for piece in self.pieces for i in official(piece, add_special_tokens=False)["input_ids"]]
            return [GenOutput(ids + [stop[0]]) for _ in prompts]

    task = {"schema": "rlm-train/task/v1", "id": "t1", "family": "niah", "query": "q?", "context": "ctx",
            "answer": ["1"], "scorer": "all_strings", "meta": {}}
    (tmp_path / "tasks.jsonl").write_text(json.dumps(task) + "\n")
    cfg = _cfg("reward.overlong=mask", "rlm.max_iterations=2")
    prompt_set = load_prompt_set(tmp_path / "tasks.jsonl", cfg.rlm)
    rollout = make_rollout_func(cfg, official, prompt_set, lambda trainer: Thinker(), RolloutLog(None), stop)
    trainer = SimpleNamespace(rlm_batch_rows=prompt_set.rows * 2, state=SimpleNamespace(global_step=0))
    with pytest.raises(UserError, match="does not extend the conversation"):
        rollout([r["prompt"] for r in trainer.rlm_batch_rows], trainer)


def test_config_checks_before_any_loading(tmp_path):
    from rlm_train.errors import UserError
    from rlm_train.train.grpo_config import check_config

    with pytest.raises(UserError, match="launch.num_processes=8.*requires.gpus=6"):
        check_config(_cfg("requires.gpus=6", "launch.num_processes=8", "rollout.backend=vllm_server"), "r.yaml")
    with pytest.raises(UserError, match="clip_min .* must be below"):
        check_config(_cfg("rollout.vllm_importance_sampling_clip_min=4", "rollout.vllm_importance_sampling_clip_max=3"),
                     "r.yaml")
    with pytest.raises(UserError, match="set at least one bound"):
        check_config(_cfg("rollout.vllm_importance_sampling_clip_max=null"), "r.yaml")
    with pytest.raises(UserError, match="save_merged needs lora.enabled"):
        check_config(_cfg("save_merged=true", "lora.enabled=false"), "r.yaml")
    with pytest.raises(UserError, match="key 'training.mask_truncated_completions'"):
        _cfg("training.mask_truncated_completions=true")  # replaced by reward.overlong


def test_completion_cap_and_ddp_timeout_follow_the_episode_budgets():
    """The token cap may not cut episodes short of their turn budget, and ranks wait at least 2 x the
    hard episode cap for each other; both refused in one line naming the two numbers."""
    from rlm_train.errors import UserError
    from rlm_train.train.grpo_config import (
        check_config,
        completion_token_cap,
        ddp_timeout_s,
        turn_budget_tokens,
    )

    cfg = _cfg()
    budget = turn_budget_tokens(cfg.rlm)
    assert completion_token_cap(cfg) == budget  # unset: the turn budget
    # More turns, longer turns or more REPL output per turn all need more room.
    for more in ("rlm.max_iterations=3", "rlm.root_max_tokens=96", "rlm.feedback_chars=8000"):
        assert turn_budget_tokens(_cfg(more).rlm) > budget
    assert budget > cfg.rlm.max_iterations * cfg.rlm.root_max_tokens
    check_config(_cfg(f"rollout.max_completion_tokens={budget}"), "r.yaml")
    with pytest.raises(UserError, match=rf"^r.yaml: rollout.max_completion_tokens={budget - 1} is below the {budget} "):
        check_config(_cfg(f"rollout.max_completion_tokens={budget - 1}"), "r.yaml")

    # Hard cap: 3 x rlm.max_wall_s (300 s) = 900 s; 6 episodes per rank at concurrency 8 run in one wave.
    assert ddp_timeout_s(cfg) == 1800  # transformers' default is already 2 x 900
    assert ddp_timeout_s(_cfg("rlm.max_wall_s=600")) == 3600
    assert ddp_timeout_s(_cfg("rlm.max_wall_s=600", "rollout.concurrency=3")) == 7200  # two waves
    # Held-out episodes on the main process (the others wait): 20 at concurrency 8, 900 s each, 3 waves.
    assert ddp_timeout_s(cfg, eval_episodes=20) == 2 * 900 * 3
    check_config(_cfg("rlm.max_wall_s=600", "training.ddp_timeout=3600"), "r.yaml")
    with pytest.raises(UserError, match=r"training.ddp_timeout=3599s is below 3600s = 2 x the hard episode cap of 1800s"):
        check_config(_cfg("rlm.max_wall_s=600", "training.ddp_timeout=3599"), "r.yaml")


def test_zero_advantage_groups_and_importance_weights():
    """The two pure pieces the trainer applies to TRL's batch (train/losses.py)."""
    import math

    import torch

    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.losses import importance_weights, zero_advantage_groups

    # Groups of 3: equal rewards leave float dust (1e-13 after std scaling), one scored episode leaves 0s.
    adv = torch.tensor([1.2, -0.6, -0.6, 3e-13, -1e-13, -2e-13, 0.0, 0.0, 0.0, 0.0, 1e-3, -1e-3])
    assert zero_advantage_groups(adv, 3).tolist() == [False, True, True, False]

    trainer = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.0, -0.5, -3.0 - math.log(5.0), 0.0], [-1.0, float("nan"), -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # row 0: the last position is padding; row 1: feedback
    w, bounded = importance_weights(trainer, sampler, mask, "token_truncate", None, 3.0)
    assert w.shape == (2, 4)  # one weight per token
    assert w[0].tolist() == pytest.approx([1.0, math.exp(-1.5), 3.0, 1.0])  # ratio 5 clipped to 3
    assert w[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # NaN sampler logprob and unmasked tokens: no correction
    assert bounded.tolist() == [[False, False, True, False], [False] * 4]
    w, _ = importance_weights(trainer, sampler, mask, "token_mask", 0.5, 3.0)
    assert w[0].tolist() == [1.0, 0.0, 0.0, 1.0]  # exp(-1.5) < 0.5 and 5 > 3: dropped
    w, bounded = importance_weights(trainer, sampler, mask, "sequence_truncate", None, 3.0)
    assert w.shape == (2, 1) and w[0, 0] == pytest.approx(5 * math.exp(-1.5)) and not bounded.any()  # one product
    w, _ = importance_weights(trainer, sampler, mask, "sequence_mask", None, 1.1)
    assert w.tolist() == [[0.0], [1.0]]  # the whole episode dropped for its product of 1.12
    assert GRPOConfig.model_fields["rollout"].default.vllm_importance_sampling_mode == "token_truncate"


def test_prompt_set_without_its_task_file_fails_before_loading(tmp_path):
    import json

    from rlm_train.config import load_config
    from rlm_train.errors import UserError
    from rlm_train.testing.tiny_models import build_tiny_qwen3
    from rlm_train.train.grpo import run_grpo
    from rlm_train.train.grpo_config import GRPOConfig

    model = build_tiny_qwen3(tmp_path / "model")
    prompts = tmp_path / "rl-train.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "task_id": "t1",
                                   "task_file": "gone/tasks.jsonl"}) + "\n")
    cfg = load_config(GRPOConfig, REPO / "recipes" / "tiny-cpu-grpo.yaml",
                      [f"model={model}", f"prompts={prompts}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(UserError, match="task_file 'gone/tasks.jsonl' not found"):
        run_grpo(cfg, "test")
    assert not (tmp_path / "out").exists()


def test_batching_generator_groups_and_never_deadlocks():
    import time

    from rlm_train.models.base import SamplingParams
    from rlm_train.train.grpo_backends import BatchingGenerator, GenOutput

    class OneAtATime:
        max_inflight = 1

        def __init__(self):
            self.batches = []

        def generate_batch(self, prompts, sampling):
            self.batches.append((len(prompts), sampling.max_tokens))
            time.sleep(0.02)
            return [GenOutput([p[0]]) for p in prompts]

    async def main(backend):
        gen = BatchingGenerator(backend, wait_s=0.01)
        return await asyncio.wait_for(asyncio.gather(
            *(gen.generate([i], SamplingParams(max_tokens=4 if i % 2 else 8)) for i in range(10))), 10)

    backend = OneAtATime()
    outs = asyncio.run(main(backend))
    assert [o.ids for o in outs] == [[i] for i in range(10)]  # each answer goes back to its own request
    assert sorted(backend.batches) == [(5, 4), (5, 8)]  # one batch per sampling setting


def test_resume_trim_drops_a_torn_line_with_its_number_and_keeps_the_rest(tmp_path, capsys):
    from rlm_train.train.grpo_episodes import trim_jsonl

    log = tmp_path / "rollouts.jsonl"
    log.write_text('{"grpo_step": 1}\n{"grpo_step": 3}\n{"grpo_st')
    assert trim_jsonl(log, lambda r: r["grpo_step"] < 2) == 2
    assert log.read_text() == '{"grpo_step": 1}\n'
    assert f"{log}:3: not a JSON record" in capsys.readouterr().err
