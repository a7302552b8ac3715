"""What a stage asks Slurm for: the `slurm:` section of a pipeline stage, checked and completed
with what the stage's own config implies (the GPUs an SFT recipe trains on, a GRPO recipe's
vLLM GPUs) and with explicit CPU, memory and early-signal requests where the section gives none.
Every value ends up as an `#SBATCH` line or a variable of the rendered script.

Why every job names its CPUs and memory: a cluster without `DefCpuPerGPU` / `DefMemPerCPU`
gives a job that asks for neither one CPU, and memory that depends on the site. The defaults
(docs/scaling.md, "What a job asks Slurm for", works them out for 8xH100 nodes):

- A GPU job gets `CPUS_PER_GPU` CPUs and `MEM_GB_PER_GPU` GB of host memory per GPU on each node
  (a job's GPUs include those of the servers it starts). Eight CPUs per GPU cover GRPO's heaviest
  node: the vLLM API server and its engine cores, one process per training rank with its NCCL and
  loader threads, and the REPL sandboxes of the episodes in flight (one process each, mostly
  waiting on the model), and they fit nodes with 12 or more cores per GPU. 96 GB per GPU covers
  SFT's merged export of an 8B model on one GPU (the base model loaded on the host in full
  precision to merge into, ~50 GB) and, on 8 GPUs, every rank's host copy of the weights while
  it loads plus the sandboxes at their memory limit, and it fits nodes with 1 TB for 8 GPUs.
- A CPU job that names no CPUs gets `CPU_STAGE_CPUS`, and every CPU job `MEM_GB_PER_CPU` GB per CPU.
- `exclusive: true` asks for whole nodes instead: all their CPUs and `--mem=0` (all their memory).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, PrivateAttr, field_validator

from rlm_train.config import StrictModel, build_config
from rlm_train.errors import UserError
from rlm_train.train.grpo_config import GRPOConfig
from rlm_train.train.run_config import TrainingRunConfig
from rlm_train.train.sft import SFTConfig

_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$")

CPUS_PER_GPU = 8
MEM_GB_PER_GPU = 96
CPU_STAGE_CPUS = 4
MEM_GB_PER_CPU = 4
# Seconds between Slurm's early SIGTERM and the time limit: the trainer's checkpoint of the step
# it is in (or abandons) must be written within it; a quarter of shorter limits.
SIGNAL_S = 600


class SlurmResources(StrictModel):
    """One stage's Slurm resources (a pipeline stage's `slurm:` section, or `--resource KEY=VALUE`)."""

    nodes: int = Field(1, ge=1)
    """Nodes per job (per array task for sharded generation)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs per node; default: what the stage's config trains or serves on (0 for CPU recipes)."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPUs for the job's one task per node (= per node); default: 8 per GPU, 4 for a CPU job, all of
    the node's with exclusive: true."""
    mem: str | None = None
    """Memory per node, Slurm syntax: 64G, 500M, 0 (all of it); default: 96G per GPU, 4G per CPU of a
    CPU job, 0 with exclusive: true."""
    time: str | None = None
    """Wall-clock limit: MM, HH:MM:SS or D-HH:MM:SS (default: the partition's)."""
    signal_s: int | None = Field(None, ge=0, le=65535)
    """Seconds before the time limit at which Slurm sends SIGTERM to the job's script
    (`--signal=B:TERM@N`); the script passes it to the stage's command, so a trainer checkpoints
    and generation stops with its records saved, and `rlm-train launch --resume` continues.
    Default: 600, or a quarter of slurm.time when that is shorter; 0: no early signal."""
    steps_per_hour: float | None = Field(None, gt=0)
    """sft/grpo: training steps one job of this stage completes per hour (a stated figure: measured, or
    worked out in docs/scaling.md); with slurm.time, launch says when training.max_steps does not fit
    one job and how many `rlm-train launch --resume` rounds it takes."""
    partition: str | None = None
    """Partition; default: the cluster's default partition."""
    account: str | None = None
    """Account to charge; needed where the cluster enforces accounts and you have no default one."""
    qos: str | None = None
    constraint: str | None = None
    """Node features, e.g. h100."""
    exclusive: bool = False
    """Whole nodes, shared with no other job: all their CPUs and memory (--exclusive, --mem=0)."""
    shards: int = Field(1, ge=1)
    """generate: array tasks, each running `--shard i/shards` of the task file."""
    max_parallel: int | None = Field(None, ge=1)
    """generate: at most this many array tasks at once (sbatch --array=0-N%K)."""
    server: dict[str, Any] | None = None
    """generate/eval: `rlm-train serve` config keys (vllm: {model, args, ...}) for a vLLM server each job
    starts on its own node, waits for, and stops; generation then talks to it on 127.0.0.1."""
    server_timeout_s: int = Field(1800, ge=1)
    """Seconds a job waits for its server's /health before it gives up."""
    vllm_nodes: int = Field(0, ge=0, le=1)
    """grpo: 0 = the vLLM server shares the (single) node on rollout.vllm_gpus GPUs; 1 = the first node
    runs only the vLLM server and the other nodes train."""
    master_port: int = Field(29500, ge=1024, le=65535)
    """Rendezvous port of multi-node `accelerate launch`."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables the job exports (e.g. HF_HOME, NCCL settings)."""
    sbatch_args: list[str] = Field(default_factory=list)
    """Extra sbatch options, passed as written (e.g. ["--reservation=r1"])."""

    @field_validator("time")
    @classmethod
    def _check_time(cls, value: str | None) -> str | None:
        if value is not None and not _TIME.match(str(value)):
            raise ValueError("use MM, HH:MM:SS or D-HH:MM:SS, e.g. '04:00:00'")
        return value

    @field_validator("mem")
    @classmethod
    def _check_mem(cls, value: str | int | None) -> str | None:
        if value is None:
            return None
        value = str(value).upper()
        if not _MEM.match(value):
            raise ValueError("use Slurm's memory syntax: 64G, 500M or 0 (all of the node's memory)")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return {k: str(v) for k, v in value.items()}

    _defaulted: dict[str, str] = PrivateAttr(default_factory=dict)
    """Field -> how its value was worked out, for fields the section left out (messages only)."""

    def shown(self, name: str) -> str:
        """`slurm.mem=64G`, or `slurm.mem=768G (default: 96G per GPU x 8)` for a filled-in value: what a message names."""
        how = self._defaulted.get(name)
        return f"slurm.{name}={getattr(self, name)}" + (f" (default: {how})" if how else "")


