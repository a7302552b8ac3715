"""Pipeline recipes: the stages of the loop as one YAML file.

    # rlm-train pipeline --recipe recipes/demo-cpu.yaml
    name: demo-cpu
    out_dir: runs/demo                 # pipeline state, resolved stage recipes, timings
    stages:
      - name: generate
        run: generate                  # the rlm-train command (`tasks make`, `generate`, ...)
        recipe: recipes/generate-scripted-cpu.yaml   # optional base recipe of that command
        with: {samples: 4}             # keys deep-merged over the recipe
        after: [tasks]                 # optional; default: the stage before it
        slurm: {nodes: 1, gpus_per_node: 8, time: "04:00:00"}   # resources for `launch --slurm`
      - name: serve
        run: serve
        background: true               # beside the stages that list it in `after` (rlm-train pipeline
        with: {vllm: {model: gemma3-270m, port: 8011}}   # starts it for them, waits for /health, stops it)
    requires:                          # made outside the pipeline; checked before any stage runs
      - model: Qwen/Qwen3-8B           # a Hub id: found in the Hugging Face cache, else `hf download Qwen/Qwen3-8B`
      - {path: data/corpus.txt, how: "make corpus"}

`run:` names a stage of the registry (rlm_train/registry.py), and a stage's recipe + `with`
is parsed into that stage's config class as the pipeline loads: a bad key is one line naming the
stage, the key and the closest valid one, before anything else happens. The pipeline, the chain
check and the Slurm renderer read the typed configs. Each stage's resolved recipe is written to
OUT_DIR/pipeline/NAME.yaml and the stage runs as `rlm-train RUN --recipe OUT_DIR/pipeline/NAME.yaml`:
the same command a user would type, locally (`rlm-train pipeline`) or in an sbatch script
(`rlm-train launch`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from rlm_train import registry
from rlm_train.config import StrictModel, _deep_merge, apply_override, build_config, read_recipe
from rlm_train.errors import UserError
from rlm_train.pipeline.code import code_digest
from rlm_train.stage import Stage

# Bumped when what a fingerprint covers changes: a state of another scheme is not finished (its stage
# reruns, saying why) unless `--keep` reuses its outputs.
FINGERPRINT_SCHEME = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class StageSpec(StrictModel):
    name: str
    """Stage name: letters, digits, `-` and `_` (file names and Slurm job names use it)."""
    run: str
    """The stage this runs: a stage of rlm_train/registry.py (`tasks make`, `generate`, `sft`, ...)."""
    recipe: str | None = None
    """Base recipe of that command (a path relative to the working directory)."""
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    """Config keys deep-merged over the recipe."""
    after: list[str] | None = None
    """Stages that must finish first; default: the stage listed before this one."""
    slurm: dict[str, Any] = Field(default_factory=dict)
    """Resources for `rlm-train launch --slurm` (nodes, gpus_per_node, time, partition, ...)."""
    background: bool = False
    """Only for `run: serve`: a server that runs beside the stages listing it in `after`. It is started
    when one of them must run, waited for (GET /health on vllm.host:vllm.port) and stopped after the
    last of them; it never counts as finished, so it is never skipped or rerun for its own sake."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '-' and '_' (at most 64), starting with a letter or digit")
        return value

    @field_validator("run")
    @classmethod
    def _check_run(cls, value: str) -> str:
        value = " ".join(value.split())
        if value not in registry.stage_names():
            raise ValueError(f"unknown command {value!r}; choose from {', '.join(registry.stage_names())}")
        return value


class Requirement(StrictModel):
    """Something a stage reads that no stage makes: a path, or a model."""

    path: str | None = None
    """A file or directory a stage reads that no stage makes (a corpus, a local model directory, ...)."""
    model: str | None = None
    """A model spec a stage names (rlm_train.models.loading): a Hub id such as `Qwen/Qwen3-8B` is
    looked for in the Hugging Face cache, and when missing the line says `hf download Qwen/Qwen3-8B`."""
    how: str = ""
    """The command that makes it, shown when it is missing."""

    @model_validator(mode="after")
    def _one_target(self) -> Requirement:
        if (self.path is None) == (self.model is None):
            raise ValueError("give exactly one of path (a file or directory) and model (e.g. Qwen/Qwen3-8B)")
        return self

    @property
    def target(self) -> str:
        """What the stages name: the path or the model spec."""
        return str(self.model if self.model is not None else self.path)

    def missing(self) -> str:
        """"" when it is on this machine, else one line: why not and how to make it. Nothing is
        downloaded (a Hub model is only looked for in the cache)."""
        if self.model is not None:
            from rlm_train.models.loading import model_missing

            why = model_missing(self.model)
        else:
            why = "" if Path(str(self.path)).expanduser().exists() else "not found"
        return f"{why}; make it first: {self.how}" if why and self.how else why


class PipelineSpec(StrictModel):
    name: str
    """The pipeline's name (Slurm job names start with it)."""
    out_dir: str
    """Where the pipeline keeps its state, the resolved stage recipes and per-stage timings."""
    stages: list[StageSpec]
    """The stages, in the order they run locally."""
    requires: list[Requirement] = Field(default_factory=list)
    """Paths and models made outside the pipeline; `rlm-train pipeline` checks them before any stage runs."""


