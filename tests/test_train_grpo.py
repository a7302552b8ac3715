"""GRPO with full RLM episodes as rollouts, on a tiny random Qwen3-shaped model built here.

The main test runs one real GRPOTrainer step whose root turns come from a scripted token
generator (so rewards differ within a group), and checks what TRL trains on: rewards from
the task scorer, non-zero advantages, and a loss mask that is 0 exactly on the REPL feedback
tokens, position by position.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.records import Outcome

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

GRPO_RECIPES = sorted((REPO / "recipes").glob("*grpo*.yaml"))

# Two needle tasks; the scorer is the project's (all_strings: the answer must contain the value).
NEEDLES = {"harbor": "7421", "meadow": "3906"}


def _task(key: str, value: str) -> dict:
    context = ("Filler sentence about nothing in particular. " * 12
               + f"The special magic number for {key} is: {value}. " + "More filler text here. " * 6)
    return {"schema": "rlm-train/task/v1", "id": f"needle-{key}", "family": "niah",
            "query": f"What is the special magic number for {key}?", "context": context,
            "answer": [value], "scorer": "all_strings", "meta": {}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    root = tmp_path_factory.mktemp("grpo")
    model_dir = build_tiny_qwen3(root / "model")
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(_task(k, v)) + "\n" for k, v in NEEDLES.items()))
    return {"root": root, "model": model_dir, "tasks": tasks}


def _cfg(tiny, out: Path, *overrides: str):
    from rlm_train.train.grpo_config import GRPOConfig

    return load_config(GRPOConfig, REPO / "recipes" / "tiny-cpu-grpo.yaml",
                       [f"model={tiny['model']}", f"prompts={tiny['tasks']}", f"output_dir={out}", *overrides])


class ScriptedBackend:
    """Token generator standing in for the model: three plans per group, chosen by arrival order at
    turn 0 and recognised later from a marker in the model's own first turn.
      plan 0: print the context tail, then FINAL(the right value)    -> task reward 1
      plan 1: print the context tail, then FINAL('0000')             -> task reward 0
      plan 2: prose without code (no REPL run), then FINAL(right)    -> task reward 1
    """

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.counts: dict[str, int] = {}
        self.emitted: list[list[int]] = []

    def turn_text(self, prompt: str) -> str:
        key = next(k for k in NEEDLES if f"magic number for {k}" in prompt)
        if prompt.count("<|im_start|>assistant") == 1:  # turn 0: only the generation prompt
            plan = self.counts.get(key, 0) % 3
            self.counts[key] = plan + 1
            if plan == 2:
                return "Let me think about plan 2 first."
            return f"```repl\n# plan {plan}\nprint(context[-200:])\n```"
        if "# plan 1" in prompt:
            return "```repl\nFINAL('0000')\n```"
        return f"```repl\nFINAL('{NEEDLES[key]}')\n```"

    def generate_batch(self, prompts, sampling):
        from rlm_train.train.grpo_backends import GenOutput

        outs = []
        for ids in prompts:
            text = self.turn_text(self.tokenizer.decode(ids))
            gen = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop_ids[0]]
            self.emitted.append(gen)
            outs.append(GenOutput(gen))
        return outs


def _lora_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.slow
def test_one_grpo_step_scripted_episodes(tiny, tmp_path):
    from rlm_train.models.loading import end_of_turn_ids, load_tokenizer, render_chat
    from rlm_train.rlm import prompts as rlm_prompts
    from rlm_train.train.grpo import run_grpo

    cfg = _cfg(tiny, tmp_path / "out", "training.max_steps=1")
    tokenizer = load_tokenizer(tiny["model"])
    stop_ids = end_of_turn_ids(tokenizer)
    backend = ScriptedBackend(tokenizer, stop_ids)
    batches, snap = [], {}

    summary = run_grpo(
        cfg, "test", backend_factory=lambda trainer: backend,
        on_batch=lambda output, extra: batches.append((output, extra["inputs"])),
        on_trainer=lambda trainer: snap.update(before=_lora_params(trainer.model), trainer=trainer),
    )
    assert summary["global_step"] == 1 and len(batches) == 1
    output, inputs = batches[0]
    episodes = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").open()}
    assert len(episodes) == 6

    # Rewards come from the task scorer on each episode's FINAL answer.
    rewards = []
    for inp in inputs:
        ep = episodes[inp["rlm_episode_id"]]
        plan = 1 if ep["final"] == "0000" else 0
        assert ep["outcome"] == Outcome.FINAL
        assert ep["rewards"]["task_score"] == (0.0 if plan == 1 else 1.0)
        rewards.append(ep["rewards"]["task_score"] + 0.5 * ep["rewards"]["repl_format"])
    # Each group (3 episodes of one task) mixes right and wrong answers, so advantages are not zero,
    # and they follow the rewards: above the group mean is positive.
    adv = output["advantages"].tolist()
    for g in range(0, 6, 3):
        group = rewards[g:g + 3]
        mean = sum(group) / 3
        for r, a in zip(group, adv[g:g + 3]):
            assert (a > 0) == (r > mean) and abs(a) > 0.1

    # The loss mask (completion_mask * tool_mask) is 1 on the model's sampled tokens and 0 on the
    # chat-template rendering of the REPL feedback in between, position by position.
    comp = output["completion_ids"].tolist()
    loss_mask = (output["completion_mask"] * output["tool_mask"]).tolist()
    checked_repl = 0
    for i, inp in enumerate(inputs):
        ep = episodes[inp["rlm_episode_id"]]
        turn0, turn1 = ep["turns"][0], ep["turns"][1]
        gen0 = tokenizer(turn0["assistant"], add_special_tokens=False)["input_ids"] + [stop_ids[0]]
        gen1 = tokenizer(turn1["assistant"], add_special_tokens=False)["input_ids"] + [stop_ids[0]]
        before = ep["messages"][:3]  # system, user, first assistant turn
        feedback_text = (render_chat(tokenizer, ep["messages"][:4], add_generation_prompt=True)
                         [len(render_chat(tokenizer, before[:2], add_generation_prompt=True) + turn0["assistant"]):])
        assert feedback_text.startswith("<|im_end|>")
        env = tokenizer(feedback_text[len("<|im_end|>"):], add_special_tokens=False)["input_ids"]
        n = len(gen0) + len(env) + len(gen1)
        assert comp[i][:n] == gen0 + env + gen1
        assert loss_mask[i][:n] == [1] * len(gen0) + [0] * len(env) + [1] * len(gen1)
        assert set(loss_mask[i][n:]) <= {0}  # right padding
        masked_text = tokenizer.decode(comp[i][len(gen0):len(gen0) + len(env)])
        trained_text = tokenizer.decode([t for t, m in zip(comp[i], loss_mask[i]) if m])
        if turn0["executions"]:
            value = NEEDLES[inp["task_id"].split("-")[1]]
            assert "REPL output:" in masked_text and f"is: {value}" in masked_text  # the printed context
            assert "REPL output" not in trained_text and f"is: {value}" not in trained_text
            checked_repl += 1
        else:
            assert rlm_prompts.NO_CODE_FEEDBACK in masked_text
    assert checked_repl == 4

    # One optimizer step moved the LoRA weights.
    after = _lora_params(snap["trainer"].model)
    assert any(not (after[n] == snap["before"][n]).all() for n in after)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


class OneGroupAgrees(ScriptedBackend):
    """harbor as in ScriptedBackend (its rewards differ); every meadow episode prints the context, then answers
    right (equal rewards: a zero-advantage group). Each sampled token comes back with logprob -20, a sampler far
    from the trainer, so every importance ratio p_trainer / p_sampler is far above the clip (3)."""

    def turn_text(self, prompt: str) -> str:
        if "magic number for meadow" not in prompt:
            return super().turn_text(prompt)
        if prompt.count("<|im_start|>assistant") == 1:
            return "```repl\nprint(context[-200:])\n```"
        return f"```repl\nFINAL('{NEEDLES['meadow']}')\n```"

    def generate_batch(self, prompts, sampling):
        from rlm_train.train.grpo_backends import GenOutput

        return [GenOutput(out.ids, [-20.0] * len(out.ids)) for out in super().generate_batch(prompts, sampling)]


@pytest.mark.slow
def test_zero_advantage_group_leaves_the_loss_and_token_weights_reach_it(tiny, tmp_path):
    """A group whose episodes all got the same reward adds nothing to the loss or to dapo's token normaliser:
    the step's loss equals the loss of the other group alone. Importance weights are per token by default,
    clipped, and logged with the dropped groups in metrics.jsonl."""
    import math

    import torch

    from rlm_train.models.loading import end_of_turn_ids, load_tokenizer
    from rlm_train.train.grpo import run_grpo

    cfg = _cfg(tiny, tmp_path / "out", "training.max_steps=1")
    assert (cfg.training.drop_zero_advantage_groups, cfg.rollout.vllm_importance_sampling_mode) == (True, "token_truncate")
    tokenizer = load_tokenizer(tiny["model"])
    backend = OneGroupAgrees(tokenizer, end_of_turn_ids(tokenizer))
    seen: dict = {}
    run_grpo(cfg, "test", backend_factory=lambda trainer: backend,
             on_batch=lambda output, extra: seen.update(output=output, inputs=extra["inputs"]),
             on_trainer=lambda trainer: seen.update(trainer=trainer))
    output, inputs, trainer = seen["output"], seen["inputs"], seen["trainer"]
    episodes = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").open()}
    live = [i for i, inp in enumerate(inputs) if inp["task_id"] == "needle-harbor"]
    dead = [i for i, inp in enumerate(inputs) if inp["task_id"] == "needle-meadow"]
    assert len(live) == len(dead) == 3
    assert len({episodes[inputs[i]["rlm_episode_id"]]["rewards"]["task_score"] for i in dead}) == 1
    assert len({episodes[inputs[i]["rlm_episode_id"]]["rewards"]["task_score"] for i in live}) == 2

    # The agreeing group has no trained token left; the normaliser counts the other group's only.
    trained = (output["completion_mask"] * output["tool_mask"]).sum(dim=1)
    assert all(trained[i] == 0 for i in dead) and all(trained[i] > 0 for i in live)
    assert sum(episodes[inputs[i]["rlm_episode_id"]]["model_tokens"] for i in dead) > 0  # it had tokens to dilute with
    assert int(output["num_items_in_batch"]) == int(trained[live].sum())
    assert output["advantages"].shape == output["completion_ids"].shape  # importance weights per token

    def rows(batch: dict, keep: list[int]) -> dict:
        return {k: v[keep] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}

    alone = {**rows(output, live), "num_items_in_batch": trained[live].sum()}
    with torch.no_grad():
        loss, loss_alone = (float(trainer.compute_loss(trainer.model, batch)) for batch in (output, alone))
    assert loss != 0 and loss == pytest.approx(loss_alone, rel=1e-5)

    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    step = next(m for m in metrics if "loss" in m)
    assert step["frac_reward_zero_std"] == 0.5 and step["rlm/dropped_groups"] == 1 and step["rlm/dropped_episodes"] == 3
    ratios = [step[f"sampling/importance_sampling_ratio/{k}"] for k in ("min", "mean", "max")]
    assert all(math.isfinite(r) for r in ratios) and ratios == pytest.approx([3.0, 3.0, 3.0])  # every ratio clipped
    assert step["sampling/importance_sampling_ratio/bounded_frac"] == 1.0
    assert step["sampling/sampling_logp_difference/mean"] > 5  # what the clip corrected


@pytest.mark.slow
def test_one_grpo_step_in_process_generation(tiny, tmp_path):
    """The CPU path end to end: root turns sampled from the trainer's own (random) model."""
    from rlm_train.train.grpo import run_grpo

    # Kept even when its rewards agree (a random model's usually do), to compare its loss mask with the episode.
    cfg = _cfg(tiny, tmp_path / "out", "training.max_steps=1", "training.num_generations=2", "training.batch_size=2",
               "rlm.max_iterations=1", "rlm.root_max_tokens=6", "training.drop_zero_advantage_groups=false")
    batches = []
    summary = run_grpo(cfg, "test", on_batch=lambda output, extra: batches.append((output, extra["inputs"])))
    assert summary["global_step"] == 1
    output, inputs = batches[0]
    episodes = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").open()}
    loss_mask = (output["completion_mask"] * output["tool_mask"]).tolist()
    for i, inp in enumerate(inputs):
        ep = episodes[inp["rlm_episode_id"]]
        assert ep["outcome"] in (Outcome.FINAL, Outcome.MAX_ITERATIONS)
        # Trained tokens are exactly what the model sampled, turn by turn; the rest is feedback.
        assert sum(loss_mask[i]) == sum(t["completion_tokens"] for t in ep["turns"]) == ep["model_tokens"]
        if len(ep["turns"]) > 1:
            assert ep["env_tokens"] > 0
        assert ep["rewards"]["task_score"] in (0.0, 1.0)
    # In-process generate reports its sampling logprobs: the trainer scores the same tokens the same way
    # (token by token: an off-by-one or a missing temperature would put ratios far from 1).
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    step = next(m for m in metrics if "loss" in m)
    for key in ("min", "mean", "max"):
        assert step[f"sampling/importance_sampling_ratio/{key}"] == pytest.approx(1.0, abs=1e-3)
    assert step["sampling/sampling_logp_difference/max"] < 1e-3


