"""Does each stage read what an earlier stage writes? The links of a pipeline, from the plans.

For every path a stage reads (its plan's `inputs`, the `hf:` models of its policies, a serve
stage's model and adapters) the link says where it comes from: an earlier stage's output (the
same path, or a path inside an output directory), the pipeline's `requires:`, or a path that
exists here (a file in the repository, the packaged model, a Hub model in the Hugging Face
cache). For `openai:MODEL` policies it also
says which background serve stage serves MODEL at that URL. A link with no source is a break:
the stage would stop at a missing input, or read a file another run left behind.

`fit_server_windows` sizes the servers the stages start, before anything plans or runs: each
gets the window (vLLM `--max-model-len`) the stages talking to it need, from their RLM
configs, and a window given smaller than that is refused.
"""

from __future__ import annotations

import math

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig
from rlm_train.models.hub import hub_model
from rlm_train.models.loading import model_missing, model_name
from rlm_train.pipeline.recipe import Pipeline, PipelineStage
from rlm_train.rollouts.generate import GenerateConfig
from rlm_train.serve.config import ServeConfig, VLLMConfig
from rlm_train.stage import Plan

PACKAGED_MODELS = ("gemma3-270m",)  # model specs that resolve to weights shipped as a package
_NOT_PATHS = ("scripted", "oracle", "same", "none", "")


class SourceKind(Enum):
    """Where an input comes from; programs decide on the kind, people read `Link.source`."""

    STAGE = "stage"            # an earlier stage writes it (`Link.maker`)
    REQUIRES = "requires"      # the recipe's `requires:` lists it
    HERE = "exists here"       # on this machine already (or a packaged model)
    HF_CACHE = "in the Hugging Face cache"
    SERVED = "served by"       # a background serve stage answers for it (`Link.maker`)
    NONE = ""                  # nothing makes it: a break


@dataclass
class Link:
    stage: str
    name: str      # the input's name in the plan (or `methods.NAME.policy`, ...)
    path: str      # a path, or `MODEL @ URL` for a served model
    kind: SourceKind
    maker: str = ""  # the stage that writes it, or the server stage that serves it

    @property
    def source(self) -> str:
        """Where it comes from, in words: `stage NAME`, `requires`, `served by NAME`, ...; "" when broken."""
        return f"{self.kind.value} {self.maker}" if self.maker else self.kind.value

    @property
    def broken(self) -> bool:
        return self.kind == SourceKind.NONE

    def describe(self) -> str:
        return f"{self.name}: {self.path} <- {self.source or 'NOT MADE BY AN EARLIER STAGE AND NOT FOUND HERE'}"


def _norm(path: str) -> str:
    return os.path.normpath(os.path.expanduser(str(path)))


def policy_paths(spec: Any) -> list[str]:
    """The model and adapter in a policy spec, `hf:MODEL[+adapter:PATH]` (MODEL: a path or a Hub id); none for the others."""
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        return []
    model, _, adapter = spec[3:].partition("+adapter:")
    return [p for p in (model, adapter) if p]


def input_paths(name: str, value: Any) -> list[str]:
    """The paths in one `inputs:` entry of a plan (policy specs, URLs and adapter names left out)."""
    values = value if isinstance(value, list) else [value]
    paths: list[str] = []
    for item in values:
        if not isinstance(item, str) or item in _NOT_PATHS or "://" in item:
            continue
        if name in ("policy", "sub_policy"):
            paths += policy_paths(item)
        elif name == "adapters":
            paths.append(item.partition("=")[2])
        elif ":" in item.split("/", 1)[0] and not item.startswith("hf:"):
            continue  # openai:MODEL and other specs
        else:
            paths += policy_paths(item) if item.startswith("hf:") else [item]
    return [p for p in paths if p]


def extra_inputs(stage: PipelineStage) -> dict[str, list[str]]:
    """Paths a stage reads that its plan does not list: eval methods' `hf:` models (eval's plan
    names only its task files) and a serve stage's model and adapters (its plan fails before it
    lists them when the model is not on this machine)."""
    config = stage.config
    out: dict[str, list[str]] = {}
    if isinstance(config, EvalConfig):
        for method in config.methods:
            for key, spec in (("policy", method.policy), ("sub_policy", method.sub_policy)):
                paths = policy_paths(spec)
                if paths:
                    out[f"methods.{method.name}.{key}"] = paths
    if isinstance(config, ServeConfig):
        if config.vllm.model:
            out["vllm.model"] = [config.vllm.model]
        for adapter, path in config.vllm.adapters.items():
            out[f"vllm.adapters.{adapter}"] = [path]
    return out


