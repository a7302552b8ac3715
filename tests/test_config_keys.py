"""Config keys as a user meets them: `rlm-train config STAGE` lists every key the validator
accepts (type, bounds, default, doc); aliases are rewritten at any depth, refused next to their
target and suggested where they were put in the wrong section; every number that sizes memory
or time has an upper bound that is said, with its reason, when a value is over it."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from rlm_train.config import (
    BOUND_REASON,
    StrictModel,
    aliases_of,
    build_config,
    field_names,
    load_config,
    walk_sections,
)
from rlm_train.config_help import config_keys, default_text, format_config_keys, resolve_key
from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig
from rlm_train.rlm.loop import RLMConfig
from rlm_train.rollouts.filter import FilterConfig
from rlm_train.rollouts.generate import GenerateConfig
from rlm_train.serve.config import ServeConfig
from rlm_train.tasks.suite import TaskSuiteConfig
from rlm_train.train.grpo_config import GRPOConfig
from rlm_train.train.sft import SFTConfig

STAGE_CONFIGS = {"generate": GenerateConfig, "filter": FilterConfig, "sft": SFTConfig, "grpo": GRPOConfig,
                 "eval": EvalConfig, "serve": ServeConfig, "tasks make": TaskSuiteConfig, "run": RLMConfig}


def _leaves(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict) and value and key not in ("adapters", "env", "rlm_overrides"):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("cls", [GenerateConfig, ServeConfig, RLMConfig, FilterConfig])
def test_the_listing_has_exactly_the_keys_a_config_holds_with_its_defaults(cls):
    """Same source as the validator: the dotted keys of a default config's dump, no more, no
    fewer, each with the default the config really has (a section's own default included:
    generate's client.max_concurrency is 1024, not ClientOptions' 64)."""
    keys = {k.key: k for k in config_keys(cls)}
    dumped = cls().model_dump(mode="json")
    assert set(keys) == _leaves(dumped)
    for key, entry in keys.items():
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        assert entry.default == default_text(value), key
    if cls is GenerateConfig:
        assert keys["client.max_concurrency"].default == "1024"
        assert keys["samples"].type == "int (1..10000)"
        assert keys["rlm.sandbox.timeout_s"].doc.startswith("Wall seconds one cell may run")  # a dataclass section


@pytest.mark.parametrize("stage,cls", list(STAGE_CONFIGS.items()))
def test_every_key_of_every_stage_has_a_type_a_default_and_a_doc(stage, cls):
    keys = config_keys(cls)
    assert keys
    undocumented = [k.key for k in keys if not k.doc]
    assert not undocumented, f"{cls.__name__}: keys without a docstring: {undocumented}"
    assert all(k.type and k.default for k in keys)
    text = format_config_keys(cls, stage, width=120)
    for key in keys:
        assert re.search(rf"^  {re.escape(key.key)}\s", text, re.M), key.key  # every key has its row


def test_the_listing_reads_as_aligned_sections():
    text = format_config_keys(GenerateConfig, "generate", width=120)
    lines = text.splitlines()
    assert lines[0].startswith("rlm-train generate: config keys (GenerateConfig)")
    headings = [line for line in lines if line.startswith("[")]
    assert [h.split("]")[0] for h in headings] == ["[top level", "[client", "[rlm", "[rlm.sandbox"]
    # Within a section, every row's type column starts at the same place.
    client_rows = lines[lines.index(headings[1]) + 1: lines.index(headings[2]) - 1]
    starts = {re.match(r"  \S+\s+", row).end() for row in client_rows if row.startswith("  client.")}
    assert len(starts) == 1, client_rows
    samples = next(line for line in lines if line.startswith("  samples "))
    assert re.match(r"  samples\s+int \(1\.\.10000\)\s+1\s+Episodes per task", samples), samples
    assert max(len(line) for line in lines) <= 120


def test_training_aliases_are_listed_beside_their_keys_and_resolved_for_hints():
    keys = {k.key: k for k in config_keys(SFTConfig)}
    assert "num_train_epochs" in keys["training.epochs"].aliases
    assert "(also: num_train_epochs" in format_config_keys(SFTConfig, "sft", width=200)
    assert resolve_key(SFTConfig, "num_train_epochs") == "training.epochs"
    assert resolve_key(SFTConfig, "max_length") == "training.max_length"
    assert resolve_key(SFTConfig, "no_such_key") is None


def _all_config_classes() -> set[type]:
    found: set[type] = set()
    for cls in STAGE_CONFIGS.values():
        found |= {section for _, section in walk_sections(cls)}
    return found


def test_every_declared_alias_names_a_real_key_and_shadows_none():
    for cls in _all_config_classes():
        for alias, target in getattr(cls, "config_aliases", {}).items():
            assert alias.split(".")[0] not in field_names(cls) or "." in alias, (cls.__name__, alias)
            listed = {k.key for k in config_keys(cls)}
            assert target in listed, f"{cls.__name__}: alias {alias!r} -> {target!r}, no such key"


# ---------------------------------------------------------------------------
# The alias mechanism, on small configs of its own


class _Inner(StrictModel):
    config_aliases: ClassVar[dict[str, str]] = {"lr_scheduler_type": "lr_scheduler"}
    lr_scheduler: str = "linear"
    """Schedule."""
    epochs: float = 1.0
    """Epochs."""


class _Item(StrictModel):
    config_aliases: ClassVar[dict[str, str]] = {"model_name_or_path": "model"}
    model: str = "m"
    """Model."""


class _Outer(StrictModel):
    config_aliases: ClassVar[dict[str, str]] = {"num_train_epochs": "training.epochs"}
    training: _Inner = _Inner()
    """Training."""
    methods: list[_Item] = []
    """Items."""
    named: dict[str, _Item] = {}
    """Named items."""
    base_urls: list[str] = []
    """Servers."""


def test_aliases_are_rewritten_at_every_depth_before_validation():
    config = build_config(_Outer, {"num_train_epochs": 3, "training": {"lr_scheduler_type": "cosine"},
                                   "methods": [{"model_name_or_path": "a"}, {"model": "b"}],
                                   "named": {"x": {"model_name_or_path": "c"}}})
    assert config.training.epochs == 3 and config.training.lr_scheduler == "cosine"
    assert [m.model for m in config.methods] == ["a", "b"] and config.named["x"].model == "c"
    assert aliases_of(_Outer) == {"num_train_epochs": "training.epochs",
                                  "training.lr_scheduler_type": "training.lr_scheduler",
                                  "methods[].model_name_or_path": "methods[].model",
                                  "named.NAME.model_name_or_path": "named.NAME.model"}


def _error(cls: type[BaseModel], data: dict[str, Any]) -> str:
    with pytest.raises(UserError) as info:
        build_config(cls, data, "r.yaml")  # type: ignore[type-var]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_alias_beside_its_target_is_one_line_naming_both():
    assert _error(_Outer, {"num_train_epochs": 2, "training": {"epochs": 3}}) == (
        "r.yaml: 'num_train_epochs' and 'training.epochs' are the same setting ('num_train_epochs' is another "
        "name for 'training.epochs'); give only 'training.epochs'")
    assert "'methods.0.model_name_or_path' and 'methods.0.model'" in _error(
        _Outer, {"methods": [{"model": "a", "model_name_or_path": "b"}]})


def test_an_alias_in_the_wrong_section_and_a_key_in_the_wrong_section_suggest_where_they_go():
    assert _error(_Outer, {"training": {"num_train_epochs": 2}}) == (
        "r.yaml: unknown key 'training.num_train_epochs'; did you mean 'training.epochs'? ('num_train_epochs' is "
        "another name for it, accepted at the top level only)")
    assert "did you mean 'training.epochs'? (it belongs to that section)" in _error(_Outer, {"epochs": 2})
    assert "did you mean 'training.lr_scheduler'?" in _error(_Outer, {"lr_scheduler_type": "x"})


def test_an_error_on_an_aliased_key_says_the_name_it_was_given_by():
    assert "key 'training.epochs' (given as 'num_train_epochs'): Input should be a valid number" in _error(
        _Outer, {"num_train_epochs": "many"})


def test_a_list_key_given_one_value_says_the_list_form():
    message = _error(_Outer, {"base_urls": "http://h:8000/v1"})
    assert message == ("r.yaml: key 'base_urls': expects a list, got 'http://h:8000/v1'; write "
                       "base_urls=[http://h:8000/v1] on the command line (several: base_urls=[a,b]), or in YAML "
                       "`base_urls: [http://h:8000/v1]`")


def test_overrides_name_keys_by_alias_and_a_later_layer_wins_whatever_name_each_used(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_train_epochs: 2\n")
    assert load_config(_Outer, recipe, ["training.epochs=5"]).training.epochs == 5
    assert load_config(_Outer, None, ["num_train_epochs=4"]).training.epochs == 4
    recipe.write_text("training: {epochs: 2}\n")
    assert load_config(_Outer, recipe, ["num_train_epochs=6"]).training.epochs == 6
    with pytest.raises(UserError, match="'num_train_epochs' and 'training.epochs' are the same setting"):
        load_config(_Outer, None, ["num_train_epochs=4", "training.epochs=3"])


@pytest.mark.parametrize("raw", ["[1", "{a: 1", "'open", "a: b: c"])
def test_an_override_value_that_is_not_yaml_is_one_line(raw):
    with pytest.raises(UserError) as info:
        load_config(GenerateConfig, None, [f"samples={raw}"])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"override {'samples=' + raw!r}: the value is not valid YAML (")


# ---------------------------------------------------------------------------
# Bounds


REQUIRED = {"MethodConfig": {"name": "m", "policy": "scripted"}, "SFTConfig": {"model": "m", "dataset": "d",
                                                                              "output_dir": "o"}}


def _bounded_fields() -> list[tuple[type, str, Any, str]]:
    out = []
    for cls in _all_config_classes():
        if not issubclass(cls, BaseModel):
            continue
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            limit = next((getattr(m, "le", None) for m in info.metadata if getattr(m, "le", None) is not None), None)
            if BOUND_REASON in extra:
                assert limit is not None, f"{cls.__name__}.{name}: a bound reason without an upper bound"
                out.append((cls, name, limit, str(extra[BOUND_REASON])))
    return sorted(out, key=lambda t: (t[0].__name__, t[1]))


def test_every_number_that_sizes_memory_or_time_has_an_upper_bound():
    keys = {k.key: k.type for k in config_keys(GenerateConfig)} | {
        f"eval.{k.key}": k.type for k in config_keys(EvalConfig)} | {
        f"serve.{k.key}": k.type for k in config_keys(ServeConfig)} | {
        f"tasks.{k.key}": k.type for k in config_keys(TaskSuiteConfig)}
    sizing = ["samples", "concurrency", "client.max_concurrency", "client.request_timeout_s", "client.max_retries",
              "rlm.max_iterations", "rlm.max_depth", "rlm.subcall_concurrency", "rlm.child_concurrency",
              "rlm.sub_model_chars", "rlm.feedback_chars", "rlm.trajectory_chars", "rlm.root_max_tokens",
              "rlm.sub_max_tokens", "rlm.answer_max_tokens", "rlm.max_wall_s", "eval.samples", "eval.concurrency",
              "eval.methods[].max_context_chars", "eval.bootstrap.resamples", "serve.gateway.max_concurrent",
              "serve.gateway.max_queue", "serve.gateway.max_body_bytes", "serve.gateway.max_query_chars",
              "serve.gateway.max_connections", "serve.vllm.start_timeout_s", "tasks.families.NAME.train"]
    unbounded = [key for key in sizing if not re.search(r"\.\.|<=", keys[key])]
    assert not unbounded


@pytest.mark.parametrize("cls,name,limit,why", _bounded_fields(),
                         ids=[f"{c.__name__}.{n}" for c, n, *_ in _bounded_fields()])
def test_a_value_over_a_bound_is_refused_with_the_bound_and_its_reason(cls, name, limit, why):
    data = {**REQUIRED.get(cls.__name__, {}), name: limit * 10 + 1}
    message = _error(cls, data)
    assert f"key '{name}': must be at most {limit:,}, got {limit * 10 + 1!r} ({why}); lower it" in message
    default = cls.model_fields[name].default
    assert default is None or default <= limit  # the default is inside its own bound


def test_the_issue_s_absurd_sample_count_is_refused_before_anything_runs():
    with pytest.raises(UserError) as info:
        load_config(GenerateConfig, None, [], flags={"samples": 100000000000000000000})
    assert str(info.value).startswith("command line: key 'samples': must be at most 10,000, "
                                      "got 100000000000000000000 (every (task, sample) pair")
