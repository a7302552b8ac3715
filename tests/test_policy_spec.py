"""Policy spec parsing and building."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from rlm_train.errors import UserError
from rlm_train.testing.mock_server import MockOpenAIServer
from rlm_train.models.openai_client import OpenAIPolicy
from rlm_train.policies import spec as spec_module
from rlm_train.policies.spec import ClientOptions, build_policies, build_policy, parse_policy_spec


@pytest.mark.parametrize("spec, expected", [
    ("scripted", ("scripted", {})),
    ("oracle", ("oracle", {})),
    ("openai:Qwen/Qwen3-8B", ("openai", {"model": "Qwen/Qwen3-8B"})),
    ("openai:org/model:tag", ("openai", {"model": "org/model:tag"})),
    ("hf:out/sft", ("hf", {"path": "out/sft", "adapter": None})),
    ("hf:/models/base+adapter:/runs/lora", ("hf", {"path": "/models/base", "adapter": "/runs/lora"})),
    ("hf:a+b/model+adapter:x", ("hf", {"path": "a+b/model", "adapter": "x"})),
    ("hf:Qwen/Qwen3-8B@main+adapter:runs/sft/adapter", ("hf", {"path": "Qwen/Qwen3-8B@main", "adapter": "runs/sft/adapter"})),
])
def test_parse_valid_specs(spec, expected):
    assert parse_policy_spec(spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("gpt4", "valid forms: scripted | oracle | openai:MODEL"),
    ("", "valid forms"),
    ("mock:echo", "hf:MODEL[+adapter:PATH]"),
    ("openai:", "names no model"),
    ("hf:", "names no model: use hf:MODEL"),
    ("hf:base+adapter:", "empty adapter path"),
])
def test_parse_invalid_specs(spec, fragment):
    with pytest.raises(UserError) as info:
        parse_policy_spec(spec)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_openai_without_base_url_says_what_to_pass():
    with pytest.raises(UserError, match=r"--base-url http://HOST:PORT/v1"):
        build_policy("openai:m")
    with pytest.raises(UserError, match="must look like http://HOST:PORT/v1"):
        build_policy("openai:m", ["localhost:8000"])


def say_hi(policy):
    """One chat request, then the policy's connections closed."""

    async def go():
        try:
            return await policy.chat([{"role": "user", "content": "hi"}])
        finally:
            await policy.aclose()

    return asyncio.run(go())


def test_openai_builds_a_working_policy_with_env_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    with MockOpenAIServer() as srv:
        policy = build_policy("openai:tiny", [srv.base_url, srv.base_url + "/"],
                              ClientOptions(api_key_env="MY_KEY", request_timeout_s=5))
        assert isinstance(policy, OpenAIPolicy) and policy.name == "openai:tiny"
        assert policy.model == "tiny" and policy.base_urls == [srv.base_url, srv.base_url]
        assert policy.request_timeout_s == 5 and policy.max_concurrency == 64

        assert say_hi(policy).text == "echo: hi"
        assert srv.headers[-1]["authorization"] == "Bearer sk-from-env"


def test_client_options_reach_the_policy_streaming_and_health_included():
    with MockOpenAIServer() as srv:
        policy = build_policy("openai:tiny", [srv.base_url], ClientOptions(stream=False, health_timeout_s=3))
        assert isinstance(policy, OpenAIPolicy) and policy.health_timeout_s == 3

        assert say_hi(policy).text == "echo: hi"
        assert "stream" not in srv.bodies[-1]  # one JSON answer, not server-sent events
        streaming = build_policy("openai:tiny", [srv.base_url])
        assert streaming.stream is True


def test_openai_key_defaults_to_empty(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with MockOpenAIServer() as srv:
        policy = build_policy("openai:tiny", [srv.base_url])

        say_hi(policy)
        assert srv.headers[-1]["authorization"] == "Bearer EMPTY"


def test_unknown_client_option_is_an_error_naming_it():
    from rlm_train.config import build_config

    with pytest.raises(UserError, match="unknown key 'max_concurency'"):
        build_config(ClientOptions, {"max_concurency": 8})


def test_one_factory_builds_root_and_sub_policies():
    root, sub = build_policies("scripted", "oracle")
    assert root.name == "scripted" and sub.name == "oracle"
    root, sub = build_policies("scripted")
    assert sub is None  # sub-calls use the root policy
    with MockOpenAIServer() as srv:
        root, sub = build_policies("scripted", "openai:m", [srv.base_url], client=ClientOptions(max_concurrency=3))
        assert sub.base_urls == [srv.base_url] and sub.max_concurrency == 3  # the root's servers by default
    with pytest.raises(UserError, match="no policy"):
        build_policies(None)


class _FakeBackend:
    def __init__(self, path=None, adapter=None):
        self.args = (path, adapter)
        self.name = "unset"


@pytest.mark.parametrize("spec, module, attr, args", [
    ("scripted", "rlm_train.policies.scripted", "ScriptedTeacher", (None, None)),
    ("oracle", "rlm_train.policies.oracle", "OraclePolicy", (None, None)),
    ("hf:base", "rlm_train.models.hf", "HFPolicy", ("base", None)),
    ("hf:base+adapter:lora", "rlm_train.models.hf", "HFPolicy", ("base", "lora")),
])
def test_lazy_backends_get_their_arguments_and_the_spec_as_name(monkeypatch, spec, module, attr, args):
    # Stand-in modules: these backends are written elsewhere; this checks the dispatch only.
    fake = types.ModuleType(module)
    setattr(fake, attr, _FakeBackend)
    monkeypatch.setitem(sys.modules, module, fake)
    policy = build_policy(spec, ["http://127.0.0.1:1/v1"])  # base URLs are for openai: only
    assert isinstance(policy, _FakeBackend) and policy.args == args and policy.name == spec


def test_missing_third_party_package_is_a_user_error(monkeypatch, tmp_path):
    # A backend module whose own import needs a package that is not installed.
    (tmp_path / "fake_hf_backend.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(spec_module._BACKENDS, "hf", lambda: __import__("fake_hf_backend").HFPolicy)
    with pytest.raises(UserError, match="needs the Python package 'not_installed_pkg_xyz'"):
        build_policy("hf:x")
    # A missing project module is a bug, not a user error: it surfaces as is.
    monkeypatch.setitem(spec_module._BACKENDS, "hf", lambda: __import__("rlm_train.models.no_such_module"))
    with pytest.raises(ModuleNotFoundError):
        build_policy("hf:x")
