"""The training run's config as both trainers share it: one declaration of the shared fields, TRL's names
as aliases, `report_to` as TRL spells it, what the dry run refuses before a GPU node would, one
process-group shutdown, and plain step lines with an eta in non-terminal logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_train.config import aliases_of, build_config, load_config
from rlm_train.errors import UserError
from rlm_train.train.grpo_config import GRPOConfig
from rlm_train.train.run_config import TrainingRunConfig
from rlm_train.train.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes" / "tiny-cpu-sft.yaml"
GRPO_RECIPE = REPO / "recipes" / "tiny-cpu-grpo.yaml"


def test_shared_run_fields_are_declared_once():
    shared = set(SFTConfig.model_fields) & set(GRPOConfig.model_fields)
    assert shared == set(TrainingRunConfig.model_fields)
    assert len(shared) >= 17
    for trainer in (SFTConfig, GRPOConfig):
        assert issubclass(trainer, TrainingRunConfig)
        # Each trainer adds its own fields and narrows only `training` to its own section.
        assert set(trainer.__annotations__) & shared == {"training"}


def test_configs_saved_before_the_shared_base_still_load_and_resume(tmp_path):
    """A {stage}_config.json written before `amp_bf16` reached GRPO loads, and resuming does not count the
    new key as a change."""
    from rlm_train.train.grpo_setup import RESUME_MAY_CHANGE
    from rlm_train.train.runtime import check_resume_config

    cfg = load_config(GRPOConfig, GRPO_RECIPE, [f"output_dir={tmp_path}"])
    saved = json.loads(cfg.model_dump_json())
    del saved["amp_bf16"]
    assert build_config(GRPOConfig, saved, "grpo_config.json") == cfg
    (tmp_path / "grpo_config.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoint-2").mkdir()
    check_resume_config(cfg, "grpo", str(tmp_path / "checkpoint-2"), RESUME_MAY_CHANGE)
    sft = load_config(SFTConfig, SFT_RECIPE)
    assert build_config(SFTConfig, json.loads(sft.model_dump_json()), "sft_config.json") == sft


# Aliases given on the command line, and the value TRL's own config must then hold under that name.
SFT_ALIASES = {"num_train_epochs": 2.0, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
               "learning_rate": 7e-4, "lr_scheduler_type": "cosine", "warmup_steps": 3, "weight_decay": 0.01,
               "max_grad_norm": 0.5, "logging_steps": 2, "save_steps": 4, "save_total_limit": 1, "seed": 7,
               "max_steps": 9, "gradient_checkpointing": True}
GRPO_ALIASES = {"per_device_train_batch_size": 6, "num_generations": 3, "beta": 0.05, "epsilon": 0.3,
                "epsilon_high": 0.28, "num_iterations": 2, "loss_type": "grpo", "scale_rewards": "batch",
                "shuffle_dataset": False, "temperature": 0.9, "ddp_timeout": 4000, "max_steps": 5,
                "learning_rate": 2e-6, "lr_scheduler_type": "linear", "max_completion_length": 5000}


@pytest.mark.parametrize("config_cls, recipe, given, build", [
    (SFTConfig, SFT_RECIPE, SFT_ALIASES, "sft"),
    (GRPOConfig, GRPO_RECIPE, GRPO_ALIASES, "grpo"),
])
def test_trl_names_mean_what_they_mean_in_trl(config_cls, recipe, given, build, tmp_path):
    """Each alias, given as TRL names it, arrives in TRL's own config under that name with that value."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in given.items()] + [f"output_dir={tmp_path}"]
    cfg = load_config(config_cls, recipe, overrides)
    if build == "sft":
        from rlm_train.train.sft import build_trl_args

        trl_args = build_trl_args(cfg, "cpu")
    else:
        from rlm_train.train.grpo import build_trl_args

        trl_args = build_trl_args(cfg, "cpu", [1.0])
    for name, value in given.items():
        got = getattr(trl_args, name)
        assert getattr(got, "value", got) == value, name


def test_every_alias_is_a_trl_name_and_points_at_a_real_key():
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import ModelConfig, ScriptArguments
    from trl import SFTConfig as TRLSFTConfig

    from rlm_train.config import get_dotted

    for ours, theirs in ((SFTConfig, TRLSFTConfig), (GRPOConfig, TRLGRPOConfig)):
        trl_names = set(theirs.__dataclass_fields__) | set(ModelConfig.__dataclass_fields__) | set(
            ScriptArguments.__dataclass_fields__)
        defaults = json.loads(load_config(ours, SFT_RECIPE if ours is SFTConfig else GRPO_RECIPE).model_dump_json())
        for alias, target in aliases_of(ours).items():
            if not target.startswith("hub_"):  # the Hub keys' aliases are the Hub export's (tests/test_push_to_hub.py)
                assert alias.rsplit(".", 1)[-1] in trl_names, alias
            assert get_dotted(defaults, target, default=KeyError) is not KeyError, target


@pytest.mark.parametrize("given, expected", [("wandb", ["wandb"]), ("none", []), ("tensorboard,wandb",
                                             ["tensorboard", "wandb"]), (["tensorboard"], ["tensorboard"])])
def test_report_to_as_trl_spells_it(given, expected):
    cfg = load_config(SFTConfig, SFT_RECIPE, [f"report_to={json.dumps(given)}"])
    assert cfg.report_to == expected
    with pytest.raises(UserError, match="report_to"):
        load_config(SFTConfig, SFT_RECIPE, ["report_to=mlflow"])


