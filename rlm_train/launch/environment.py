"""What the jobs of a launch would lack on the cluster, seen from here before anything is submitted.

The jobs run this same Python environment (the venv's python, by its path on the shared file
system) and read the same files, so what is missing here is missing on the GPU nodes too:

- a package a stage needs: the stages' own checks (`runtime.Problem.environment`: flash_attn for
  `attn_implementation: flash_attention_2`, vllm for GRPO's vllm_server backend), and vLLM for
  every server a job starts (a background serve stage, a stage's slurm.server);
- a model or file the pipeline `requires:`, or an input of a stage that no stage of the launch
  makes and that is not here; a Hub model is looked for in the Hugging Face cache the job will
  read (its slurm.env's HF_HOME / HF_HUB_CACHE over this shell's), and the line gives the
  command that downloads it (`hf download ORG/NAME`).

What only this machine lacks (GPUs, on a login node) does not count. A real launch refuses to
submit on any of these; a dry run lists them and exits 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from rlm_train.launch.render import StageScript
from rlm_train.pipeline.recipe import Pipeline, PipelineStage, Requirement
from rlm_train.serve.config import VLLMConfig
from rlm_train.stage import Plan

# The variables that say which Hugging Face cache a process reads (models/hub.py: hub_cache_dir).
_HUB_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
_VLLM_INSTALL = "install the gpu extra into it: pip install -e '.[gpu]' -c constraints/gpu.txt (README, \"On a GPU cluster\")"


@dataclass
class Lack:
    """One thing the jobs would lack, and the jobs (stages) that would stop on it."""

    message: str
    stages: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{'stage' if len(self.stages) == 1 else 'stages'} {', '.join(self.stages)}: {self.message}"


def launch_lacks(pipeline: Pipeline, scripts: list[StageScript], plans: dict[str, Plan]) -> list[Lack]:
    """What the jobs in `scripts` would lack (see the module docstring), each message once with
    every job that would stop on it, in launch order. `plans`: the jobs' own dry-run plans; a job
    missing from it could not plan (launch warned), so what it writes is unknown and the inputs of
    the jobs that run after it are not called unmade."""
    from rlm_train.pipeline.chain import check_chain, slurm_server

    links = check_chain(pipeline, plans)
    unplanned = {job.name for job in scripts if job.name not in plans}
    found: dict[str, Lack] = {}
    for job in scripts:
        stage = pipeline.stage(job.name)
        servers = [pipeline.stage(name) for name in stage.after if pipeline.stage(name).background]
        with hub_cache_of(job.resources.env):
            messages = package_lacks(stage)
            for server in servers:
                messages += server_lacks(server.config.vllm)
            own = slurm_server(stage)
            messages += server_lacks(own.vllm if own is not None else None)
            members = {stage.name, *(server.name for server in servers)}
            messages += file_lacks(pipeline, [link for link in links if link.stage in members], [stage, *servers],
                                   outputs_known=not unplanned & upstream(pipeline, stage))
        for message in messages:
            lack = found.setdefault(message, Lack(message))
            if job.name not in lack.stages:
                lack.stages.append(job.name)
    return list(found.values())


def upstream(pipeline: Pipeline, stage: PipelineStage) -> set[str]:
    """The stages `stage` runs after, directly or through others."""
    out: set[str] = set()
    todo = list(stage.after)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += pipeline.stage(name).after
    return out


@contextlib.contextmanager
def hub_cache_of(job_env: dict[str, str]) -> Iterator[None]:
    """This process's environment with the job's Hugging Face cache variables over it (a job
    inherits the environment it is submitted from, plus its slurm.env)."""
    saved = {name: os.environ.get(name) for name in _HUB_CACHE_VARS}
    try:
        for name in _HUB_CACHE_VARS:
            if name in job_env:
                os.environ[name] = os.path.expandvars(job_env[name])
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def package_lacks(stage: PipelineStage) -> list[str]:
    """The packages an SFT or GRPO stage needs that this environment lacks: its own resource
    check's problems marked `environment` (its GPU problems are the login node's, not the job's)."""
    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.sft import SFTConfig

    problems: list[Any]
    if isinstance(stage.config, SFTConfig):
        from rlm_train.train.sft import resource_problems as sft_problems

        problems = sft_problems(stage.config)
    elif isinstance(stage.config, GRPOConfig):
        from rlm_train.train.grpo import resource_problems as grpo_problems

        problems = grpo_problems(stage.config)
    else:
        return []
    return [p.message for p in problems if p.fatal and p.environment]


def server_lacks(vllm: VLLMConfig | None) -> list[str]:
    """vLLM missing from the interpreter a job's server runs (vllm.python, else this venv's: the job's)."""
    from rlm_train.serve.vllm_install import vllm_python_has_vllm

    if vllm is None or not vllm.model:
        return []
    python = vllm.python or os.path.abspath(sys.executable)
    if vllm_python_has_vllm(python):
        return []
    return [f"vLLM is not installed in {python}, which runs the vLLM servers these jobs start; {_VLLM_INSTALL}"]


def file_lacks(pipeline: Pipeline, links: list[Any], stages: list[PipelineStage], outputs_known: bool = True) -> list[str]:
    """The models and files among `links` (chain.Link) that no stage of the launch makes and that are
    not here: a `requires:` entry with its own fix, a Hub model with its `hf download` line, and (when
    the outputs of the stages before are known) any other input. Links to served models (`openai:`
    policies) are about servers, not files: not counted here."""
    from rlm_train.models.hub import hub_model
    from rlm_train.models.loading import model_missing
    from rlm_train.pipeline.chain import SourceKind, openai_uses

    served = {(stage.name, where) for stage in stages for where, _, _ in openai_uses(stage)}
    out: list[str] = []
    for link in links:
        if (link.stage, link.name) in served or link.kind in (SourceKind.STAGE, SourceKind.HERE):
            continue
        if link.kind == SourceKind.REQUIRES:
            requirement = requirement_for(pipeline, link.path)
            why = requirement.missing() if requirement else ""
            message = f"requires {link.path}: {why}" if why else ""
        elif hub_model(link.path) is not None:  # found in this shell's cache or not: the job's cache decides
            why = model_missing(link.path)
            message = f"{link.name} {link.path}: {why}" if why else ""
        elif link.broken and outputs_known:
            message = f"{link.name} {link.path}: not found here, and no stage of this launch makes it"
        else:
            message = ""
        if message and message not in out:
            out.append(message)
    return out


def requirement_for(pipeline: Pipeline, path: str) -> Requirement | None:
    def norm(text: str) -> str:
        return os.path.normpath(os.path.expanduser(text))

    return next((r for r in pipeline.requires if norm(r.target) == norm(path)), None)