class PipelineStage:
    """One resolved stage: its registry `Stage`, its typed config (recipe + `with`), and the argv that
    runs it. `raw` is what the written recipe holds: the keys as given (plus what the pipeline sets,
    e.g. a server's window), validated into `config`."""

    def __init__(self, spec: StageSpec, definition: Stage, raw: dict[str, Any], after: list[str], recipe_file: Path,
                 where: str):
        self.name = spec.name
        self.run = definition.name
        self.definition = definition
        self.raw = raw
        self.where = where
        self.config: Any = build_config(definition.config, raw, where)
        self.after = after
        self.slurm = dict(spec.slurm)
        self.recipe_file = recipe_file
        self.background = spec.background

    def update(self, dotted: str, value: Any) -> None:
        """Set one key in the written recipe and the typed config together."""
        node = self.raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.config = build_config(self.definition.config, self.raw, self.where)

    @property
    def argv(self) -> list[str]:
        """Arguments after `rlm-train` that run this stage from its written recipe."""
        return [*self.definition.argv, "--recipe", str(self.recipe_file)]

    @property
    def config_text(self) -> str:
        header = f"# rlm-train {' '.join(self.argv)}\n# written by rlm-train pipeline: edit the pipeline recipe, not this file\n"
        return header + yaml.safe_dump(self.raw, sort_keys=False, allow_unicode=True)

    def fingerprint(self, upstream: list[str]) -> str:
        """Changes when this stage's typed config (every key, defaults included), the code it depends
        on (pipeline/code.py: comments and docstrings left out) or any upstream fingerprint changes."""
        config = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        text = "\n".join([f"scheme {FINGERPRINT_SCHEME}", self.run, config, code_digest(self.definition), *upstream])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, spec: PipelineSpec, path: Path, stages: list[PipelineStage]):
        self.name = spec.name
        self.path = path
        self.out_dir = Path(spec.out_dir)
        self.stages = stages
        self.requires = list(spec.requires)
        self._fingerprints: dict[str, str] | None = None

    @property
    def state_dir(self) -> Path:
        return self.out_dir / "pipeline"

    def stage(self, name: str) -> PipelineStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"{self.path}: no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def fingerprints(self) -> dict[str, str]:
        """Each stage's fingerprint, chained through its `after` stages. Computed once (it hashes
        the code each stage depends on): the run and its report then compare stage states with
        the same fingerprints the run wrote into them."""
        if self._fingerprints is None:
            out: dict[str, str] = {}
            for stage in self.stages:
                out[stage.name] = stage.fingerprint([out[name] for name in stage.after])
            self._fingerprints = out
        return dict(self._fingerprints)

    def write_stage_recipes(self) -> None:
        """Write each stage's resolved recipe where its argv points (only when it changed)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            if not stage.recipe_file.is_file() or stage.recipe_file.read_text() != stage.config_text:
                tmp = stage.recipe_file.with_suffix(".yaml.tmp")
                tmp.write_text(stage.config_text)
                tmp.replace(stage.recipe_file)


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read and check a pipeline recipe: every stage's base recipe exists, names are unique,
    `after` names earlier stages, and every stage's config validates into its config class.
    `overrides` are `STAGE.KEY=VALUE` (a stage's config key)."""
    path = Path(path)
    spec = build_config(PipelineSpec, read_recipe(path), str(path))
    if not spec.stages:
        raise UserError(f"{path}: stages: empty; list at least one stage")
    configs: dict[str, dict[str, Any]] = {}
    seen: list[str] = []
    afters: dict[str, list[str]] = {}
    for index, stage_spec in enumerate(spec.stages):
        where = f"{path}: stages[{index}] ({stage_spec.name})"
        if stage_spec.name in seen:
            raise UserError(f"{where}: duplicate stage name; give each stage its own name")
        if stage_spec.background and stage_spec.run != "serve":
            raise UserError(f"{where}: background: true is only for `run: serve` stages; remove it")
        base: dict[str, Any] = {}
        if stage_spec.recipe is not None:
            if not Path(stage_spec.recipe).is_file():
                raise UserError(f"{where}: recipe {stage_spec.recipe}: file not found; fix the path (relative to the working directory)")
            base = read_recipe(stage_spec.recipe)
        configs[stage_spec.name] = _deep_merge(base, stage_spec.with_)
        after = stage_spec.after if stage_spec.after is not None else seen[-1:]
        for name in after:
            if name not in seen:
                raise UserError(f"{where}: after: {name!r} is not an earlier stage; list only stages above this one")
        seen.append(stage_spec.name)
        afters[stage_spec.name] = list(after)
    for override in overrides:
        stage_name, _, rest = override.partition(".")
        if stage_name not in configs or not rest:
            raise UserError(f"override {override!r}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(seen)}")
        apply_override(configs[stage_name], rest)
    stages = [PipelineStage(stage_spec, registry.stage(stage_spec.run), configs[stage_spec.name],
                            afters[stage_spec.name], Path(spec.out_dir) / "pipeline" / f"{stage_spec.name}.yaml",
                            f"{path}: stage {stage_spec.name}")
              for stage_spec in spec.stages]
    pipeline = Pipeline(spec, path, stages)
    from rlm_train.pipeline.chain import fit_server_windows

    fit_server_windows(pipeline)  # servers' windows from the stages that talk to them, before anything reads the configs
    return pipeline