def _dry_run(rlm_cli, stage: str, recipe: Path, *overrides: str, tmp_path: Path):
    return subprocess.run([*rlm_cli, stage, "--recipe", str(recipe), "--dry-run", f"output_dir={tmp_path / 'out'}",
                           *overrides], capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("stage, recipe", [("sft", SFT_RECIPE), ("grpo", GRPO_RECIPE)])
@pytest.mark.parametrize("overrides, says", [
    (["training.lr_scheduler=cosin"], "training.lr_scheduler='cosin' is not a transformers scheduler; did you mean 'cosine'?"),
    (["lr_scheduler_type=reduce_lr_on_plateau", "training.warmup_steps=0"],
     "TRL's training arguments refuse these settings: lr_scheduler_type reduce_lr_on_plateau requires an eval strategy"),
])
def test_dry_run_refuses_what_trl_would_refuse_on_the_gpu_node(rlm_cli, stage, recipe, overrides, says, tmp_path):
    result = _dry_run(rlm_cli, stage, recipe, *overrides, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""  # refused before the plan
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("wandb") is not None, reason="wandb is installed here")
@pytest.mark.parametrize("overrides, key", [(["report_to=wandb"], "report_to"), (["wandb_project=p"], "wandb_project")])
def test_dry_run_refuses_wandb_when_it_is_not_installed(rlm_cli, overrides, key, tmp_path):
    result = _dry_run(rlm_cli, "sft", SFT_RECIPE, *overrides, tmp_path=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlm-train sft: error: {key}: wandb is asked for but not installed")
    assert "pip install 'rlm-train[wandb]'" in lines[0]
    assert result.stdout == ""


def test_wandb_is_an_extra_and_not_in_make_install():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^wandb = \["wandb', pyproject, re.M)
    installs = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line.lower()
                or "$(PIP) install" in line]
    assert installs and not any("wandb" in line for line in installs)


def test_one_process_group_shutdown_and_runs_leave_their_group():
    """Only common.leave_process_group destroys a group; only common.leaves_process_group calls it; both
    trainers' runs go through it, and a run that raises still leaves its group (gloo, 1 process)."""
    sources = {p: p.read_text() for p in (REPO / "rlm_train").rglob("*.py")}
    destroying = [p.name for p, s in sources.items() if "destroy_process_group(" in s]
    leaving = [p.name for p, s in sources.items() if "leave_process_group()" in s]
    assert destroying == ["common.py"] and leaving == ["common.py"]
    for name in ("sft.py", "grpo.py"):
        text = (REPO / "rlm_train" / "train" / name).read_text()
        assert re.search(r"@leaves_process_group\ndef run_(sft|grpo)\(", text), name
    script = """
import os, torch.distributed as dist
from rlm_train.train.common import leaves_process_group
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)

@leaves_process_group
def run():
    assert dist.is_initialized()
    raise RuntimeError("the run failed")

try:
    run()
except RuntimeError:
    pass
print("initialized after:", dist.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "initialized after: False"


def test_step_clock_paces_from_the_steps_of_this_start(monkeypatch):
    from rlm_train.train import runtime

    now = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    clock = runtime.StepClock()
    clock.start(step=10)  # a resumed run: steps 1-10 took no time here
    assert clock.eta_s(10, 30) is None
    now[0] = 160.0
    assert clock.eta_s(13, 30) == pytest.approx(60 / 3 * 17)
    assert runtime.clock_text(clock.eta_s(13, 30)) == "0:05:40"
    assert runtime.clock_text(3725.4) == "1:02:05" and runtime.clock_text(None) == "?"
    assert clock.eta_s(13, -1) is None  # no known end


@pytest.mark.slow
def test_sft_log_without_a_terminal_has_step_lines_with_eta_and_no_carriage_returns(rlm_cli, tmp_path):
    from rlm_train.testing.tiny_models import build_tiny_qwen3, rlm_sample, write_jsonl

    model = build_tiny_qwen3(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(i) for i in range(6)])
    result = subprocess.run([*rlm_cli, "sft", "--recipe", str(SFT_RECIPE), f"model={model}", f"dataset={data}",
                             f"output_dir={tmp_path / 'out'}", "max_steps=3", "save_merged=false"],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "\r" not in log
    steps = re.findall(r"^\[sft\] step (\d+)/3 .*loss=\S+ .*elapsed=\d+:\d\d:\d\d eta=(\d+:\d\d:\d\d|\?)$", log, re.M)
    assert [s for s, _ in steps][:3] == ["1", "2", "3"], log[-3000:]
    assert steps[2][1] == "0:00:00"  # nothing left after the last step


@pytest.mark.slow
def test_pipeline_dry_run_fails_on_what_trl_would_refuse(rlm_cli, tmp_path):
    """The check lives in the stage's plan, so a pipeline's dry run (and a launch's) meets it too."""
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"name: p\nout_dir: {tmp_path / 'out'}\nstages:\n  - name: sft\n    run: sft\n"
                      f"    recipe: {SFT_RECIPE}\n"
                      f"    with: {{output_dir: {tmp_path / 'out' / 'sft'}, training: {{lr_scheduler: cosin}}}}\n")
    result = subprocess.run([*rlm_cli, "pipeline", "--recipe", str(recipe), "--dry-run"], capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "plan: FAILS: " in result.stdout and "did you mean 'cosine'?" in result.stdout
    assert "plans: 1 stage(s) would stop at their own checks: sft" in result.stdout
    assert not (tmp_path / "out").exists()