def served_names(vllm: VLLMConfig) -> set[str]:
    """The model names a serve config's vLLM answers for: its served name (by default the Hub id,
    or the model directory's name: loading.model_name) and its adapters' names."""
    return {vllm.served_model_name or model_name(vllm.model or "")} | set(vllm.adapters)


def served_models(stage: PipelineStage) -> tuple[int, set[str]]:
    """(port, model names) a serve stage answers for."""
    vllm = stage.config.vllm
    return vllm.port, served_names(vllm)


def openai_uses(stage: PipelineStage) -> list[tuple[str, str, list[str]]]:
    """(where, MODEL, URLs) for every `openai:MODEL` policy of a generate or eval stage."""
    uses: list[tuple[str, str, list[str]]] = []

    def add(where: str, spec: str | None, urls: list[str]) -> None:
        if spec and spec.startswith("openai:"):
            uses.append((where, spec[len("openai:"):], list(urls)))

    config = stage.config
    if isinstance(config, GenerateConfig):
        add("policy", config.policy, config.base_urls)
        add("sub_policy", config.sub_policy, config.sub_base_urls or config.base_urls)
    if isinstance(config, EvalConfig):
        for method in config.methods:
            add(f"methods.{method.name}.policy", method.policy, method.base_urls)
            add(f"methods.{method.name}.sub_policy", method.sub_policy, method.sub_base_urls or method.base_urls)
    return uses


def _made_by(path: str, earlier: dict[str, list[str]]) -> str:
    want = _norm(path)
    for stage_name in reversed(list(earlier)):
        for output in earlier[stage_name]:
            made = _norm(output)
            if want == made or want.startswith(made.rstrip("/") + "/"):
                return stage_name
    return ""


def check_chain(pipeline: Pipeline, plans: dict[str, Plan]) -> list[Link]:
    """Every input link of every stage, in order (see the module docstring)."""
    required = {_norm(r.target) for r in pipeline.requires}
    earlier: dict[str, list[str]] = {}
    links: list[Link] = []
    for stage in pipeline.stages:
        plan = plans.get(stage.name) or Plan()
        wanted: list[tuple[str, str]] = [(name, p) for name, value in plan.inputs.items()
                                         for p in input_paths(name, value)]
        seen = {p for _, p in wanted}
        wanted += [(name, p) for name, paths in extra_inputs(stage).items() for p in paths if p not in seen]
        for name, path in wanted:
            maker = _made_by(path, earlier)
            if maker:
                kind = SourceKind.STAGE
            elif _norm(path) in required:
                kind = SourceKind.REQUIRES
            elif path in PACKAGED_MODELS or Path(path).expanduser().exists():
                kind = SourceKind.HERE
            elif hub_model(path) is not None and not model_missing(path):
                kind = SourceKind.HF_CACHE
            else:
                kind = SourceKind.NONE
            links.append(Link(stage.name, name, path, kind, maker or ""))
        servers = [pipeline.stage(name) for name in stage.after if pipeline.stage(name).background]
        for where, model, urls in openai_uses(stage):
            for url in urls or ["(no base_urls)"]:
                port = urlparse(url).port
                serving = [server.name for server in servers if served_models(server)[0] == port
                           and model in served_models(server)[1]]
                links.append(Link(stage.name, where, f"{model} @ {url}",
                                  SourceKind.SERVED if serving else SourceKind.NONE, serving[-1] if serving else ""))
        earlier[stage.name] = plan.output_paths
    return links


# ---------------------------------------------------------------------------
# Server windows


def longest_request(stage: PipelineStage, where: str) -> int | None:
    """The longest request (prompt + max tokens, rounded up to 256) that the policy `where`
    (an `openai_uses` name) of a generate or eval stage sends its server, from the stage's RLM
    config (rlm/window.py): a root policy its longest conversation (a one-shot method's worked
    example included), and its longest sub-call when it answers the sub-calls too (no
    sub_policy); a sub-policy its longest sub-call; a direct method its one prompt."""
    from rlm_train.eval.config import method_rlm
    from rlm_train.eval.one_shot import EXAMPLE_CHARS
    from rlm_train.rlm.window import CHARS_PER_TOKEN, direct_tokens, root_tokens, rounded, sub_call_tokens

    holder, role = where.rsplit(".", 1) if "." in where else ("", where)
    config = stage.config
    example = 0
    if isinstance(config, EvalConfig):
        method = next((m for m in config.methods if f"methods.{m.name}" == holder), None)
        if method is None:
            return None
        rlm, sub_policy = method_rlm(config.rlm, method), method.sub_policy
        if method.direct:
            return rounded(direct_tokens(rlm, method.max_context_chars))
        if method.one_shot:
            example = math.ceil(EXAMPLE_CHARS / CHARS_PER_TOKEN)
    elif isinstance(config, GenerateConfig):
        rlm, sub_policy = config.rlm, config.sub_policy
    else:
        return None
    if role == "sub_policy":
        return rounded(sub_call_tokens(rlm))
    return rounded(max(root_tokens(rlm) + example, 0 if sub_policy else sub_call_tokens(rlm)))


