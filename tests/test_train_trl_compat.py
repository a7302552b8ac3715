"""rlm_train/train/trl_compat.py against the installed TRL: one test per function, each failing when the
TRL (or transformers / accelerate) internal it relies on is gone, renamed, or behaves differently.

The GRPO ones train one real step of TRL's GRPOTrainer on a tiny random Qwen3-shaped model, with a
rollout_func that returns fixed tokens (a stand-in for RLM episodes: the hook, not the episodes, is tested)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest

from rlm_train.train import trl_compat

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("trl-compat") / "model")


class Seen:
    """What the hooks saw during the one GRPO step."""

    def __init__(self):
        self.rows_in_rollout: list = []
        self.after_scoring: list = []
        self.logps: list = []
        self.manual_logps: list = []


def _manual_logps(model, ids, attention, n: int, temperature: float):
    """Per-token logprobs of the last n tokens, computed directly from the model's logits."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -n - 1:-1, :] / temperature
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, -n:].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def grpo_step(tiny, tmp_path_factory):
    """One real GRPO step through trl_compat's hook class; returns (trainer, what the hooks saw)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    out = tmp_path_factory.mktemp("grpo-step")
    trl_compat.silence_rollout_func_notice()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.generation_config.eos_token_id = [3, 5]
    seen = Seen()

    def rollout_func(prompts, trainer):
        seen.rows_in_rollout.append(list(trainer.rlm_batch_rows))
        n = len(prompts)
        return {"prompt_ids": [[10, 11, 12]] * n, "completion_ids": [[20 + i, 30 + i, 3] for i in range(n)],
                "logprobs": [[-1.0, -1.0, -1.0]] * n}

    class Recording(trl_compat.grpo_trainer_with_batch_hook()):
        def after_scoring(self, rows, batch):
            seen.after_scoring.append((rows, dict(batch)))
            trl_compat.metrics(self)["compat/probe"].append(0.25)
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            n = batch["completion_ids"].size(1)
            seen.logps.append(trl_compat.trainer_logps(self, ids, attention, n))
            seen.manual_logps.append(_manual_logps(self.model, ids, attention, n, self.args.temperature))

    rows = [{"prompt": f"question {i}", "task_id": f"t{i}"} for i in range(2)]
    args = GRPOConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                      learning_rate=1e-3, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                      logging_steps=1, temperature=0.7, remove_unused_columns=False, max_completion_length=8)
    trainer = Recording(model=model, reward_funcs=[lambda completions, **kw: [float(i) for i in range(len(completions))]],
                        args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                        rollout_func=rollout_func)
    trainer.train()
    return trainer, seen


def test_written_for_the_installed_and_pinned_trl():
    assert metadata.version("trl") == trl_compat.WRITTEN_FOR
    assert trl_compat.version_warning() is None
    assert f'"trl=={trl_compat.WRITTEN_FOR}"' in (REPO / "pyproject.toml").read_text()


def test_batch_hook_gives_rollout_func_the_rows_and_after_scoring_the_scored_batch(grpo_step):
    trainer, seen = grpo_step
    # TRL repeats a prompt num_generations (2) times in a batch; the rows keep every other column.
    assert len(seen.rows_in_rollout) == 1 and len(seen.rows_in_rollout[0]) == 2
    assert {(r["prompt"], r["task_id"]) for r in seen.rows_in_rollout[0]} in ({("question 0", "t0")},
                                                                            {("question 1", "t1")})
    rows, batch = seen.after_scoring[0]
    assert rows == seen.rows_in_rollout[0]
    # The keys shape_the_loss reads and rewrites.
    for key in ("advantages", "completion_mask", "num_items_in_batch", "prompt_ids", "prompt_mask", "completion_ids",
                "sampling_per_token_logps"):
        assert key in batch, key
    assert batch["advantages"].shape == (len(rows),)
    assert trainer.rlm_batch_rows is None  # cleared once the batch is scored


def test_metrics_appended_reach_the_log(grpo_step):
    trainer, _ = grpo_step
    logged = [h for h in trainer.state.log_history if "compat/probe" in h]
    assert logged and logged[0]["compat/probe"] == pytest.approx(0.25)
    assert trl_compat.has_metrics(trainer) and not trl_compat.has_metrics(object())


def test_eos_token_ids_are_trls_truncation_set_from_the_generation_config(grpo_step):
    from trl import GRPOTrainer

    trainer, _ = grpo_step
    assert {3, 5} <= set(trl_compat.eos_token_ids(trainer))  # with the tokenizer's EOS, which TRL adds
    assert "torch.isin(completion_ids, torch.tensor(self.eos_token_ids" in inspect.getsource(GRPOTrainer)


def test_trainer_logps_are_the_models_at_trls_temperature(grpo_step):
    _, seen = grpo_step
    ours, manual = seen.logps[0], seen.manual_logps[0]
    assert ours.shape == manual.shape == (2, 3)
    assert (ours - manual).abs().max().item() < 1e-4


def test_unwrap_for_generation_gives_a_model_that_generates(grpo_step):
    import torch

    trainer, _ = grpo_step
    with trl_compat.unwrap_for_generation(trainer) as model, torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[10, 11]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] >= 3


def test_save_checkpoint_writes_the_current_step(grpo_step):
    trainer, _ = grpo_step
    trl_compat.save_checkpoint(trainer)
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == trainer.state.global_step
    assert (checkpoint / "optimizer.pt").is_file()


def test_declare_loss_scaled_stops_gradient_accumulation_dividing_again(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class FixedLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return sum(p.sum() for p in model.parameters()) * 0 + 3.0

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, gradient_accumulation_steps=2, report_to="none")
    losses = {}
    for declared in (False, True):
        trainer = FixedLoss(model=model, args=args)
        trainer.model_accepts_loss_kwargs = False
        if declared:
            trl_compat.declare_loss_scaled(trainer)
        trainer.current_gradient_accumulation_steps = 2
        losses[declared] = trainer.training_step(model, {"input_ids": torch.tensor([[1, 2]])}).item()
    assert losses == {False: pytest.approx(1.5), True: pytest.approx(3.0)}


def test_silencing_uses_the_variable_trl_reads():
    from trl import GRPOTrainer

    assert "TRL_EXPERIMENTAL_SILENCE" in inspect.getsource(GRPOTrainer.__init__)


def test_trl_pushes_before_a_custom_rollout_unless_tagged_for_the_step():
    """push_weights_now relies on TRL pushing at most once per step, by `_last_loaded_step`."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate)
    assert "self.rollout_func(prompts, self)" in source
    assert "self.state.global_step != self._last_loaded_step" in source
    assert "self.vllm_generation.sync_weights()" in source
    assert "self._last_loaded_step = -1" in inspect.getsource(GRPOTrainer.__init__)


