"""Does each stage read what an earlier stage writes? The links of a pipeline, from the plans.

For every path a stage reads (its plan's `inputs`, the `hf:` models of its policies, a serve
stage's model and adapters) the link says where it comes from: an earlier stage's output (the
same path, or a path inside an output directory), the pipeline's `requires:`, or a path that
exists here (a file in the repository, the packaged model). For `openai:MODEL` policies it also
says which background serve stage serves MODEL at that URL. A link with no source is a break:
the stage would stop at a missing input, or read a file another run left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlm_train.pipeline.plans import Plan
from rlm_train.pipeline.recipe import Pipeline, Stage

PACKAGED_MODELS = ("gemma3-270m",)  # model specs that resolve to weights shipped as a package
_NOT_PATHS = ("scripted", "oracle", "same", "none", "")


@dataclass
class Link:
    stage: str
    name: str      # the input's name in the plan (or `methods.NAME.policy`, ...)
    path: str      # a path, or `MODEL @ URL` for a served model
    source: str    # "stage NAME", "requires", "exists here", "served by NAME"; "" when broken

    @property
    def broken(self) -> bool:
        return not self.source

    def describe(self) -> str:
        return f"{self.name}: {self.path} <- {self.source or 'NOT MADE BY AN EARLIER STAGE AND NOT FOUND HERE'}"


def _norm(path: str) -> str:
    return os.path.normpath(os.path.expanduser(str(path)))


def policy_paths(spec: Any) -> list[str]:
    """The local paths in a policy spec: `hf:PATH[+adapter:PATH]`; none for the others."""
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


def extra_inputs(stage: Stage) -> dict[str, list[str]]:
    """Paths a stage reads that its plan does not list: eval methods' `hf:` models (eval's plan
    names only its task files) and a serve stage's model and adapters (its plan fails before it
    lists them when the model is not on this machine)."""
    config = stage.config
    out: dict[str, list[str]] = {}
    if stage.run == "eval":
        for method in config.get("methods") or []:
            for key in ("policy", "sub_policy"):
                paths = policy_paths(method.get(key))
                if paths:
                    out[f"methods.{method.get('name')}.{key}"] = paths
    if stage.run == "serve":
        vllm = config.get("vllm") or {}
        if vllm.get("model"):
            out["vllm.model"] = [str(vllm["model"])]
        for adapter, path in (vllm.get("adapters") or {}).items():
            out[f"vllm.adapters.{adapter}"] = [str(path)]
    return out


def served_models(stage: Stage) -> tuple[int, set[str]]:
    """(port, model names) a serve stage answers for: its served name (or the model directory's
    name) and its adapters' names."""
    vllm = stage.config.get("vllm") or {}
    model = str(vllm.get("model") or "")
    names = {str(vllm.get("served_model_name") or (model if model in PACKAGED_MODELS else Path(model).name))}
    names |= set((vllm.get("adapters") or {}).keys())
    return int(vllm.get("port", 8000)), names


def openai_uses(stage: Stage) -> list[tuple[str, str, list[str]]]:
    """(where, MODEL, URLs) for every `openai:MODEL` policy of a generate or eval stage."""
    uses: list[tuple[str, str, list[str]]] = []

    def add(where: str, spec: Any, urls: Any) -> None:
        if isinstance(spec, str) and spec.startswith("openai:"):
            uses.append((where, spec[len("openai:"):], [str(u) for u in (urls or [])]))

    config = stage.config
    if stage.run == "generate":
        add("policy", config.get("policy"), config.get("base_urls"))
        add("sub_policy", config.get("sub_policy"), config.get("sub_base_urls") or config.get("base_urls"))
    if stage.run == "eval":
        for method in config.get("methods") or []:
            name = method.get("name")
            urls = method.get("base_urls") or config.get("base_urls")
            add(f"methods.{name}.policy", method.get("policy"), urls)
            add(f"methods.{name}.sub_policy", method.get("sub_policy"),
                method.get("sub_base_urls") or urls)
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
    required = {_norm(r.path) for r in pipeline.requires}
    earlier: dict[str, list[str]] = {}
    links: list[Link] = []
    for stage in pipeline.stages:
        plan = plans.get(stage.name) or Plan()
        wanted: list[tuple[str, str]] = [(name, p) for name, value in plan.inputs.items()
                                         for p in input_paths(name, value)]
        seen = {p for _, p in wanted}
        wanted += [(name, p) for name, paths in extra_inputs(stage).items() for p in paths if p not in seen]
        for name, path in wanted:
            if (maker := _made_by(path, earlier)):
                source = f"stage {maker}"
            elif _norm(path) in required:
                source = "requires"
            elif path in PACKAGED_MODELS or Path(path).expanduser().exists():
                source = "exists here"
            else:
                source = ""
            links.append(Link(stage.name, name, path, source))
        servers = [pipeline.stage(name) for name in stage.after if pipeline.stage(name).background]
        for where, model, urls in openai_uses(stage):
            for url in urls or ["(no base_urls)"]:
                port = urlparse(url).port
                source = ""
                for server in servers:
                    server_port, names = served_models(server)
                    if server_port == port and model in names:
                        source = f"served by {server.name}"
                links.append(Link(stage.name, where, f"{model} @ {url}", source))
        earlier[stage.name] = plan.output_paths
    return links
