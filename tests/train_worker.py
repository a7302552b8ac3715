"""One training process of a multi-process test run (started by torchrun / accelerate launch).

    python tests/train_worker.py OUT_DIR [rlm-train sft arguments...]

Runs `rlm-train sft` through its CLI with two additions for the test to check afterwards:
- OUT_DIR/load-rank{R}.json: whether the process group existed when the model was loaded;
- OUT_DIR/trained.pt: the trained weights (full state dict gathered on rank 0) at the end of training.

With ACCELERATE_USE_FSDP=true on a CPU machine it also makes accelerate use FSDP: accelerate only
builds FSDP on accelerators and falls back to DDP on CPUs (MULTI_CPU), though FSDP2 itself runs on
CPU tensors over gloo. Only that decision is changed; the sharding, the gathering and the saving
are the real ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__
    seen: dict = {}

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # Every later AcceleratorState() re-reads the process state (MULTI_CPU): keep it FSDP.
        plugin = kwargs.get("fsdp_plugin") or seen.get("plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            seen["plugin"] = plugin
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = init


def record_load_order(out: Path) -> None:
    import torch.distributed as dist

    import rlm_train.models.loading as loading

    original = loading.load_causal_lm

    def load(*args, **kwargs):
        rank = os.environ.get("RANK", "0")
        (out / f"load-rank{rank}.json").write_text(json.dumps({"process_group": dist.is_initialized()}))
        return original(*args, **kwargs)

    loading.load_causal_lm = load


def save_trained_weights(out: Path) -> None:
    import torch
    from transformers import TrainerCallback

    import rlm_train.train.runtime as runtime

    original = runtime.train

    class Snapshot(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_end(self, args, state, control, **kwargs):
            full = self.trainer.accelerator.get_state_dict(self.trainer.model)  # collective under FSDP
            if state.is_world_process_zero:
                torch.save({k: v.detach().cpu().clone() for k, v in full.items()}, out / "trained.pt")

    def train(trainer, on_trainer=None, **kwargs):
        trainer.add_callback(Snapshot(trainer))
        return original(trainer, on_trainer, **kwargs)

    runtime.train = train
    import rlm_train.train.sft as sft

    sft.train = train


def main() -> int:
    import faulthandler

    # A collective that never completes hangs every process: dump the stacks and end instead.
    faulthandler.dump_traceback_later(int(os.environ.get("WORKER_DUMP_AFTER_S", "600")), exit=True)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        fsdp_on_cpu()
    record_load_order(out)
    save_trained_weights(out)
    from rlm_train import cli

    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
