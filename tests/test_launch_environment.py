"""What `rlm-train launch` checks about this machine before anything is submitted: the jobs run
this venv and read these files, so a package missing here (flash-attn, vLLM), a model not in the
Hugging Face cache, or an input no stage makes is missing on the GPU nodes too; the GPUs a login
node lacks do not count. And the server windows given on the command line, sized and checked.
Stand-ins (tests/launch_stand_ins.py: cluster_software): a tiny random Qwen3 as Qwen/Qwen3-8B's cached
snapshot, an importable empty `vllm` package; stand-in Slurm commands (fake_slurm)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rlm_train import cli
import launch_stand_ins
import test_launch
from launch_stand_ins import lacks_of
from test_launch import launch, split_scripts

# The fixtures, here under their own names
fake_slurm = test_launch.fake_slurm
cluster_software = launch_stand_ins.cluster_software
cluster_environment = launch_stand_ins.cluster_environment


QWEN_MISSING = ("stages generate, sft, eval: requires Qwen/Qwen3-8B: not in the Hugging Face cache ({hub}) and no such "
                "directory here; download it: hf download Qwen/Qwen3-8B")


def test_the_qwen3_8b_dry_run_lists_what_its_jobs_would_lack_here_and_nothing_else(tmp_path, capsys, monkeypatch,
                                                                                     cluster_environment):
    """The jobs run this environment and read these files: what is missing here (a model not in the
    Hugging Face cache, flash-attn, vLLM) is missing on the GPU nodes too, one line each with the jobs it
    stops and its fix; the GPUs a login node lacks are not counted. Nothing lacking: exit 0."""
    monkeypatch.chdir(REPO)
    dry_run = ["launch", "--recipe", "recipes/qwen3-8b-pipeline.yaml", "--slurm", "--dry-run"]
    assert cli.main(dry_run) == 0  # Qwen/Qwen3-8B cached, vLLM installed (stand-ins): clean
    out, err = capsys.readouterr()
    assert lacks_of(0, err) == [] and err.count("\n") == 1 and len(split_scripts(out)) == 8

    empty = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    code = cli.main(dry_run)
    out, err = capsys.readouterr()
    assert lacks_of(code, err) == ["rlm-train launch: " + QWEN_MISSING.format(hub=empty)], err
    assert len(split_scripts(out)) == 8 and "CUDA" not in err  # rendered all the same; no GPU here is no problem

    # The job reads the cache its slurm.env names (over this shell's).
    assert cli.main([*dry_run, "--resource", f"env.HF_HUB_CACHE={cluster_environment}"]) == 0
    capsys.readouterr()

    if importlib.util.find_spec("flash_attn") is None:
        code = cli.main([*dry_run, "sft.attn_implementation=flash_attention_2"])
        lacks = lacks_of(code, capsys.readouterr().err)
        assert len(lacks) == 2 and lacks[1].startswith("rlm-train launch: stage sft: attn_implementation=flash_attention_2 "
                                                       "needs the flash-attn package, which this Python environment lacks")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_from_this_environment_is_missing_for_every_job_that_needs_it(capsys, monkeypatch, cluster_software):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(cluster_software[0]))  # the model there, vLLM not
    code = cli.main(["launch", "--recipe", "recipes/qwen3-8b-pipeline.yaml", "--slurm", "--dry-run"])
    assert lacks_of(code, capsys.readouterr().err) == [
        f"rlm-train launch: stages generate, generate-rl, eval: vLLM is not installed in {Path(sys.executable).absolute()}, "
        "which runs the vLLM servers these jobs start; install the gpu extra into it: pip install -e '.[gpu]' -c "
        "constraints/gpu.txt (README, \"On a GPU cluster\")",
        "rlm-train launch: stage grpo: rollout.backend=vllm_server needs the vllm package in the training environment "
        "(TRL's server mode imports it to push weights); install the gpu extra into this environment (pip install -e "
        "'.[gpu]' -c constraints/gpu.txt; the GPU jobs run it too), or set rollout.backend=transformers"]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_a_launch_refuses_to_submit_jobs_that_would_lack_a_package_or_a_model(tmp_path, fake_slurm, monkeypatch):
    from rlm_train.testing.tiny_models import rlm_sample, write_jsonl

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(i) for i in range(2)])
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "p"), "requires": [{"model": "org/absent"}],
                                        "stages": [{"name": "sft", "run": "sft", "recipe": str(REPO / "recipes/qwen3-8b-sft-lora.yaml"),
                                                    "with": {"model": "org/absent", "dataset": str(data),
                                                             "attn_implementation": "flash_attention_2"}}]}))
    proc = launch(pipeline)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[0].startswith("rlm-train launch: stage sft: attn_implementation=flash_attention_2 needs the flash-attn package")
    assert err[1] == (f"rlm-train launch: stage sft: requires org/absent: not in the Hugging Face cache ({tmp_path / 'hub'}) "
                      "and no such directory here; download it: hf download org/absent")
    assert err[2].endswith("p.yaml: 2 problem(s) above; nothing submitted") and len(err) == 3
    assert [c for c in fake_slurm() if c["cmd"] == "sbatch"] == [] and not (tmp_path / "p").exists()


def test_a_server_given_on_the_command_line_gets_its_window_sized_and_checked(tmp_path, capsys, monkeypatch):
    """`--resource server.vllm...` comes after the pipeline sized its servers: launch sizes it again."""
    from rlm_train.launch.jobs import apply_resource_flags, load_launch_pipeline
    from rlm_train.pipeline.chain import window_uses

    monkeypatch.chdir(REPO)
    teacher = "Qwen/Qwen3-Coder-30B-A3B-Instruct"  # generate-vllm.yaml's policy
    args = ["launch", "--recipe", "recipes/generate-vllm.yaml", "--slurm", "--dry-run", "--out", str(tmp_path / "l"),
            "--resource", f"server.vllm.model={teacher}"]
    pipeline = load_launch_pipeline("recipes/generate-vllm.yaml", [], None, str(tmp_path / "l"))
    apply_resource_flags(pipeline, [f"server.vllm.model={teacher}"], None, None)
    (need,) = window_uses(pipeline.stages[0], {teacher}, None)
    assert need.tokens > 32768

    code = cli.main(args)
    out, err = capsys.readouterr()
    lacks_of(code, err)  # its task file is no stage's, vLLM may be absent here: listed, the script rendered
    server = yaml.safe_load(out.split("generate-server.yaml (the server this stage starts)\n")[1])
    assert server["vllm"]["args"] == ["--max-model-len", str(need.tokens)]

    assert cli.main([*args, "--resource", "server.vllm.args=[--max-model-len, '32768']"]) == 2
    assert (f"stage generate (slurm.server) serves a 32768-token window (vllm.args --max-model-len) but stage generate "
            f"sends it requests of up to {need.tokens} tokens (policy, from its rlm config)") in capsys.readouterr().err


def test_what_a_stage_that_could_not_plan_writes_is_not_called_missing(tmp_path, capsys, monkeypatch):
    """A stage after others whose own dry run fails here is launched with a warning (its inputs come later);
    what it writes is unknown then, so the stages reading it are not told their inputs are missing."""
    stages = [{"name": "tasks", "run": "tasks make", "recipe": str(REPO / "recipes/tasks-tiny.yaml"),
               "with": {"out_dir": str(tmp_path / "tasks")}},
              {"name": "gen", "run": "generate", "recipe": str(REPO / "recipes/generate-scripted-cpu.yaml"),
               "with": {"tasks": str(tmp_path / "tasks/train.jsonl"), "out": str(tmp_path / "gen"), "policy": "nope:x"}},
              {"name": "filter", "run": "filter", "recipe": str(REPO / "recipes/filter-paper.yaml"),
               "with": {"trajectories": [str(tmp_path / "gen")], "out": str(tmp_path / "data")}},
              {"name": "sft", "run": "sft", "recipe": str(REPO / "recipes/tiny-cpu-sft.yaml"), "after": ["tasks"],
               "with": {"model": str(tmp_path / "no-model"), "dataset": str(tmp_path / "data/sft")}}]
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "p"), "stages": stages}))
    code = cli.main(["launch", "--recipe", str(pipeline), "--slurm", "--dry-run"])
    err = capsys.readouterr().err
    assert "rlm-train launch: warning: stage gen (generate): its plan fails: " in err
    # filter reads gen's run (unknown, not missing); sft comes after gen too, but its model is no stage's.
    assert lacks_of(code, err) == [f"rlm-train launch: stage sft: model {tmp_path / 'no-model'}: not found here, "
                                   "and no stage of this launch makes it"]
