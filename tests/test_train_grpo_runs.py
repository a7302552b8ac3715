"""Real GRPOTrainer runs on tiny random models (scripted token generators stand in for sampling, so
rewards and lengths are known): Gemma-3's end-of-turn token ends episodes for TRL too, an SFT adapter's
LoRA dropout is switched off, over-long episodes are masked, and a crashed run resumes where its last
checkpoint left it with every rollout logged once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.records import Outcome

REPO = Path(__file__).resolve().parents[1]
NEEDLES = {"harbor": "7421", "meadow": "3906"}


def _task(key: str, value: str) -> dict:
    context = "Filler sentence. " * 8 + f"The special magic number for {key} is: {value}. " + "More filler. " * 4
    return {"schema": "rlm-train/task/v1", "id": f"needle-{key}", "family": "niah",
            "query": f"What is the special magic number for {key}?", "context": context,
            "answer": [value], "scorer": "all_strings", "meta": {}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlm_train.testing.tiny_models import build_tiny_gemma3, build_tiny_qwen3

    root = tmp_path_factory.mktemp("grpo-runs")
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(_task(k, v)) + "\n" for k, v in NEEDLES.items()))
    return {"root": root, "qwen": build_tiny_qwen3(root / "qwen"), "gemma": build_tiny_gemma3(root / "gemma"),
            "tasks": tasks}


def _cfg(model: Path, tasks: Path, out: Path, *overrides: str):
    from rlm_train.train.grpo_config import GRPOConfig

    return load_config(GRPOConfig, REPO / "recipes" / "tiny-cpu-grpo.yaml",
                       [f"model={model}", f"prompts={tasks}", f"output_dir={out}", "reward.format_weight=0",
                        "rollout.sub_policy=scripted", *overrides])


class ScriptedTurns:
    """Stands in for sampling: per group, plan 0 answers right, plan 1 wrong, plan 2 calls llm_query (over-long
    where rlm.max_subcalls=0 refuses it: an episode budget; otherwise it answers right next turn). The turn is read
    from the count of stop tokens in the prompt; the plan from arrival order at turn 0 and a marker in the model's
    first turn."""

    def __init__(self, tokenizer, stop_id: int, first_prompt_stops: int):
        self.tokenizer, self.stop_id, self.base = tokenizer, stop_id, first_prompt_stops
        self.counts: Counter[str] = Counter()
        self.batches: list[tuple[int, float]] = []  # (requests, temperature) of each call

    def text(self, prompt: str, turn: int) -> str:
        key = next(k for k in NEEDLES if f"magic number for {k}" in prompt)
        if turn == 0:
            plan = self.counts[key] % 3
            self.counts[key] += 1
            code = "llm_query('What is the number?')" if plan == 2 else "print(len(context))"
            return f"```repl\n# plan {plan}\n{code}\n```"
        if "# plan 1" in prompt:
            return "```repl\nFINAL('0000')\n```"
        return f"```repl\nFINAL('{NEEDLES[key]}')\n```"

    def generate_batch(self, prompts, sampling):
        from rlm_train.train.grpo_backends import GenOutput

        self.batches.append((len(prompts), sampling.temperature))
        outs = []
        for ids in prompts:
            text = self.text(self.tokenizer.decode(ids), (ids.count(self.stop_id) - self.base) // 2)
            outs.append(GenOutput(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop_id]))
        return outs


def _sft_adapter(model_dir: Path, out: Path, dropout: float) -> Path:
    """An adapter as SFT leaves it (with LoRA dropout on), with the base recorded beside it."""
    from peft import LoraConfig, get_peft_model

    from rlm_train.models.loading import load_causal_lm, write_adapter_meta

    peft_model = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out)
    write_adapter_meta(out, str(model_dir), "auto")
    return out


@pytest.mark.slow
def test_gemma3_grpo_step_trains_on_turns_that_end_at_end_of_turn(tiny, tmp_path):
    """Gemma-3 ends turns with <end_of_turn> (106) while its generation_config lists only <eos> (1).
    TRL must count 106 as the end of a completion, or every episode reads as truncated."""
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.train.grpo import run_grpo
    from rlm_train.train.grpo_setup import stop_token_ids

    tokenizer = load_tokenizer(tiny["gemma"])
    stops = stop_token_ids(tokenizer, tiny["gemma"])
    assert stops[:2] == [106, 1]
    adapter = _sft_adapter(tiny["gemma"], tmp_path / "sft-adapter", dropout=0.1)
    cfg = _cfg(tiny["gemma"], tiny["tasks"], tmp_path / "out", "training.max_steps=1", f"adapter={adapter}",
               "lora.r=4", "lora.alpha=8", "rlm.max_subcalls=0", "save_merged=true", "merged_dtype=float32")
    backend = ScriptedTurns(tokenizer, 106, first_prompt_stops=1)
    seen: dict = {}
    summary = run_grpo(cfg, "test", backend_factory=lambda trainer: backend,
                       on_batch=lambda output, extra: seen.update(output=output, inputs=extra["inputs"]),
                       on_trainer=lambda trainer: seen.update(trainer=trainer))
    trainer, output, inputs = seen["trainer"], seen["output"], seen["inputs"]
    assert summary["global_step"] == 1
    assert {106, 1} <= set(trainer.eos_token_ids)

    # LoRA dropout of the SFT adapter is off in the model being trained.
    import torch

    dropouts = [m for n, m in trainer.model.named_modules() if n.split(".")[-2:-1] == ["lora_dropout"]]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)

    episodes = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").open()}
    loss_mask = (output["completion_mask"] * output["tool_mask"]).sum(dim=1).tolist()
    advantages = output["advantages"].tolist()
    ends = Counter()
    for i, inp in enumerate(inputs):
        ep = episodes[inp["rlm_episode_id"]]
        ends[ep["end"]] += 1
        if ep["end"] == "ok":
            # Ends on 106, counted as a proper end by TRL: trained, with a non-zero advantage.
            assert output["completion_ids"][i][int(output["completion_mask"][i].sum()) - 1] == 106
            assert loss_mask[i] > 0 and abs(advantages[i]) > 0.1
        else:  # over-long by the sub-call budget (overlong=mask): no loss, no advantage, no reward
            assert ep["end"] == "overlong" and ep["outcome"] == Outcome.BUDGET and loss_mask[i] == 0 and advantages[i] == 0
            assert ep["rewards"]["task_score"] is None
    assert ends == {"ok": 4, "overlong": 2}
    # The two ok episodes of a group share the baseline without the over-long one: +1 and -1 (std-scaled).
    ok_adv = sorted(round(a, 3) for a, inp in zip(advantages, inputs) if episodes[inp["rlm_episode_id"]]["end"] == "ok")
    assert ok_adv[0] == ok_adv[1] == -ok_adv[2] == -ok_adv[3]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    clipped = [m["completions/clipped_ratio"] for m in metrics if "completions/clipped_ratio" in m]
    assert clipped == [0.0]  # every episode ends on 106, and none reads as truncated
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_continues_the_step_count_and_logs_each_rollout_once(tiny, tmp_path):
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.train.grpo import run_grpo

    tokenizer = load_tokenizer(tiny["qwen"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = tmp_path / "out"
    overrides = ("training.max_steps=4", "training.save_steps=2")
    cfg = _cfg(tiny["qwen"], tiny["tasks"], out, *overrides)

    class Crash(Exception):
        pass

    def crash_at_step_3(output, extra):
        if seen["trainer"].state.global_step == 3:
            raise Crash()  # the batch of step 4 is generated and logged; its checkpoint will never be written

    seen: dict = {}
    with pytest.raises(Crash):
        run_grpo(cfg, "test", backend_factory=lambda trainer: ScriptedTurns(tokenizer, im_end, 2),
                 on_batch=crash_at_step_3, on_trainer=lambda trainer: seen.update(trainer=trainer))
    rollouts = out / "rollouts.jsonl"
    before = Counter(json.loads(line)["grpo_step"] for line in rollouts.open())
    assert before == {0: 6, 1: 6, 2: 6, 3: 6} and (out / "checkpoint-2").is_dir()
    partial = json.loads((out / "adapter" / "partial.json").read_text())  # the newest checkpoint's adapter
    assert partial["step"] == 2 and partial["stopped_by"].startswith("Crash")

    # A different config is refused before any model loads, naming the key.
    changed = _cfg(tiny["qwen"], tiny["tasks"], out, *overrides, "training.learning_rate=0.5")
    with pytest.raises(UserError, match="training.learning_rate"):
        run_grpo(changed, "test")
    with pytest.raises(UserError, match="resume=never"):
        run_grpo(_cfg(tiny["qwen"], tiny["tasks"], out, *overrides, "resume=never"), "test")

    summary = run_grpo(cfg, "test", backend_factory=lambda trainer: ScriptedTurns(tokenizer, im_end, 2))
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    records = [json.loads(line) for line in rollouts.open()]
    assert Counter(r["grpo_step"] for r in records) == {0: 6, 1: 6, 2: 6, 3: 6}
    assert len({r["id"] for r in records}) == 24
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]


def test_weight_push_merges_lora_out_of_place(tiny):
    """The tensors pushed to vLLM are TRL's names with base + delta, computed without writing the base:
    TRL's merge/unmerge in place drifts a bf16 base; ours leaves it bit-identical however often it runs."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    from rlm_train.models.loading import load_causal_lm
    from rlm_train.train.grpo_weight_sync import iter_merged_params

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny["qwen"], dtype="bfloat16"),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    trl_side = VLLMGeneration.__new__(VLLMGeneration)
    trl_side.model, trl_side._dist = model, DistributedBackend(Accelerator(cpu=True))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ours = {}
    for _ in range(20):
        ours = {n: t.clone() for n, t in iter_merged_params(model, trl_side._fix_param_name_to_vllm)}
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    theirs = {n: t.clone() for n, t in trl_side._iter_named_params()}
    assert list(ours) == list(theirs)  # the names vLLM expects, in TRL's order
    for name in ours:
        assert torch.allclose(ours[name].float(), theirs[name].float(), atol=1e-2, rtol=1e-2), name
    for _ in range(20):
        list(trl_side._iter_named_params())
    drifted = sum(not torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert drifted > 0  # what the out-of-place merge avoids


def test_adapter_of_another_base_is_refused_before_loading(tiny, tmp_path):
    from rlm_train.train.grpo import run_grpo

    adapter = _sft_adapter(tiny["qwen"], tmp_path / "qwen-adapter", dropout=0.0)
    cfg = _cfg(tiny["gemma"], tiny["tasks"], tmp_path / "out", f"adapter={adapter}")
    with pytest.raises(UserError, match="different base model"):
        run_grpo(cfg, "test")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_held_out_score_is_logged_and_the_best_checkpoint_is_kept(tiny, tmp_path):
    """Held-out RLM episodes (the model being trained as the root policy, generated through the rollouts' backend,
    several at once, through the eval code) every step: eval_rlm_score and its per-family score in metrics.jsonl,
    and adapter/ holds the best step's weights."""
    from safetensors.torch import load_file

    from rlm_train.models.loading import load_tokenizer
    from rlm_train.train.grpo import run_grpo

    tokenizer = load_tokenizer(tiny["qwen"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = tmp_path / "out"
    cfg = _cfg(tiny["qwen"], tiny["tasks"], out, "training.max_steps=2", "training.save_steps=1",
               "training.save_total_limit=null", "evaluation.every_steps=1", f"evaluation.tasks=[{tiny['tasks']}]",
               "evaluation.rlm.max_iterations=1", "evaluation.rlm.root_max_tokens=8")
    seen: dict = {}
    backend = ScriptedTurns(tokenizer, im_end, 2)
    run_grpo(cfg, "test", backend_factory=lambda trainer: backend, on_trainer=lambda trainer: seen.update(trainer=trainer))
    # The held-out episodes (greedy) went through the same backend as the rollouts (sampled), both tasks' turns
    # in one call: not one episode at a time through HF generate.
    assert max(n for n, temperature in backend.batches if temperature == 0) == 2
    assert max(n for n, temperature in backend.batches if temperature > 0) == 6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    scores = {m["step"]: m["eval_rlm_score"] for m in metrics if "eval_rlm_score" in m}
    assert sorted(scores) == [1, 2]
    assert all("eval_rlm_score/niah" in m for m in metrics if "eval_rlm_score" in m)
    best = max(scores, key=lambda step: (scores[step], -step))  # ties keep the earlier checkpoint
    assert seen["trainer"].state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    kept = load_file(out / "adapter" / "adapter_model.safetensors")
    at_best = load_file(out / f"checkpoint-{best}" / "adapter_model.safetensors")
    at_other = load_file(out / f"checkpoint-{3 - best}" / "adapter_model.safetensors")
    assert all((kept[k] == at_best[k]).all() for k in kept)
    assert any((kept[k] != at_other[k]).any() for k in kept)


# A `rlm-train grpo` process whose step-2 rollout is under way (a generation call lasting GENERATION_S, the
# episodes' sandboxes open) when SIGTERM comes; the scripted backend stands in for sampling, as above.
GENERATION_S = 8.0
_SIGTERM_DRIVER = """
import json, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import test_train_grpo_runs as t
from rlm_train import cli
from rlm_train.models.loading import load_tokenizer
from rlm_train.repl import REPLSession
import rlm_train.train.grpo as grpo

model, tasks, out, generation_s = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
sessions = {"opened": 0, "closed": 0}
opened, closed = REPLSession.__init__, REPLSession.close

def counted_init(self, *args, **kwargs):
    opened(self, *args, **kwargs)
    sessions["opened"] += 1

def counted_close(self):
    sessions["closed"] += not self._closed
    closed(self)

REPLSession.__init__, REPLSession.close = counted_init, counted_close
tokenizer = load_tokenizer(model)
im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

class SlowSecondStep(t.ScriptedTurns):
    def __init__(self, trainer):
        super().__init__(tokenizer, im_end, 2)
        self.trainer = trainer

    def generate_batch(self, prompts, sampling):
        turns = {(ids.count(self.stop_id) - self.base) // 2 for ids in prompts}
        if self.trainer.state.global_step == 1 and 1 in turns:  # step 2, turn 2: every episode's sandbox is open
            print("ROLLOUT-UNDER-WAY", flush=True)
            time.sleep(generation_s)
        return super().generate_batch(prompts, sampling)

grpo.default_backend_factory = lambda cfg, tokenizer, stop_ids: SlowSecondStep
code = cli.main(["grpo", "--recipe", str(t.REPO / "recipes" / "tiny-cpu-grpo.yaml"), f"model={model}",
                 f"prompts={tasks}", f"output_dir={out}", "reward.format_weight=0", "rollout.sub_policy=scripted",
                 "rollout.max_completion_tokens=null", "training.max_steps=4", "training.save_steps=100"])
time.sleep(1.0)  # sandboxes close in background threads
print("SESSIONS " + json.dumps(sessions), flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_sigterm_during_a_rollout_abandons_the_step_and_the_rerun_resumes(tiny, tmp_path):
    """SIGTERM while a GRPO step's episodes run: the step is dropped at once (episodes cancelled, sandboxes
    closed), the last completed step is checkpointed and its adapter exported as a partial result, the process
    exits 143 (128 + SIGTERM) long before the step would have ended; the same command then resumes there."""
    import signal
    import subprocess
    import sys
    import time

    from rlm_train.models.loading import load_tokenizer
    from rlm_train.train.grpo import run_grpo

    out = tmp_path / "out"
    log = tmp_path / "grpo.log"
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_DRIVER, str(REPO / "tests"), str(tiny["qwen"]),
                             str(tiny["tasks"]), str(out), str(GENERATION_S)], cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "ROLLOUT-UNDER-WAY" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    partial = out / "adapter" / "partial.json"
    while not partial.is_file() and time.monotonic() - sent < 60:
        time.sleep(0.05)
    exported_s = time.monotonic() - sent
    proc.wait(timeout=120)
    exited_s = time.monotonic() - sent
    text = log.read_text()
    print(f"SIGTERM -> checkpoint and adapter/ in {exported_s:.1f} s, exit in {exited_s:.1f} s "
          f"(the generation call under way lasts {GENERATION_S:g} s)")
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert exported_s < GENERATION_S / 2  # did not wait for the generation call, let alone the step
    assert exited_s < GENERATION_S + 15  # only that call, still running in its thread, delays the exit
    assert "Traceback" not in text
    sessions = json.loads(text.split("SESSIONS ", 1)[1].splitlines()[0])
    assert sessions["opened"] == 12 and sessions["closed"] == 12  # step 1's six and the abandoned step's six
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["global_step"] == 1 and summary["partial_step"] == 1
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and not (out / "checkpoint-2").exists()
    assert json.loads(partial.read_text())["step"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "checkpoint-1" / "adapter_model.safetensors").read_bytes()
    assert "partial result" in text and "run the same command again to resume" in text

    # The rerun resumes at step 1: step 2 is trained again, every rollout is logged once, the final adapter
    # replaces the partial one.
    tokenizer = load_tokenizer(tiny["qwen"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = _cfg(tiny["qwen"], tiny["tasks"], out, "rollout.max_completion_tokens=null", "training.max_steps=3",
               "training.save_steps=100")
    summary = run_grpo(cfg, "test", backend_factory=lambda trainer: ScriptedTurns(tokenizer, im_end, 2))
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["global_step"] == 3
    assert summary["exit_code"] == 0 and not partial.exists()
    assert Counter(json.loads(line)["grpo_step"] for line in (out / "rollouts.jsonl").open()) == {0: 6, 1: 6, 2: 6}
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in m] == [1, 2, 3]
