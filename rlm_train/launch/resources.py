"""What a stage asks Slurm for: the `slurm:` section of a pipeline stage, checked and completed
with what the stage's own config implies (the GPUs an SFT recipe trains on, a GRPO recipe's
vLLM GPUs). Every value ends up as an `#SBATCH` line or a variable of the rendered script."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from rlm_train.config import StrictModel, build_config, get_dotted
from rlm_train.errors import UserError

_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$")


class SlurmResources(StrictModel):
    """One stage's Slurm resources (a pipeline stage's `slurm:` section, or `--resource KEY=VALUE`)."""

    nodes: int = Field(1, ge=1)
    """Nodes per job (per array task for sharded generation)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs per node; default: what the stage's config trains or serves on (0 for CPU recipes)."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPUs for the job's one task per node (default: the partition's default)."""
    mem: str | None = None
    """Memory per node, Slurm syntax: 64G, 500M, 0 (all of it)."""
    time: str | None = None
    """Wall-clock limit: MM, HH:MM:SS or D-HH:MM:SS (default: the partition's)."""
    partition: str | None = None
    """Partition; default: the cluster's default partition."""
    account: str | None = None
    """Account to charge; needed where the cluster enforces accounts and you have no default one."""
    qos: str | None = None
    constraint: str | None = None
    """Node features, e.g. h100."""
    exclusive: bool = False
    """Whole nodes, shared with no other job."""
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


def mem_mb(mem: str | None) -> int | None:
    """A Slurm memory string in MB (None: not given; 0: all of the node's)."""
    if mem is None:
        return None
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    if mem[-1] in units:
        return int(int(mem[:-1]) * units[mem[-1]])
    return int(mem)


def implied_gpus(run: str, config: dict[str, Any]) -> int:
    """GPUs per node the stage's own config asks for, when its `slurm:` section does not say."""
    if run not in ("sft", "grpo") or get_dotted(config, "device", "auto") == "cpu":
        return 0
    need = int(get_dotted(config, "requires.gpus", 0) or 0)
    if get_dotted(config, "device") == "cuda":
        need = max(need, int(get_dotted(config, "launch.num_processes", 1) or 1), 1)
    if need and run == "grpo" and get_dotted(config, "rollout.backend") == "vllm_server":
        need += int(get_dotted(config, "rollout.vllm_gpus", 0) or 0)
    return need


def resolve_resources(run: str, config: dict[str, Any], section: dict[str, Any], where: str) -> SlurmResources:
    """The stage's `slurm:` section checked, its GPUs filled in from the stage config."""
    resources = build_config(SlurmResources, dict(section), f"{where}: slurm")
    if resources.gpus_per_node is None:
        resources.gpus_per_node = implied_gpus(run, config)
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
    return resources


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
    if r.shards > 1:
        lines.append(f"--array=0-{r.shards - 1}" + (f"%{r.max_parallel}" if r.max_parallel else ""))
    lines += r.sbatch_args
    return [f"#SBATCH {line}" for line in lines]
