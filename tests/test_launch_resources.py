"""What every job asks Slurm for: CPUs and memory by default from its GPUs (or whole nodes),
checked against the partition as requested; the early SIGTERM before the time limit; a
training stage's step budget against its time limit. Rendered with `--dry-run` or computed
directly: no Slurm needed (tests/test_launch.py submits to stand-ins, tests/test_slurm.py to
a real one)."""

import re

import pytest
import yaml

from conftest import REPO
from rlm_train import cli
from rlm_train.errors import UserError
from rlm_train.launch.cluster import ClusterInfo, check_resources, parse_sinfo
from rlm_train.launch.resources import fill_defaults, resolve_resources, sbatch_lines, step_budget_warning, time_s
from rlm_train.train.grpo_config import GRPOConfig
import launch_stand_ins
from test_launch import every_template_pipeline, split_scripts

# launch_stand_ins' fixtures, here under their own names
cluster_software = launch_stand_ins.cluster_software
cluster_environment = launch_stand_ins.cluster_environment


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?$", script, re.M))


@pytest.mark.usefixtures("cluster_environment")  # Qwen/Qwen3-8B cached, vLLM installed: stand-ins
def test_every_job_asks_for_cpus_memory_and_an_early_signal(tmp_path, capsys, monkeypatch):
    """Defaults from the job's GPUs (its servers' included): 8 CPUs and 96G per GPU; a CPU job 4 CPUs
    and 4G per CPU; exclusive: the whole node. Every srun step passes the job's CPUs on."""
    monkeypatch.chdir(REPO)
    assert cli.main(["launch", "--recipe", str(every_template_pipeline(tmp_path)), "--slurm", "--dry-run"]) == 0
    scripts = split_scripts(capsys.readouterr().out)
    asked = {name: {k: sbatch_options(s).get(k) for k in ("gpus-per-node", "cpus-per-task", "mem", "signal")}
             for name, s in scripts.items()}
    assert asked == {
        "tasks": {"gpus-per-node": None, "cpus-per-task": "8", "mem": "32G", "signal": "B:TERM@600"},  # recipe's 8 CPUs
        "gen": {"gpus-per-node": "1", "cpus-per-task": "8", "mem": "96G", "signal": "B:TERM@600"},  # its server's GPU
        "filter": {"gpus-per-node": None, "cpus-per-task": "4", "mem": "16G", "signal": "B:TERM@600"},
        "sft": {"gpus-per-node": "8", "cpus-per-task": None, "mem": "0", "signal": "B:TERM@600"},  # exclusive
        "grpo": {"gpus-per-node": "8", "cpus-per-task": "64", "mem": "768G", "signal": "B:TERM@600"},
        "grpo1": {"gpus-per-node": "8", "cpus-per-task": "64", "mem": "768G", "signal": "B:TERM@600"},
        "eval": {"gpus-per-node": "1", "cpus-per-task": "8", "mem": "96G", "signal": "B:TERM@600"},
        "serve": {"gpus-per-node": "1", "cpus-per-task": "8", "mem": "96G", "signal": "B:TERM@600"},
    }
    sruns = [line for s in scripts.values() for line in s.splitlines() if re.match(r"\s*(run_stage )?srun ", line)]
    assert len(sruns) == 5  # sft: the launchers on every node; each grpo: its vLLM node, its training nodes
    assert all('--cpus-per-task="$STEP_CPUS"' in line for line in sruns), sruns
    # The stage's command runs under run_stage (the TERM reaches it), in every template.
    assert all(re.search(r"^\s*run_stage ", s, re.M) for s in scripts.values())


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("48:00:00", 172800),
                                           ("2-00", 172800), ("1-12:30", 131400), ("1-00:00:05", 86405)])
def test_slurm_time_limits_in_seconds(value, seconds):
    assert time_s(value) == seconds


def test_the_early_signal_fits_the_time_limit():
    def filled(**section):
        r = resolve_resources("sft", None, section, "p.yaml: stage sft")
        fill_defaults(r, "p.yaml: stage sft")
        return r
    assert filled(time="04:00:00").signal_s == 600 and filled().signal_s == 600
    assert filled(time="00:20:00").signal_s == 300  # a quarter of a short limit
    assert "#SBATCH --signal=B:TERM@120" in sbatch_lines(filled(time="10", signal_s=120), "j", "/l")
    assert not any("--signal" in line for line in sbatch_lines(filled(signal_s=0), "j", "/l"))
    with pytest.raises(UserError, match=r"^p.yaml: stage sft: slurm.signal_s=1200 is not below slurm.time=00:20:00 \(1200 s\)"):
        filled(time="00:20:00", signal_s=1200)


def test_what_the_job_asks_for_is_checked_against_the_partition():
    parts, default = parse_sinfo("gpu*|4|48|500000|gpu:h100:8(S:0-1)|up\n")
    cluster = ClusterInfo(parts, default)

    def checked(run, config, **section):
        r = resolve_resources(run, config, section, "stage")
        fill_defaults(r, "stage")
        return check_resources(run, r, cluster)
    grpo = GRPOConfig.model_validate(yaml.safe_load((REPO / "recipes/qwen3-8b-grpo.yaml").read_text()))
    assert checked("grpo", grpo) == [
        "stage grpo: slurm.cpus_per_task=64 (default: 8 per GPU x 8) asks 64 CPUs per node but partition gpu's nodes "
        "have 48; set slurm.cpus_per_task <= 48 or exclusive: true",
        "stage grpo: slurm.mem=768G (default: 96G per GPU x 8) asks 786432 MB per node but partition gpu's nodes "
        "have 500000 MB; set slurm.mem <= 488G or exclusive: true"]
    assert checked("grpo", grpo, exclusive=True) == []  # whole nodes: whatever they have
    assert checked("grpo", grpo, cpus_per_task=48, mem="480G") == []
    assert checked("filter", None) == []  # 4 CPUs, 16G


def test_a_step_budget_that_does_not_fit_the_time_limit_says_how_many_rounds():
    def warning(max_steps, **section):
        r = resolve_resources("grpo", None, section, "p.yaml: stage grpo")
        fill_defaults(r, "p.yaml: stage grpo")
        grpo = yaml.safe_load((REPO / "recipes/qwen3-8b-grpo.yaml").read_text())
        config = GRPOConfig.model_validate({**grpo, "training": {**grpo["training"], "max_steps": max_steps}})
        return step_budget_warning(config, r, "stage grpo")
    assert warning(300, time="48:00:00", steps_per_hour=4) == (
        "stage grpo: training.max_steps=300 at slurm.steps_per_hour=4 needs 75.0 h but slurm.time=48:00:00 leaves "
        "47.8 h before its early signal: 191 steps fit one job, so training takes 2 jobs (`rlm-train launch --resume "
        "RUN` after each; the stages after it run after the last); set training.max_steps <= 191 or a longer slurm.time")
    assert warning(180, time="48:00:00", steps_per_hour=4) is None
    assert warning(300, steps_per_hour=4) is None  # no slurm.time: the partition's, unknown here
    with pytest.raises(UserError, match="slurm.steps_per_hour: only sft and grpo stages count training steps"):
        resolve_resources("filter", {}, {"steps_per_hour": 2}, "stage filter")


@pytest.mark.usefixtures("cluster_environment")
def test_the_qwen3_8b_pipeline_fits_its_step_budget(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["launch", "--recipe", "recipes/qwen3-8b-pipeline.yaml", "--slurm", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    grpo = split_scripts(out)["grpo"]
    assert sbatch_options(grpo)["time"] == "48:00:00" and "steps_per_hour" not in err
