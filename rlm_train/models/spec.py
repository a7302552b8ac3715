"""Policy specs: the strings `--policy` / `--sub-policy` take, turned into policies.

    scripted                  the programmatic teacher (no model, any machine)
    oracle                    answers from the task's reference (tests, upper bounds)
    openai:MODEL              an OpenAI-compatible server (vLLM); needs --base-url, repeatable
    hf:PATH[+adapter:PATH]    in-process transformers, optionally with a PEFT adapter

Backends are imported only when built, so parsing a spec (and `rlm-train
--help`) never pays for torch or transformers.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

from rlm_train.errors import UserError
from rlm_train.models.base import Policy

VALID_FORMS = ("scripted | oracle | openai:MODEL (with --base-url http://HOST:PORT/v1, repeatable) "
               "| hf:PATH[+adapter:PATH]")

# kind -> "module:Class", imported lazily.
_BACKENDS = {
    "scripted": "rlm_train.models.scripted:ScriptedTeacher",
    "oracle": "rlm_train.tasks.oracle:OraclePolicy",
    "openai": "rlm_train.models.openai_client:OpenAIPolicy",
    "hf": "rlm_train.models.hf:HFPolicy",
}


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into its kind and arguments, e.g. ("hf", {"path": "out/m", "adapter": None})."""
    s = (spec or "").strip()
    kind, sep, rest = s.partition(":")
    if s in ("scripted", "oracle"):
        return s, {}
    if kind == "openai" and sep:
        if not rest.strip():
            raise UserError(f"policy spec {spec!r} names no model: use openai:MODEL, e.g. openai:Qwen/Qwen3-8B")
        return "openai", {"model": rest.strip()}
    if kind == "hf" and sep:
        # rpartition: a model path may itself contain '+', the adapter marker comes last.
        path, marker, adapter = rest.rpartition("+adapter:")
        if not marker:
            path, adapter = rest, None
        if not path.strip():
            raise UserError(f"policy spec {spec!r} names no model path: use hf:PATH or hf:PATH+adapter:PATH")
        if adapter is not None and not adapter.strip():
            raise UserError(f"policy spec {spec!r} has an empty adapter path: use hf:PATH+adapter:ADAPTER_DIR")
        return "hf", {"path": path.strip(), "adapter": adapter.strip() if adapter else None}
    raise UserError(f"unknown policy spec {spec!r}; valid forms: {VALID_FORMS}")


def build_policy(spec: str, base_urls: list[str] | None = None, **options: Any) -> Policy:
    """Build the policy a spec names; its `.name` is the spec string.

    `base_urls` is used by openai: specs only. `options` go to the backend's
    constructor (e.g. timeout_s, max_concurrency for openai:); an option left at
    None is dropped so the backend default applies, and a set option the backend
    does not take is an error rather than silently ignored. For openai: the API
    key is read from the environment variable `api_key_env` (default
    OPENAI_API_KEY; "EMPTY" when unset, which is what vLLM expects).
    """
    kind, args = parse_policy_spec(spec)
    options = {k: v for k, v in options.items() if v is not None}
    if kind == "openai":
        urls = [u.strip() for u in (base_urls or []) if u and u.strip()]
        if not urls:
            raise UserError(f"policy {spec!r} needs a server: pass --base-url http://HOST:PORT/v1 "
                            "(repeat it to spread requests over several servers)")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise UserError(f"--base-url {url!r} must look like http://HOST:PORT/v1")
        key_env = options.pop("api_key_env", "OPENAI_API_KEY")
        api_key = options.pop("api_key", None) or os.environ.get(key_env) or "EMPTY"
        args = {**args, "base_urls": urls, "api_key": api_key, "name": spec}
    cls = _load(kind, spec)
    _check_options(cls, kind, spec, options)
    policy = cls(**args, **options)
    policy.name = spec
    return policy


def _load(kind: str, spec: str) -> type:
    module_name, _, attr = _BACKENDS[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # A missing third-party package is a setup problem the user can fix; a
        # missing project module is a bug and should surface as is.
        if e.name and not e.name.startswith("rlm_train"):
            raise UserError(f"policy {spec!r} needs the Python package {e.name!r}; "
                            "install the training extra: pip install -e '.[train]'") from e
        raise
    return getattr(module, attr)


def _check_options(cls: type, kind: str, spec: str, options: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise UserError(f"option(s) {', '.join(unknown)} do not apply to policy {spec!r} ({kind})")
