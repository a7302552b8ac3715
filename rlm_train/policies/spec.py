"""Policy specs: the strings `--policy` / `--sub-policy` take, turned into policies.

    scripted                  the programmatic teacher (no model, any machine)
    scripted:most-frequent-kind  the most-frequent-kind floor: the teacher, but on oolong always the
                              program of the kind most frequent in training (a count of one label)
    oracle                    a gold-label lookup answering sub-calls (tests, upper bounds; only tasks
                              that `rlm-train tasks make` built)
    constant                  `rlm-train eval`'s constant-answer floor (fit on training tasks): one
                              fixed answer per family and answer form, reads no context
    openai:MODEL              an OpenAI-compatible server (vLLM); needs --base-url, repeatable
    hf:MODEL[+adapter:PATH]   in-process transformers, optionally with a PEFT adapter; MODEL is a
                              model directory, a Hub id in the Hugging Face cache (Qwen/Qwen3-8B)
                              or gemma3-270m (rlm_train.models.loading.resolve_model)

Backends are imported only when built, so parsing a spec (and `rlm-train
--help`) never pays for torch or transformers. This is the one composition root:
every command and stage builds its root and sub policies with `build_policies`, from
the specs plus one `ClientOptions` (how openai: policies talk to their servers).
"""

from __future__ import annotations

import os
from typing import Any

from rlm_train.config import StrictModel, bounded
from rlm_train.errors import UserError
from rlm_train.models.base import Policy

VALID_FORMS = ("scripted | oracle | openai:MODEL (with --base-url http://HOST:PORT/v1, repeatable) "
               "| hf:MODEL[+adapter:PATH] (MODEL: a model directory, a cached Hub id such as Qwen/Qwen3-8B, "
               "or gemma3-270m) | constant (an eval method only) | scripted:most-frequent-kind (an oolong floor)")


def _scripted() -> type:
    from rlm_train.policies.scripted import ScriptedTeacher

    return ScriptedTeacher


def _oracle() -> type:
    from rlm_train.policies.oracle import OraclePolicy

    return OraclePolicy


def _constant() -> type:
    from rlm_train.policies.baselines import ConstantPolicy

    return ConstantPolicy


def _openai() -> type:
    from rlm_train.models.openai_client import OpenAIPolicy

    return OpenAIPolicy


def _hf() -> type:
    from rlm_train.models.hf import HFPolicy

    return HFPolicy


# `scripted:NAME` variants (policies.scripted.VARIANTS), named here so parsing stays light.
SCRIPTED_VARIANTS = ("most-frequent-kind",)