def test_vllm_server_backend_records_logprobs(tiny):
    """The GPU path without a GPU: a fake VLLMClient stands in for TRL's client to the vLLM server."""
    from rlm_train.models.loading import end_of_turn_ids, load_tokenizer
    from rlm_train.rlm import RLMConfig, run_episode
    from rlm_train.train.grpo_backends import BatchingGenerator, VLLMServerBackend
    from rlm_train.train.grpo_rollout import EpisodeRecorder

    tokenizer = load_tokenizer(tiny["model"])
    stop = end_of_turn_ids(tokenizer)
    replies = iter(["```repl\nprint(len(context))\n```", "```repl\nFINAL('7421')\n```"])
    calls = []

    class FakeClient:
        def generate(self, prompts, n, temperature, top_p, top_k, max_tokens, logprobs, generation_kwargs):
            calls.append({"prompts": prompts, "kwargs": generation_kwargs, "max_tokens": max_tokens, "logprobs": logprobs})
            ids = [tokenizer(next(replies), add_special_tokens=False)["input_ids"] + [stop[0]] for _ in prompts]
            return {"completion_ids": ids, "logprobs": [[[-0.5]] * len(x) for x in ids]}

    async def episode():
        gen = BatchingGenerator(VLLMServerBackend(FakeClient(), stop), wait_s=0)
        rec = EpisodeRecorder(gen, tokenizer, stop, max_completion_tokens=400)
        traj = await run_episode("q?", "x" * 50, rec, None, RLMConfig(temperature=1.0, max_iterations=3))
        return traj, rec

    traj, rec = asyncio.run(episode())
    assert traj["final"] == "7421" and len(calls) == 2
    assert calls[0]["kwargs"] == {"stop_token_ids": stop} and calls[0]["logprobs"] == 0
    # Turn 2's prompt is turn 1's prompt + its sampled ids + the feedback tokens (token-in, token-out).
    assert calls[1]["prompts"][0] == rec.prompt_ids + rec.completion_ids[:len(calls[1]["prompts"][0]) - len(rec.prompt_ids)]
    assert rec.has_logprobs and len(rec.logprobs) == len(rec.completion_ids) == len(rec.env_mask)
    assert all(lp == -0.5 for lp, m in zip(rec.logprobs, rec.env_mask) if m)
    assert 0 < sum(rec.env_mask) < len(rec.env_mask)


