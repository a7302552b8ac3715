"""One sbatch script per stage, rendered from the templates in slurm/.

A template is a bash script with `{{NAME}}` fields: `{{SBATCH}}` (the resource lines),
`{{PROLOGUE}}` (slurm/prologue.sh: cd, the venv's python, exit records, a server health wait)
and the stage's values (its argv, shards, server port...). Every value is shell-quoted here;
a field a template names that has no value is an error, so a template cannot drift silently.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlm_train.errors import UserError
from rlm_train.launch.resources import SlurmResources, sbatch_lines, training_config
from rlm_train.serve.config import ServeConfig
from rlm_train.train.grpo_config import GRPOConfig

# Each stage names its template (Stage.slurm_template in its commands module).
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
_FIELD = re.compile(r"\{\{([A-Z_]+)\}\}")


@dataclass
class Server:
    """A server a stage's job starts on its own node before its command: a pipeline's background
    serve stage in the stage's `after`, or the stage's slurm.server."""

    recipe: Path  # the `rlm-train serve` recipe
    port: int  # its health check: http://127.0.0.1:PORT/health
    gpus: int  # its slice of the job's GPUs (taken in order, before the stage's own)
    text: str | None = None  # the recipe to write (slurm.server); None: a stage recipe the pipeline writes


@dataclass
class StageScript:
    """Everything `rlm-train launch` needs to submit one stage."""

    name: str
    run: str
    argv: list[str]
    resources: SlurmResources
    after: list[str]
    template: str
    script: Path  # where the rendered script is written
    log_pattern: str  # sbatch --output (in the state dir's logs/)
    config: Any  # the stage's typed config
    servers: list[Server]
    own_gpus: int  # GPUs of the stage's own command (the job's GPUs less its servers')
    extra_args: list[str]  # KEY=VALUE overrides the job adds (slurm.server: base_urls on 127.0.0.1)
    text: str = ""


def fill(template: str, values: dict[str, str], where: str) -> str:
    missing = sorted({name for name in _FIELD.findall(template) if name not in values})
    if missing:
        raise UserError(f"{where}: no value for {', '.join(missing)}; the template and rlm_train/launch/render.py disagree")
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def _q(value: Any) -> str:
    return shlex.quote(str(value)) if value not in (None, "") else "''"


def _venv_python() -> Path:
    """The interpreter running rlm-train, by its venv path (not resolved: the venv's site-packages)."""
    return Path(sys.executable).absolute()


def serve_port(server: ServeConfig) -> int:
    """Where a serve config answers /health: vLLM's port, or the gateway's when it serves alone."""
    return server.vllm.port if server.vllm.model else server.gateway.port


def vllm_port(config: GRPOConfig) -> int:
    """The port of GRPO's own vLLM server (rollout.vllm_server_url)."""
    from urllib.parse import urlparse

    return urlparse(config.rollout.vllm_server_url).port or 8000


def render(job: StageScript, pipeline_name: str, state_dir: Path, workdir: Path) -> str:
    """The stage's sbatch script as text."""
    r = job.resources
    python = _venv_python()
    config = job.config
    grpo_vllm = isinstance(config, GRPOConfig) and config.rollout.backend == "vllm_server"
    training = training_config(config)
    values = {
        "WORKDIR": _q(workdir), "VENV_BIN": _q(python.parent), "PYTHON": _q(python), "STATE_DIR": _q(state_dir),
        "PIPELINE": pipeline_name, "STAGE": job.name, "COMMAND": job.run, "TEMPLATE": job.template,
        "ENV": "\n".join(f"export {k}={_q(v)}" for k, v in r.env.items()) or "# (no slurm.env)",
        "ARGV": " ".join(_q(a) for a in job.argv), "RECIPE": _q(job.argv[-1]),
        "SHUTDOWN_S": str(max(r.signal_s or 0, 30)),  # torchrun's own default is 30 s
        "SHARDS": str(r.shards), "SERVER_TIMEOUT_S": str(r.server_timeout_s), "OWN_GPUS": str(job.own_gpus),
        "SERVERS": " ".join(_q(f"{s.recipe}|{s.port}|{s.gpus}") for s in job.servers),
        "EXTRA_ARGS": " ".join(_q(a) for a in job.extra_args),
        "NODES": str(r.nodes), "GPUS_PER_NODE": str(job.own_gpus), "MASTER_PORT": str(r.master_port),
        "ACCELERATE_CONFIG": _q(training.launch.accelerate_config if training is not None else None),
        "VLLM_NODES": str(r.vllm_nodes), "VLLM_PORT": str(vllm_port(config) if isinstance(config, GRPOConfig) else 8000),
        "VLLM_GPUS": str(config.rollout.vllm_gpus if grpo_vllm else 0),
    }
    where = f"slurm/{job.template}"
    values["PROLOGUE"] = fill((TEMPLATE_DIR / "prologue.sh").read_text(), values, "slurm/prologue.sh").rstrip("\n")
    values["SBATCH"] = "\n".join(sbatch_lines(r, f"{pipeline_name}-{job.name}", job.log_pattern))
    return fill((TEMPLATE_DIR / job.template).read_text(), values, where)


def server_recipe_text(job_name: str, server: dict[str, Any]) -> str:
    """The `rlm-train serve` recipe of a stage's slurm.server, checked."""
    from rlm_train.config import build_config
    from rlm_train.serve.config import ServeConfig

    config = dict(server)
    config.setdefault("vllm", {})
    if not isinstance(config["vllm"], dict) or not config["vllm"].get("model"):
        raise UserError(f"stage {job_name}: slurm.server.vllm.model: not set; name the model the job serves")
    config["vllm"].setdefault("host", "127.0.0.1")
    build_config(ServeConfig, config, f"stage {job_name}: slurm.server")  # a bad key fails here, not on the node
    header = f"# rlm-train serve --recipe <this file>\n# written by rlm-train launch for stage {job_name}\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def check_server_port(where: str, port: int) -> int:
    if port == 0:
        raise UserError(f"{where}: port 0 (a free port) cannot be told to the stage that uses it; set a port (e.g. 8000)")
    return port


def written_paths(script: str) -> list[str]:
    """The paths a rendered script writes to outside the stage commands: its sbatch log and
    redirect targets, with $STATE expanded (for the check that launch creates their folders)."""
    state = re.search(r"^STATE=(\S+)", script, re.M)
    state_dir = shlex.split(state.group(1))[0] if state else ""
    paths = re.findall(r"^#SBATCH --(?:output|error)=(\S+)", script, re.M)
    paths += [m for m in re.findall(r'>>?\s*"([^"]+)"', script) if not m.startswith("/dev/")]
    return [p.replace("$STATE", state_dir) for p in paths]