def time_s(value: str) -> int:
    """A Slurm time limit in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def mem_mb(mem: str | None) -> int | None:
    """A Slurm memory string in MB (None: not given; 0: all of the node's)."""
    if mem is None:
        return None
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    if mem[-1] in units:
        return int(int(mem[:-1]) * units[mem[-1]])
    return int(mem)


def training_config(config: Any) -> TrainingRunConfig | None:
    """The config of a training stage (sft, grpo), None for the others."""
    return config if isinstance(config, TrainingRunConfig) else None


def implied_gpus(config: Any) -> int:
    """GPUs per node the stage's own config asks for, when its `slurm:` section does not say."""
    training = training_config(config)
    if training is None or training.device == "cpu":
        return 0
    need = training.requires.gpus
    if training.device == "cuda":
        need = max(need, training.launch.num_processes, 1)
    if need and isinstance(training, GRPOConfig) and training.rollout.backend == "vllm_server":
        need += training.rollout.vllm_gpus
    return need


def resolve_resources(run: str, config: Any, section: dict[str, Any], where: str) -> SlurmResources:
    """The stage's `slurm:` section checked, its GPUs filled in from the stage's typed config."""
    resources = build_config(SlurmResources, dict(section), f"{where}: slurm")
    if resources.gpus_per_node is None:
        resources.gpus_per_node = implied_gpus(config)
    if resources.shards > 1 and run != "generate":
        raise UserError(f"{where}: slurm.shards={resources.shards}: only generate stages run as shards; remove it")
    if resources.server is not None and run not in ("generate", "eval"):
        raise UserError(f"{where}: slurm.server: only generate and eval stages start a server; "
                        f"{run} stages start their own (grpo) or are one (serve)")
    if resources.vllm_nodes and run != "grpo":
        raise UserError(f"{where}: slurm.vllm_nodes: only grpo stages have a vLLM server node; remove it")
    if run == "grpo" and resources.vllm_nodes == 0 and resources.nodes > 1:
        raise UserError(f"{where}: slurm.nodes={resources.nodes} with vllm_nodes=0: a shared-node GRPO run is one node; "
                        "set slurm.vllm_nodes: 1 (first node serves, the rest train) or nodes: 1")
    if run == "grpo" and resources.vllm_nodes == 1 and resources.nodes < 2:
        raise UserError(f"{where}: slurm.vllm_nodes=1 needs nodes >= 2 (one serves, the others train)")
    if run in ("sft", "grpo") and resources.nodes > 1 and not resources.gpus_per_node:
        raise UserError(f"{where}: slurm.nodes={resources.nodes} on CPUs: multi-node training needs GPUs; "
                        "set slurm.gpus_per_node or nodes: 1")
    if resources.steps_per_hour is not None and run not in ("sft", "grpo"):
        raise UserError(f"{where}: slurm.steps_per_hour: only sft and grpo stages count training steps; remove it")
    return resources


def fill_defaults(r: SlurmResources, where: str) -> None:
    """The CPUs, memory and early signal of a job whose `slurm:` section leaves them out (the
    module's docstring says why each default is what it is), once its GPUs are final (its
    servers' included): every job asks for all three explicitly."""
    gpus = r.gpus_per_node or 0
    if r.exclusive:
        if r.mem is None:
            r.mem = "0"
            r._defaulted["mem"] = "all of the node's (exclusive: true)"
    else:
        if r.cpus_per_task is None:
            r.cpus_per_task = CPUS_PER_GPU * gpus if gpus else CPU_STAGE_CPUS
            r._defaulted["cpus_per_task"] = f"{CPUS_PER_GPU} per GPU x {gpus}" if gpus else "for a CPU job"
        if r.mem is None:
            r.mem = f"{MEM_GB_PER_GPU * gpus}G" if gpus else f"{MEM_GB_PER_CPU * r.cpus_per_task}G"
            r._defaulted["mem"] = (f"{MEM_GB_PER_GPU}G per GPU x {gpus}" if gpus
                                   else f"{MEM_GB_PER_CPU}G per CPU x {r.cpus_per_task}")
    limit = time_s(r.time) if r.time else None
    if r.signal_s is None:
        r.signal_s = min(SIGNAL_S, limit // 4) if limit else SIGNAL_S
    elif limit is not None and r.signal_s >= limit:
        raise UserError(f"{where}: slurm.signal_s={r.signal_s} is not below slurm.time={r.time} ({limit} s): "
                        "the early SIGTERM would come before the job starts; lower it or raise slurm.time")


def step_budget_warning(config: Any, r: SlurmResources, where: str) -> str | None:
    """What to say when training.max_steps at slurm.steps_per_hour does not fit one job's slurm.time
    (less the early signal's lead): how many steps fit, and how many jobs (launch --resume rounds) it takes."""
    max_steps = config.training.max_steps if isinstance(config, (SFTConfig, GRPOConfig)) else 0
    if not r.steps_per_hour or not r.time or max_steps <= 0:
        return None
    usable_h = (time_s(r.time) - (r.signal_s or 0)) / 3600
    fit = int(r.steps_per_hour * usable_h)
    if max_steps <= fit:
        return None
    rounds = f"{math.ceil(max_steps / fit)} jobs" if fit else "no end (not one step fits a job)"
    return (f"{where}: training.max_steps={max_steps} at slurm.steps_per_hour={r.steps_per_hour:g} needs "
            f"{max_steps / r.steps_per_hour:.1f} h but slurm.time={r.time} leaves {usable_h:.1f} h before its early "
            f"signal: {fit} steps fit one job, so training takes {rounds} (`rlm-train launch --resume RUN` after "
            f"each; the stages after it run after the last); set training.max_steps <= {fit} or a longer slurm.time")


def sbatch_lines(resources: SlurmResources, job_name: str, log_pattern: str) -> list[str]:
    """The `#SBATCH` lines of a stage's script."""
    r = resources
    lines = [f"--job-name={job_name}", f"--nodes={r.nodes}", "--ntasks-per-node=1", f"--output={log_pattern}"]
    if r.gpus_per_node:
        lines.append(f"--gpus-per-node={r.gpus_per_node}")
    for flag, value in (("cpus-per-task", r.cpus_per_task), ("mem", r.mem), ("time", r.time),
                        ("partition", r.partition), ("account", r.account), ("qos", r.qos),
                        ("constraint", r.constraint)):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if r.exclusive:
        lines.append("--exclusive")
    if r.signal_s:  # B: the batch script gets it and passes it on (rendered scripts' run_stage)
        lines.append(f"--signal=B:TERM@{r.signal_s}")
    if r.shards > 1:
        lines.append(f"--array=0-{r.shards - 1}" + (f"%{r.max_parallel}" if r.max_parallel else ""))
    lines += r.sbatch_args
    return [f"#SBATCH {line}" for line in lines]