def test_episode_token_budget_ends_the_episode(tiny):
    from rlm_train.models.loading import end_of_turn_ids, load_tokenizer
    from rlm_train.rlm import RLMConfig, run_episode
    from rlm_train.train.grpo_backends import BatchingGenerator, GenOutput
    from rlm_train.train.grpo_episodes import classify_episode
    from rlm_train.train.grpo_rollout import EpisodeRecorder

    tokenizer = load_tokenizer(tiny["model"])
    stop = end_of_turn_ids(tokenizer)

    class Chatty:
        def generate_batch(self, prompts, sampling):
            text = "```repl\nprint(context[:5])\n```"
            return [GenOutput((tokenizer(text, add_special_tokens=False)["input_ids"] + [stop[0]])[:sampling.max_tokens])
                    for _ in prompts]

    async def episode():
        rec = EpisodeRecorder(BatchingGenerator(Chatty(), 0), tokenizer, stop, max_completion_tokens=60)
        return await run_episode("q?", "y" * 40, rec, None, RLMConfig(temperature=1.0, max_iterations=8)), rec

    traj, rec = asyncio.run(episode())
    assert rec.cut == "tokens" and traj["final"] is None
    assert traj["outcome"] == Outcome.BUDGET and traj["error_kind"] is None  # over-long, not a model error
    assert classify_episode(traj["outcome"], traj["stats"]["wall_s"], rec.cut, rec.clock.policy_s(), 300, 900) == "overlong"
    assert len(rec.completion_ids) <= 60 and rec.env_mask[-1] == 1  # ends on the model's own tokens


