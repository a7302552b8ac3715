"""From a recipe to the stage scripts `rlm-train launch` submits.

A pipeline recipe (`stages:`) gives its stages as they are. A single stage recipe (its first
line `# rlm-train generate --recipe ...`, or `--stage-command`) becomes a one-stage pipeline
whose state lives in `--out` (default runs/launch/<recipe name>). Each stage's resolved recipe
is written to OUT/pipeline/NAME.yaml (the pipeline's own rule) and the launch state to
OUT/pipeline/slurm/: NAME.sbatch, logs/, exit/ and launch.json.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlm_train import registry
from rlm_train.config import apply_override, read_recipe
from rlm_train.errors import UserError
from rlm_train.launch.render import Server, StageScript, check_server_port, serve_port, server_recipe_text
from rlm_train.launch.resources import fill_defaults, resolve_resources
from rlm_train.pipeline.chain import slurm_server
from rlm_train.pipeline.recipe import Pipeline, PipelineSpec, PipelineStage, StageSpec, load_pipeline


def stage_command_of(path: Path) -> str | None:
    """The stage command a recipe's first comment line runs (`# rlm-train sft --recipe ...`)."""
    first = path.read_text().splitlines()[:1]
    if not first or not first[0].startswith("#"):
        return None
    names = registry.stage_names()
    found = re.findall(r"rlm-train (" + "|".join(re.escape(name) for name in names) + r")\b", first[0])
    return found[-1] if found else None


def load_launch_pipeline(recipe: str, overrides: list[str], stage_command: str | None, out: str | None) -> Pipeline:
    """A pipeline recipe, or a stage recipe wrapped as a one-stage pipeline."""
    path = Path(recipe)
    data = read_recipe(path)
    if "stages" in data:
        if stage_command:
            raise UserError(f"{path}: is a pipeline recipe; --stage-command is for single stage recipes")
        if out:
            raise UserError(f"{path}: a pipeline keeps its state in its out_dir ({data.get('out_dir')}); drop --out")
        return load_pipeline(path, overrides)
    command = stage_command or stage_command_of(path)
    if command is None:
        raise UserError(f"{path}: not a pipeline recipe (no `stages:`) and its first line names no stage command; "
                        f"pass --stage-command (one of: {', '.join(registry.stage_names())})")
    if command not in registry.stage_names():
        raise UserError(f"--stage-command {command!r}: choose from {', '.join(registry.stage_names())}")
    name = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)[:64] or "stage"
    out_dir = Path(out or f"runs/launch/{name}")
    stage_name = command.replace(" ", "-")
    spec = PipelineSpec(name=name, out_dir=str(out_dir),
                        stages=[StageSpec(name=stage_name, run=command, recipe=str(path))])
    config = dict(data)
    for override in overrides:
        apply_override(config, override)
    stage = PipelineStage(spec.stages[0], registry.stage(command), config, [], out_dir / "pipeline" / f"{stage_name}.yaml",
                          f"{path}")
    return Pipeline(spec, path, [stage])


def apply_resource_flags(pipeline: Pipeline, resources: list[str], partition: str | None, account: str | None) -> None:
    """`--resource [STAGE.]KEY=VALUE`, `--partition`, `--account` into the stages' slurm sections."""
    names = {stage.name for stage in pipeline.stages}
    for item in resources:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--resource {item!r}: expected [STAGE.]KEY=VALUE, e.g. --resource gpus_per_node=8")
        head, dot, rest = key.partition(".")
        targets = [pipeline.stage(head)] if dot and head in names else pipeline.stages
        for stage in targets:
            apply_override(stage.slurm, f"{rest if dot and head in names else key}={value}")
    for stage in pipeline.stages:
        if partition and "partition" not in stage.slurm:
            stage.slurm["partition"] = partition
        if account and "account" not in stage.slurm:
            stage.slurm["account"] = account


def select_stages(pipeline: Pipeline, only: str | None) -> list[PipelineStage]:
    if not only:
        return list(pipeline.stages)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    return [pipeline.stage(name) for name in wanted]


def _job_after(pipeline: Pipeline, stage: PipelineStage) -> list[str]:
    """The jobs a stage waits for: its `after`, with a background serve stage (not a job of its
    own: its consumers start it) replaced by what that serve stage comes after."""
    out: list[str] = []
    for name in stage.after:
        before = pipeline.stage(name)
        for dep in (_job_after(pipeline, before) if before.background else [name]):
            if dep not in out:
                out.append(dep)
    return out


def build_scripts(pipeline: Pipeline, stages: list[PipelineStage]) -> list[StageScript]:
    """Each stage's resources checked and its script's paths fixed (not yet rendered). A
    pipeline's background serve stages run inside the jobs of the stages that list them in
    `after`, on those jobs' nodes: their 127.0.0.1 URLs stay right."""
    state = (pipeline.state_dir / "slurm").absolute()
    chosen = {stage.name for stage in stages if not stage.background}
    scripts = []
    for stage in stages:
        if stage.name not in chosen:
            continue
        where = f"{pipeline.path}: stage {stage.name}"
        resources = resolve_resources(stage.run, stage.config, stage.slurm, where)
        own_server = slurm_server(stage)
        own = resources.gpus_per_node or 0
        servers: list[Server] = []
        extra: list[str] = []
        for name in stage.after:
            before = pipeline.stage(name)
            if before.background:
                bg = resolve_resources(before.run, before.config, before.slurm, f"{pipeline.path}: stage {name}")
                port = check_server_port(f"{pipeline.path}: stage {name}: vllm.port", serve_port(before.config))
                servers.append(Server(before.recipe_file.absolute(), port, bg.gpus_per_node or 0))
        if resources.server is not None and own_server is not None:
            port = check_server_port(f"{where}: slurm.server.vllm.port", serve_port(own_server))
            servers.append(Server(state / f"{stage.name}-server.yaml", port, own,
                                  server_recipe_text(stage.name, resources.server)))
            extra.append(f"base_urls=[http://127.0.0.1:{port}/v1]")
            own = 0
        resources.gpus_per_node = own + sum(s.gpus for s in servers)
        fill_defaults(resources, where)
        log = state / "logs" / (f"{stage.name}-%A_%a.out" if resources.shards > 1 else f"{stage.name}-%j.out")
        scripts.append(StageScript(
            name=stage.name, run=stage.run, argv=stage.argv, resources=resources,
            after=[name for name in _job_after(pipeline, stage) if name in chosen],
            template=stage.definition.slurm_template,
            script=state / f"{stage.name}.sbatch", log_pattern=str(log), config=stage.config,
            servers=servers, own_gpus=own, extra_args=extra,
        ))
    return scripts