# kind -> the backend class, imported when first built (plain imports, so tools see them).
_BACKENDS = {"scripted": _scripted, "oracle": _oracle, "constant": _constant, "openai": _openai, "hf": _hf}


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into its kind and arguments, e.g. ("hf", {"path": "out/m", "adapter": None});
    an hf: model (`path`) is any model spec `resolve_model` takes, a Hub id included."""
    s = (spec or "").strip()
    kind, sep, rest = s.partition(":")
    if s in ("scripted", "oracle", "constant"):
        return s, {}
    if kind == "scripted" and sep:
        if rest.strip() not in SCRIPTED_VARIANTS:
            raise UserError(f"policy spec {spec!r}: unknown scripted variant {rest.strip()!r}; "
                            f"known: {', '.join(SCRIPTED_VARIANTS)}")
        return "scripted", {"variant": rest.strip()}
    if kind == "openai" and sep:
        if not rest.strip():
            raise UserError(f"policy spec {spec!r} names no model: use openai:MODEL, e.g. openai:Qwen/Qwen3-8B")
        return "openai", {"model": rest.strip()}
    if kind == "hf" and sep:
        # rpartition: a model path may itself contain '+', the adapter marker comes last.
        adapter: str | None
        path, marker, adapter = rest.rpartition("+adapter:")
        if not marker:
            path, adapter = rest, None
        if not path.strip():
            raise UserError(f"policy spec {spec!r} names no model: use hf:MODEL or hf:MODEL+adapter:PATH "
                            "(MODEL: a model directory or a Hub id such as Qwen/Qwen3-8B)")
        if adapter is not None and not adapter.strip():
            raise UserError(f"policy spec {spec!r} has an empty adapter path: use hf:PATH+adapter:ADAPTER_DIR")
        return "hf", {"path": path.strip(), "adapter": adapter.strip() if adapter else None}
    raise UserError(f"unknown policy spec {spec!r}; valid forms: {VALID_FORMS}")


class ClientOptions(StrictModel):
    """How openai: policies talk to their servers (other policies ignore it). One vocabulary
    for every command and recipe: `--request-timeout-s`, `--max-retries`, `--max-concurrency`."""

    request_timeout_s: float = bounded(120.0, gt=0, le=86_400,
                                       why="a day for one answer; a request still silent then is retried")
    """Seconds to wait for one answer before the request is retried (an HTTP timeout, not a cell's)."""
    max_retries: int = bounded(5, ge=0, le=100, why="retries back off, so 100 of them already span hours")
    """Retries of one request (connection errors, timeouts, 5xx, 429), with backoff and jitter."""
    max_concurrency: int = bounded(64, ge=1, le=16_384,
                                   why="each request in flight holds a connection (a file descriptor) and its "
                                       "prompt")
    """HTTP requests in flight at once per policy (root turns and sub-calls together)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key ("EMPTY" when unset, which is what vLLM expects)."""
    stream: bool = True
    """Stream answers: a server that sends tokens is slow, not dead, so only silence for the whole
    timeout counts against it (false: one JSON answer, for servers that cannot stream)."""
    health_timeout_s: float = bounded(10.0, gt=0, le=3600, why="an hour for /health to answer")
    """Seconds for a server's /health to answer when a request went silent (busy, or dead)."""


def build_policies(policy: str | None, sub_policy: str | None = None, base_urls: list[str] | None = None,
                   sub_base_urls: list[str] | None = None,
                   client: ClientOptions | None = None) -> tuple[Policy, Policy | None]:
    """The root policy and the sub-policy (None: sub-calls use the root policy). The
    sub-policy's servers default to the root's."""
    if not policy:
        raise UserError("no policy: pass --policy (scripted | openai:MODEL | hf:MODEL) or set `policy` in the recipe")
    client = client or ClientOptions()
    root = build_policy(policy, base_urls, client)
    sub = build_policy(sub_policy, sub_base_urls or base_urls, client) if sub_policy else None
    return root, sub


def build_policy(spec: str, base_urls: list[str] | None = None, client: ClientOptions | None = None) -> Policy:
    """Build the policy a spec names; its `.name` is the spec string. `base_urls` and
    `client` are used by openai: specs only."""
    kind, args = parse_policy_spec(spec)
    options: dict[str, Any] = {}
    if kind == "openai":
        client = client or ClientOptions()
        urls = [u.strip() for u in (base_urls or []) if u and u.strip()]
        if not urls:
            raise UserError(f"policy {spec!r} needs a server: pass --base-url http://HOST:PORT/v1 "
                            "(repeat it to spread requests over several servers)")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise UserError(f"--base-url {url!r} must look like http://HOST:PORT/v1")
        api_key = os.environ.get(client.api_key_env) or "EMPTY"
        args = {**args, "base_urls": urls, "api_key": api_key, "name": spec}
        options = {"request_timeout_s": client.request_timeout_s, "max_retries": client.max_retries,
                   "max_concurrency": client.max_concurrency, "stream": client.stream,
                   "health_timeout_s": client.health_timeout_s}
    cls = _load(kind, spec)
    policy = cls(**args, **options)
    policy.name = spec
    return policy


def _load(kind: str, spec: str) -> type:
    try:
        return _BACKENDS[kind]()
    except ModuleNotFoundError as e:
        # A missing third-party package is a setup problem the user can fix; a
        # missing project module is a bug and should surface as is.
        if e.name and not e.name.startswith("rlm_train"):
            raise UserError(f"policy {spec!r} needs the Python package {e.name!r}; "
                            "install the training extra: pip install -e '.[train]'") from e
        raise
