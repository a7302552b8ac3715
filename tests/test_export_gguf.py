"""`rlm-train export --gguf`: the model written as GGUF with gguf's tensor names and the tokenizer in its
metadata, loaded back by transformers' own GGUF reader, next-token logits compared; refused above the
tolerance."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from rlm_train.errors import UserError
from rlm_train.testing.tiny_models import build_tiny_gemma3, build_tokenizer


def _export(*argv: str) -> int:
    from rlm_train.export import commands

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    return commands.main(parser.parse_args(list(argv)))


def _randomize_vectors(model_dir):
    """Gemma initialises its norms at 0 (a scale of 1): make them random so a norm written at the wrong
    place or without Gemma's +1 shows in the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0.0, 0.5)
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = build_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "merged")
    _randomize_vectors(model)
    # A merged model carries its chat template (save_merged saves the tokenizer with it).
    (model / "chat_template.jinja").write_text((__import__("rlm_train.models.loading", fromlist=["x"])
                                                .chat_template_path("gemma3")).read_text())
    return model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen3-shaped, untied output layer, embedding rows past the tokenizer (padded vocab), head_dim 128
    (what transformers' Qwen3 GGUF reader assumes)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("qwen") / "model"
    tokenizer = build_tokenizer(out)
    config = Qwen3Config(vocab_size=len(tokenizer) + 5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)
    _randomize_vectors(out)
    return out


def _difference(output: str) -> float:
    return float(re.search(r"rounded to \w+: max abs difference ([0-9.e+-]+)", output)[1])


@pytest.mark.parametrize("outtype", ["f16", "bf16", "f32"])
def test_gemma3_round_trips_through_gguf(gemma, tmp_path, capsys, outtype):
    import gguf

    out = tmp_path / "tuned.gguf"
    assert _export("--model", str(gemma), "--gguf", str(out), "--outtype", outtype) == 0
    printed = capsys.readouterr().out
    assert _difference(printed) <= 1e-3 and "[export] ok" in printed
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields

    def text(key):
        return bytes(fields[key].parts[-1]).decode()

    assert text("general.architecture") == "gemma3"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_q_norm.weight",
            "blk.0.post_ffw_norm.weight", "output_norm.weight"} <= names and "output.weight" not in names  # tied
    assert text("tokenizer.ggml.model") == "gpt2"  # the tiny tokenizer is byte-level BPE
    assert len(fields["tokenizer.ggml.tokens"].data) == json.loads((gemma / "config.json").read_text())["vocab_size"]
    assert int(fields["tokenizer.ggml.eot_token_id"].parts[-1][0]) == 106  # <end_of_turn>: llama.cpp stops there
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is True
    assert "<start_of_turn>" in text("tokenizer.chat_template")
    matrix = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert matrix.tensor_type.name == outtype.upper() and norm.tensor_type.name == "F32"


def test_qwen3_round_trips_with_an_untied_head_and_padded_vocab(qwen, tmp_path, capsys):
    import gguf

    out = tmp_path / "qwen.gguf"
    assert _export("--model", str(qwen), "--gguf", str(out), "--outtype", "f32") == 0
    assert _difference(capsys.readouterr().out) <= 1e-4
    reader = gguf.GGUFReader(str(out))
    assert "output.weight" in {t.name for t in reader.tensors}
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"


def test_a_wrong_tensor_is_caught_by_the_logit_check_and_the_file_removed(gemma, tmp_path, monkeypatch, capsys):
    from rlm_train.export import gguf_file

    real = gguf_file._tensors

    def swapped(model_dir, tied):  # a writer bug: two layers' query projections exchanged
        tensors = dict(real(model_dir, tied))
        a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
        tensors[a], tensors[b] = tensors[b], tensors[a]
        return iter(tensors.items())

    monkeypatch.setattr(gguf_file, "_tensors", swapped)
    out = tmp_path / "bad.gguf"
    assert _export("--model", str(gemma), "--gguf", str(out), "--outtype", "f32") == 1
    captured = capsys.readouterr()
    assert _difference(captured.out) > 1e-3
    assert "refused: max abs logit difference" in captured.err and not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left either


def test_bad_inputs_are_one_line(gemma, tmp_path):
    cases = [
        (["--model", str(tmp_path / "nope"), "--gguf", str(tmp_path / "x.gguf")], "no such directory"),
        (["--model", str(gemma)], "nothing to do"),
        (["--model", str(gemma), "--gguf", str(tmp_path / "x.bin")], ".gguf suffix"),
        (["--model", str(gemma), "--gguf", str(tmp_path / "x.gguf"), "--tolerance", "nan"], "--tolerance"),
    ]
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases.append((["--model", str(llama), "--gguf", str(tmp_path / "x.gguf")], "model_type 'llama'"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cases.append((["--model", str(adapter), "--gguf", str(tmp_path / "x.gguf")], "config.json: not found"))
    for argv, expected in cases:
        with pytest.raises(UserError) as error:
            _export(*argv)
        assert expected in str(error.value) and "\n" not in str(error.value), argv
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))