class _PrefixCacheServer:
    """A stand-in for vLLM's /reset_prefix_cache (and a 400 / 503 on /v1/completions) on 127.0.0.1."""

    def __init__(self):
        self.resets = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/reset_prefix_cache":
                    owner.resets += 1
                    status, body = 200, b'{"success": true}'
                elif self.path == "/v1/completions" and owner.completions_status:
                    status, body = owner.completions_status, b'{"error": "prompt is longer than the window"}'
                else:
                    status, body = 404, b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.completions_status = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _PrefixCacheServer()
    yield s
    s.close()


def test_ordered_weight_sync_wraps_trls_real_sync_weights(tiny, server):
    """TRL's own VLLMGeneration.sync_weights, patched by install_ordered_weight_sync: the LoRA merged out of
    place goes to the client under vLLM's names, the checked reset reaches the server, then the barrier."""
    import requests
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pushed: dict = {}
    barriers: list = []

    class Client:  # TRL's VLLMClient without the NCCL transfer: records what would be broadcast
        session = requests.Session()
        base_url = server.url

        def update_named_params(self, metadata, params):
            pushed.update({name: tensor.clone() for name, tensor in params})

        def reset_prefix_cache(self):
            raise AssertionError("TRL's unchecked reset was not replaced")

    accelerator = Accelerator(cpu=True)
    generation = VLLMGeneration.__new__(VLLMGeneration)
    generation.mode, generation.model, generation.accelerator = "server", model, accelerator
    generation.enable_sleep_mode, generation._weight_metadata = False, None
    generation._dist, generation.vllm_client = DistributedBackend(accelerator), Client()
    accelerator.wait_for_everyone = lambda: barriers.append("barrier")  # type: ignore[method-assign]

    trl_compat.install_ordered_weight_sync(generation, accelerator)
    trl_compat.install_ordered_weight_sync(generation, accelerator)  # idempotent
    generation.sync_weights()

    assert server.resets == 1 and barriers == ["barrier"]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert name in pushed and not any("lora_" in n or "base_layer" in n for n in pushed)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    assert torch.allclose(pushed[name], expected, atol=1e-6)
    assert not torch.allclose(layer.base_layer.weight, expected)  # the base was never merged into


def test_refused_by_server_reads_trls_client_errors(server):
    import requests
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient.__new__(VLLMClient)  # its __init__ needs vLLM installed; generate() needs only these
    client.session, client.base_url, client.model = requests.Session(), server.url, "m"
    for status, refused in ((400, True), (503, False)):
        server.completions_status = status
        with pytest.raises(Exception) as caught:
            client.generate([[1, 2, 3]], max_tokens=4)
        assert trl_compat.refused_by_server(caught.value) is refused, caught.value


def test_build_without_device_state_starts_no_process_group_and_leaves_no_state(tmp_path):
    """In a fresh interpreter launched as rank 0 of 2: TRL's config builds, no process group starts, the
    launcher's variables are back afterwards, and accelerate's state is empty again."""
    script = f"""
import os, torch.distributed as dist
from accelerate.state import PartialState
from trl import SFTConfig
from rlm_train.train.trl_compat import build_without_device_state
os.environ.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
args = build_without_device_state(lambda: SFTConfig(output_dir={str(tmp_path)!r}, use_cpu=True, report_to="none"))
print(args.lr_scheduler_type.value, dist.is_initialized(), os.environ["WORLD_SIZE"], PartialState._shared_state == {{}})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-4:] == ["linear", "False", "2", "True"]
