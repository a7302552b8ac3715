"""One process of the two-rank GRPO test (started by torchrun on CPU, gloo).

    torchrun --nproc-per-node 2 tests/grpo_worker.py OUT_DIR MODEL_DIR TASKS_FILE SERVER_URL

Phase 1, the weight push against the test's mock of TRL's vLLM server endpoints (SERVER_URL): TRL's
own `VLLMGeneration.sync_weights` (built without vLLM: a plain HTTP client stands in for the NCCL
transfer on rank 0) wrapped by `install_ordered_weight_sync`; each step every rank then sends
generation requests, tagged with its rank and step, through the rollout's vLLM backend.

Phase 2, a real `run_grpo` with both ranks (scripted token generation). Every write of a rollout
record, a JSON file or a saved model is noted with the rank that made it, in OUT_DIR/audit-rankR.txt.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def audit_writes(out: Path) -> None:
    """Note every write the run makes (rank, what, path), without changing it."""
    import pathlib

    import transformers

    import rlm_train.formats as formats

    log = out / f"audit-rank{RANK}.txt"

    def note(kind: str, path: object) -> None:
        with open(log, "a") as fh:
            fh.write(f"{RANK}\t{kind}\t{path}\n")

    def wrap(owner: object, name: str, kind: str, path_arg: int) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            note(kind, args[path_arg] if len(args) > path_arg else kwargs.get("save_directory"))
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    wrap(formats, "append_jsonl", "append_jsonl", 0)
    wrap(pathlib.Path, "write_text", "write_text", 0)
    wrap(transformers.PreTrainedModel, "save_pretrained", "save_model", 1)
    wrap(transformers.PreTrainedTokenizerBase, "save_pretrained", "save_tokenizer", 1)
    from peft import PeftModel

    wrap(PeftModel, "save_pretrained", "save_adapter", 1)


class PushOverHTTP:
    """Rank 0's client to the mock server: announces, streams (a checksum over HTTP in place of the NCCL
    broadcast, slowly, so a rank that does not wait would be seen generating during the push), finishes."""

    def __init__(self, base_url: str):
        import requests

        self.base_url = base_url
        self.session = requests.Session()
        self.step = 0

    def update_named_params(self, metadata, named_params):
        self.session.post(f"{self.base_url}/start_weight_update", json={"step": self.step})
        total = sum(float(t.double().sum()) for _, t in named_params)
        time.sleep(0.5)
        self.session.post(f"{self.base_url}/update_weights", json={"step": self.step, "sum": total, "n": len(metadata)})
        self.session.post(f"{self.base_url}/finish_weight_update", json={"step": self.step})

    def reset_prefix_cache(self):  # TRL's behaviour: post, ignore the answer (replaced by the checked reset)
        self.session.post(f"{self.base_url}/reset_prefix_cache")


class TaggedCompletions:
    """The rollout's view of the server: /v1/completions, tagged with this rank and step."""

    def __init__(self, base_url: str):
        import requests

        self.base_url, self.session, self.step = base_url, requests.Session(), 0

    def generate(self, prompts, n, temperature, top_p, top_k, max_tokens, logprobs, generation_kwargs):
        body = {"prompt": prompts, "max_tokens": max_tokens, "rank": RANK, "step": self.step, **generation_kwargs}
        choices = self.session.post(f"{self.base_url}/v1/completions", json=body).json()["choices"]
        return {"completion_ids": [c["token_ids"] for c in choices], "logprobs": None}


def phase_ordered_push(model_dir: Path, url: str) -> None:
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    from rlm_train.models.base import SamplingParams
    from rlm_train.models.loading import load_causal_lm
    from rlm_train.train.grpo_backends import VLLMServerBackend
    from rlm_train.train.trl_compat import install_ordered_weight_sync

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    generation = VLLMGeneration.__new__(VLLMGeneration)  # TRL's sync logic without starting vLLM
    generation.mode, generation.model, generation.accelerator = "server", model, accelerator
    generation._dist, generation._weight_metadata, generation.enable_sleep_mode = DistributedBackend(accelerator), None, False
    if accelerator.is_main_process:
        generation.vllm_client = PushOverHTTP(url)
    install_ordered_weight_sync(generation, accelerator, reset_timeout_s=20)
    completions = TaggedCompletions(url)
    backend = VLLMServerBackend(completions, [7])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for step in range(3):
        completions.step = step
        if accelerator.is_main_process:
            generation.vllm_client.step = step
        generation.sync_weights()
        backend.generate_batch([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=1.0))
        accelerator.wait_for_everyone()  # the training step: every rank has its episodes before the next push
    unchanged = all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    (OUT / f"push-rank{RANK}.json").write_text(json.dumps({"base_unchanged": unchanged}))


class Scripted:
    """Right answer for the first episode of a group, wrong for the others (rewards differ)."""

    def __init__(self, tokenizer, stop_id: int):
        self.tokenizer, self.stop_id, self.counts = tokenizer, stop_id, Counter()

    def generate_batch(self, prompts, sampling):
        from rlm_train.train.grpo_backends import GenOutput

        outs = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            key = text.split("magic number for ")[1].split("?")[0]
            if ids.count(self.stop_id) == 2:  # turn 0
                self.counts[key] += 1
                reply = f"```repl\n# {'right' if self.counts[key] % 3 == 1 else 'wrong'}\nprint(len(context))\n```"
            else:
                answer = {"harbor": "7421", "meadow": "3906"}[key] if "# right" in text else "0000"
                reply = f"```repl\nFINAL('{answer}')\n```"
            outs.append(GenOutput(self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.stop_id]))
        return outs


def phase_run_grpo(model_dir: Path, tasks: Path) -> None:
    from rlm_train.config import load_config
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.train.grpo import run_grpo
    from rlm_train.train.grpo_config import GRPOConfig

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(GRPOConfig, repo / "recipes" / "tiny-cpu-grpo.yaml", [
        f"model={model_dir}", f"prompts={tasks}", f"output_dir={OUT / 'run'}", "training.max_steps=2",
        "training.batch_size=3", "training.save_steps=1", "rollout.sub_policy=scripted", "reward.format_weight=0"])
    tokenizer = load_tokenizer(model_dir)
    scripted = Scripted(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    summary = run_grpo(cfg, "two-ranks", backend_factory=lambda trainer: scripted)
    with open(OUT / f"summary-rank{RANK}.json", "w") as fh:  # not through the audited Path.write_text
        json.dump({"global_step": summary["global_step"]}, fh)


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    model_dir, tasks, url = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    phase_ordered_push(model_dir, url)
    audit_writes(OUT)
    phase_run_grpo(model_dir, tasks)