def test_template_that_rewrites_history_is_refused(tiny):
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.train.grpo import check_template_extends

    tokenizer = load_tokenizer(tiny["model"])
    check_template_extends(tokenizer)  # ours extends turn by turn
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    with pytest.raises(UserError, match="past assistant turns"):
        check_template_extends(tokenizer)


def test_config_errors_name_the_fix(tiny, tmp_path):
    with pytest.raises(UserError, match="key 'rlm.temperature'.*advantage is 0"):
        _cfg(tiny, tmp_path, "rlm.temperature=0")
    from rlm_train.train.grpo_config import check_config

    with pytest.raises(UserError, match="rollout.backend=vllm_server"):
        check_config(_cfg(tiny, tmp_path, "launch.num_processes=2"), "r.yaml")
    with pytest.raises(UserError, match="multiple of num_generations"):
        _cfg(tiny, tmp_path, "training.batch_size=4")
    with pytest.raises(UserError, match="unknown key 'rollout.backnd'"):
        _cfg(tiny, tmp_path, "rollout.backnd=x")


def test_gpu_recipe_fails_fast_without_gpu_or_vllm(tiny, tmp_path):
    from rlm_train.train.grpo import run_grpo
    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.runtime import cuda_count

    if cuda_count() > 0:
        pytest.skip("this machine has a GPU")
    cfg = load_config(GRPOConfig, REPO / "recipes" / "qwen3-8b-grpo.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="CUDA GPU"):
        run_grpo(cfg, "qwen3-8b-grpo.yaml")
    cpu_vllm = _cfg(tiny, tmp_path / "o", "rollout.backend=vllm_server")
    with pytest.raises(UserError, match="vllm"):
        run_grpo(cpu_vllm, "tiny")
    assert not (tmp_path / "o").exists()  # stopped before writing anything


def test_bf16_on_cpu_warns_in_grpo_as_in_sft(tmp_path, capsys):
    """bf16 on a CPU is slow, not broken: GRPO warns and goes on, as SFT does (it used to refuse,
    matching the warning by its text)."""
    from rlm_train.train import grpo, sft
    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.runtime import Problem, start_run

    grpo_cfg = GRPOConfig(model="m", prompts="p.jsonl", output_dir=str(tmp_path), device="cpu", dtype="bfloat16")
    sft_cfg = sft.SFTConfig(model="m", dataset="d.jsonl", output_dir=str(tmp_path), device="cpu", dtype="bfloat16")
    problems = grpo.resource_problems(grpo_cfg)
    assert problems == sft.resource_problems(sft_cfg)
    assert [p.fatal for p in problems] == [False] and "bf16 on this CPU" in problems[0].message
    assert start_run(problems, None, "cpu", "r.yaml", "grpo") == "cpu"
    assert "[grpo] warning: bf16 on this CPU" in capsys.readouterr().out
    with pytest.raises(UserError, match="r.yaml: needs a GPU"):
        start_run([*problems, Problem("needs a GPU")], None, "cpu", "r.yaml", "grpo")


@pytest.mark.parametrize("recipe", GRPO_RECIPES, ids=lambda p: p.name)
def test_grpo_recipes_dry_run(recipe, rlm_cli):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "grpo" in first  # headed by the command that launches it
    proc = subprocess.run([*rlm_cli, "grpo", "--recipe", str(recipe), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "grpo plan" in proc.stdout and "REPL output tokens masked" in proc.stdout
    if "vllm_server" in recipe.read_text():
        assert "vllm serve" in proc.stdout and "--weight-transfer-config" in proc.stdout


def test_slurm_launch_renders_the_grpo_job_and_its_vllm_command(rlm_cli, tmp_path):
    """The GRPO job as `rlm-train launch` renders it from the recipe alone (one node: the vLLM server
    on rollout.vllm_gpus GPUs, training on the rest), and the server line the job asks the CLI for.
    Every template in every variant: tests/test_launch.py."""
    proc = subprocess.run([*rlm_cli, "launch", "--recipe", "recipes/qwen3-8b-grpo.yaml", "--slurm", "--dry-run",
                           "--out", str(tmp_path / "launch")], cwd=REPO, capture_output=True, text=True, timeout=120)
    # Launched alone, its inputs come from no stage of the launch, and this venv has no vLLM: the dry
    # run says so (a real launch refuses) and still renders the script.
    problems = [line for line in proc.stderr.splitlines() if line.startswith("rlm-train launch: stage grpo: ")]
    if importlib.util.find_spec("vllm") is None:
        assert "needs the vllm package" in problems.pop(0), proc.stderr
    assert proc.returncode == 1 and len(problems) == 2, proc.stderr
    assert "sft-lora/merged: not found here" in problems[0] and "data-rl/rl: not found here" in problems[1]
    script = proc.stdout
    assert "#SBATCH --gpus-per-node=8" in script and "VLLM_NODES=0" in script and "VLLM_GPUS=2" in script
    assert 'rlm grpo --recipe "$RECIPE" --vllm-command' in script and "-m accelerate.commands.launch" in script
    assert not (tmp_path / "launch").exists()  # a dry run writes nothing
    cmd = subprocess.run([*rlm_cli, "grpo", "--recipe", "recipes/qwen3-8b-grpo.yaml", "--vllm-command"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cmd.returncode == 0 and cmd.stdout.startswith("env VLLM_SERVER_DEV_MODE=1 vllm serve ")


def test_prompt_set_from_filter_dataset(tmp_path):
    """The RL prompt set as `rlm-train filter` writes it: prompt + task_id + task (JSON), save_to_disk."""
    from datasets import Dataset

    from rlm_train.rollouts.rl_prompts import load_context, load_prompt_set
    from rlm_train.train.grpo_config import GRPORLMConfig

    task = {**_task("harbor", "7421")}
    context = task.pop("context")
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "harbor.txt").write_text(context)
    task["context_path"] = "ctx/harbor.txt"
    rows = [{"prompt": [{"role": "user", "content": "q"}], "task_id": task["id"], "task": json.dumps(task)}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "rl"))
    (tmp_path / "rl" / "ctx").symlink_to(tmp_path / "ctx")
    ps = load_prompt_set(tmp_path / "rl", GRPORLMConfig())
    assert ps.rows == [{"prompt": rows[0]["prompt"], "task_id": "needle-harbor"}]
    assert load_context(ps.tasks["needle-harbor"], ps.base_dirs["needle-harbor"]) == context
    # A task file works directly too; its prompt column is what the RLM loop will send first.
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(_task("meadow", "3906")) + "\n")
    ps = load_prompt_set(tasks, GRPORLMConfig())
    assert [m["role"] for m in ps.rows[0]["prompt"]] == ["system", "user"]
    assert "magic number for meadow" in ps.rows[0]["prompt"][1]["content"]
    with pytest.raises(UserError, match="no 'answer'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({k: v for k, v in _task("x", "1").items() if k != "answer"}) + "\n")
        load_prompt_set(bad, GRPORLMConfig())


def test_rl_prompt_set_round_trip(tmp_path):
    """What `rlm-train filter` writes (rows naming their task file and id), `rlm-train grpo` reads back."""
    from rlm_train.rollouts.rl_prompts import load_prompt_set, write_rl_prompt_set
    from rlm_train.train.grpo_config import GRPORLMConfig

    task = _task("harbor", "7421")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(task) + "\n")
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "query": task["query"],
           "task_id": task["id"], "task_file": str(tasks), "family": "niah", "scorer": "all_strings",
           "answer_json": json.dumps(task["answer"]), "pass_rate": 0.5, "episodes": 2}
    out = tmp_path / "data"
    out.mkdir()
    write_rl_prompt_set(out, {"train": [row], "validation": []})
    assert (out / "rl-validation.jsonl").read_text() == ""
    for source in (out / "rl", out / "rl-train.jsonl"):
        ps = load_prompt_set(source, GRPORLMConfig())
        assert ps.rows == [{"prompt": row["prompt"], "task_id": task["id"]}]
        assert ps.tasks == {task["id"]: task} and ps.base_dirs[task["id"]] == tmp_path


def test_vllm_server_window_fits_every_request_an_episode_may_send():
    """The GRPO vLLM server's --max-model-len comes from the RLM config: the longest sub-call
    the loop lets through fits, so an ordinary llm_query is never refused for its length."""
    from rlm_train.config import load_config
    from rlm_train.rlm.window import server_window_tokens, sub_call_tokens
    from rlm_train.train.grpo import vllm_serve_command
    from rlm_train.train.grpo_config import GRPOConfig, completion_token_cap

    cfg = load_config(GRPOConfig, "recipes/qwen3-8b-grpo.yaml")
    words = vllm_serve_command(cfg).split()
    window = int(words[words.index("--max-model-len") + 1])
    assert window >= server_window_tokens(cfg.rlm) >= sub_call_tokens(cfg.rlm)
    assert window >= completion_token_cap(cfg) + 2048