@dataclass
class WindowUse:
    tokens: int  # the longest request
    stage: str   # the stage that sends it
    where: str   # by which of its policies (`policy`, `methods.NAME.sub_policy`, ...)


def window_uses(stage: PipelineStage, names: set[str], port: int | None) -> list[WindowUse]:
    """The requests `stage` sends to a server answering for `names` on `port` (None: any URL)."""
    out = []
    for where, model, urls in openai_uses(stage):
        if model in names and (port is None or any(urlparse(url).port == port for url in urls)):
            tokens = longest_request(stage, where)
            if tokens:
                out.append(WindowUse(tokens, stage.name, where))
    return out


def fit_server(pipeline: Pipeline, server: str, vllm: VLLMConfig, uses: list[WindowUse]) -> list[str] | None:
    """One server config's window: its vllm.args with --max-model-len added for the longest of `uses`
    when they set none (None: nothing to change); a UserError naming the numbers when the one set is
    smaller, or when the window is longer than the model's positions (known when its config.json is
    on this machine)."""
    from rlm_train.serve.vllm_window import long_windows_allowed, max_model_len_arg, model_positions

    if not uses:
        return None
    need = max(uses, key=lambda use: use.tokens)
    args = list(vllm.args)
    where = f"{pipeline.path}: stage {server}"
    given = max_model_len_arg(args, f"{where}: vllm.args")
    if given is not None and given < need.tokens:
        raise UserError(f"{where} serves a {given}-token window (vllm.args --max-model-len) but stage {need.stage} "
                        f"sends it requests of up to {need.tokens} tokens ({need.where}, from its rlm config); drop the "
                        f"flag (the pipeline sizes the window) or lower stage {need.stage}'s rlm budgets")
    model = vllm.model or ""
    positions = None if long_windows_allowed(vllm.env) else model_positions(model, args)
    if positions is not None and given is not None and given > positions:
        raise UserError(f"{where}: vllm.args --max-model-len {given} is longer than the {positions} positions of "
                        f"{model} (its config.json), which vLLM refuses; set it between {need.tokens} (stage "
                        f"{need.stage}'s longest request) and {positions}, or enable rope scaling (--hf-overrides)")
    if positions is not None and need.tokens > positions:
        raise UserError(f"{where}: stage {need.stage} sends requests of up to {need.tokens} tokens ({need.where}, from "
                        f"its rlm config) but {model} holds {positions} positions (its config.json); lower stage "
                        f"{need.stage}'s rlm budgets (max_iterations, root_max_tokens, feedback_chars, sub_model_chars) "
                        f"or enable rope scaling in stage {server}'s vllm.args (--hf-overrides)")
    return [*args, "--max-model-len", str(need.tokens)] if given is None else None


def slurm_server(stage: PipelineStage) -> ServeConfig | None:
    """A generate or eval stage's `slurm.server` (a vLLM its jobs start), typed; None when it has none."""
    from rlm_train.config import build_config

    server = stage.slurm.get("server")
    if server is None:
        return None
    if not isinstance(server, dict):
        raise UserError(f"{stage.where}: slurm.server: expected a mapping of `rlm-train serve` keys (vllm: {{model: ...}})")
    return build_config(ServeConfig, server, f"{stage.where}: slurm.server")


def fit_server_windows(pipeline: Pipeline) -> None:
    """Size the window of every server a pipeline's stages start from the stages that talk to it
    (rlm/window.py), before any stage plans or runs: a background serve stage's from the stages
    listing it in `after` whose `openai:` policies name its port and models; a generate or eval
    stage's own `slurm.server` from that stage (see `fit_server`)."""
    for stage in pipeline.stages:
        if stage.background and isinstance(stage.config, ServeConfig) and stage.config.vllm.model:
            port, names = served_models(stage)
            users = [user for user in pipeline.stages if stage.name in user.after]
            args = fit_server(pipeline, stage.name, stage.config.vllm,
                              [use for user in users for use in window_uses(user, names, port)])
            if args is not None:
                stage.update("vllm.args", args)
        own = slurm_server(stage)
        if own is not None and own.vllm.model:
            # `rlm-train launch` points the stage's base_urls at this server: every use of its models counts.
            args = fit_server(pipeline, f"{stage.name} (slurm.server)", own.vllm,
                              window_uses(stage, served_names(own.vllm), None))
            if args is not None:
                stage.slurm["server"].setdefault("vllm", {})["args"] = args
