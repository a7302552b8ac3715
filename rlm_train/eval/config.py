"""`rlm-train eval`'s typed config: which task sets, which methods, how many samples,
and how the report's confidence intervals are drawn."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from rlm_train.config import StrictModel, bounded, build_config, inherited
from rlm_train.errors import UserError
from rlm_train.policies.spec import ClientOptions
from rlm_train.rlm.loop import RLMConfig
from rlm_train.rollouts.generate import GenerateConfig
from rlm_train.rollouts.tracking import ReportTo

_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class MethodConfig(StrictModel):
    """One row of the report: a root policy (and sub-policy) run over every task, either as
    an RLM or, with `direct: true`, given the context in its prompt."""

    name: str
    """The row's name, also its run directory (`OUT/runs/NAME`): letters, digits, `_.+-`."""
    policy: str
    """Root policy spec: scripted | oracle | constant | openai:MODEL | hf:MODEL[+adapter:PATH]
    (`constant`: the constant-answer floor, fit on `train_tasks`)."""
    sub_policy: str | None = None
    """Policy for sub-calls (llm_query); default: the root policy. Not allowed with `direct`."""
    base_urls: list[str] = Field(default_factory=list)
    """OpenAI-compatible servers for an openai: policy; requests spread over all of them."""
    sub_base_urls: list[str] = Field(default_factory=list)
    """Servers for the sub-policy (default: base_urls)."""
    direct: bool = False
    """The paper's "base model" rows: the model reads the query and the context (cut to
    `max_context_chars`) in one prompt and its reply is the answer; no code, no sub-calls.
    It still runs through the RLM loop, as one turn that submits the reply with FINAL."""
    max_context_chars: int = bounded(32_000, ge=100, le=40_000_000,
                                     why="the prompt holds this much of the context; 40M characters is ~10M "
                                         "tokens, beyond any model's window")
    """`direct` only: characters of the context kept in the prompt (the start; the rest is cut
    with a note saying how much). Size it to the model's context window (~4 characters a token)."""
    one_shot: str | None = None
    """A trajectory store (a `rlm-train generate` output directory, or a trajectory JSONL file):
    the root model gets one solved trajectory of the task's family from it as a worked example in
    its system prompt (the highest score, the shortest among ties; never one of the eval's tasks)."""
    rlm: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the shared `rlm` section for this method only, e.g. {max_iterations: 12}."""

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str) -> str:
        if not _METHOD_NAME.fullmatch(value):
            raise ValueError(f"method name {value!r}: use letters, digits and _.+- (it names a directory)")
        return value

    @model_validator(mode="after")
    def _direct_has_no_sub_policy(self) -> "MethodConfig":
        if self.direct and (self.sub_policy or self.sub_base_urls):
            raise ValueError(f"method {self.name!r} is direct: it makes no sub-calls, so drop sub_policy/sub_base_urls")
        if self.direct and self.one_shot:
            raise ValueError(f"method {self.name!r}: one_shot is for RLM methods (the example is a trajectory); "
                             "drop direct or one_shot")
        if self.policy.strip() == "constant" and (self.sub_policy or self.direct or self.one_shot):
            raise ValueError(f"method {self.name!r}: policy constant is the constant-answer floor: it makes no "
                             "sub-calls and reads nothing, so drop sub_policy, direct and one_shot")
        if (self.sub_policy or "").strip() == "constant":
            raise ValueError(f"method {self.name!r}: constant is a root policy (the constant-answer floor), "
                             "not a sub_policy")
        return self


class BootstrapConfig(StrictModel):
    """Percentile bootstrap over tasks (a task's score is the mean of its samples)."""

    resamples: int = bounded(2000, ge=100, le=1_000_000,
                             why="every interval resamples the tasks this many times, so the report's time "
                                 "grows with it; 10,000 already gives a stable 95% interval")
    """Resamples per interval."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Coverage of every interval (0.95: the 2.5th to the 97.5th percentile)."""
    seed: int = 0
    """Seed of every interval's resampling (each interval derives its own stream from it and its name)."""


class EvalConfig(StrictModel):
    """`rlm-train eval`: several methods over held-out task sets, through the generation loop."""

    tasks: list[str] = Field(default_factory=list)
    """Held-out task files (rlm-train/task/v1 JSONL, e.g. `heldout.jsonl` of `rlm-train tasks make --recipe`)."""
    out: str | None = None
    """Eval directory: eval.json, runs/METHOD/ (one generate run each), report.json, report.md, plots/.
    Re-running the same command resumes every method where it stopped."""
    methods: list[MethodConfig] = Field(default_factory=list)
    """The rows of the report, run in this order."""
    # Each method is one generate run: its bounds, and their reasons, are generate's.
    samples: int = inherited(GenerateConfig, "samples", 1)
    """Episodes per (method, task); a task's score is the mean over its samples."""
    concurrency: int = inherited(GenerateConfig, "concurrency", 32)
    """Episodes of one method in flight at once."""
    client: ClientOptions = Field(default_factory=lambda: ClientOptions(max_concurrency=1024))
    """How openai: policies talk to their servers (request_timeout_s, max_retries, max_concurrency)."""
    max_consecutive_failures: int = Field(32, ge=1)
    """Stop when this many episodes in a row got no answer from the server (a re-run retries them)."""
    rlm: RLMConfig = Field(default_factory=RLMConfig)
    """How each episode runs (shared by every method; a method's `rlm` overrides keys of it)."""
    train_tasks: list[str] = Field(default_factory=list)
    """Training task files: when given, eval warns with the count of keys (split_keys of each
    family, ids, seeds, wordings) the eval tasks share with them. A `constant` method is fit on them."""
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    """Confidence intervals of the report."""
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    """Paired comparisons [A, B] (B minus A, on the tasks both scored); empty: every pair, in method order."""
    progress: bool = True
    """Show progress per method on stderr: a bar on a terminal, plain lines elsewhere."""
    progress_every_s: float = Field(30.0, gt=0, le=86_400)
    """Seconds between plain progress lines where stderr is not a terminal (Slurm logs, pipes)."""
    report_to: ReportTo = []
    """Metric sinks for the report's numbers (per method: score overall and per family, episodes,
    errors, costs, throughput): tensorboard (OUT/tensorboard), wandb; none by default. A sink named
    here must be installed (--dry-run checks)."""
    run_name: str | None = None
    """Run name in TensorBoard / W&B (default: the eval directory's name)."""
    wandb_project: str | None = None
    """W&B project; setting it turns W&B on (WANDB_API_KEY, `wandb login` or WANDB_MODE=offline as usual)."""

    @field_validator("tasks", "train_tasks", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _methods_are_consistent(self) -> "EvalConfig":
        names = [m.name for m in self.methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique; {', '.join(duplicates)} appears twice")
        for a, b in self.pairs:
            for name in (a, b):
                if name not in names:
                    raise ValueError(f"pairs: {name!r} is not a method (methods: {', '.join(names) or 'none'})")
        for method in self.methods:
            method_rlm(self.rlm, method)  # its overrides must make a valid RLMConfig
        return self


def method_rlm(shared: RLMConfig, method: MethodConfig) -> RLMConfig:
    """The RLMConfig a method runs with: the shared section, its overrides on top."""
    if not method.rlm:
        return shared
    data = _merge(shared.model_dump(), method.rlm)
    try:
        return build_config(RLMConfig, data, source=f"method {method.name!r} rlm overrides")
    except UserError as exc:
        raise ValueError(str(exc)) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def method_pairs(config: EvalConfig) -> list[tuple[str, str]]:
    """The paired comparisons the report makes: the configured ones, or every pair in order."""
    if config.pairs:
        return [(a, b) for a, b in config.pairs]
    names = [m.name for m in config.methods]
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
