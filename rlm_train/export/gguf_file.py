"""A Hugging Face model directory (a merged or fully fine-tuned model) written as one GGUF file,
laid out as llama.cpp's own converter lays out the architectures rlm-train trains (Gemma-3, Qwen3):

    write_gguf(Path("runs/demo/sft/merged"), Path("tuned.gguf"), outtype="f16")

Tensors are read one at a time from the safetensors files (no model is built, so memory stays
at the size of the output); names come from gguf's `TensorNameMap`, a tensor it cannot name is
refused rather than left out. The tokenizer goes into the metadata from `tokenizer.json`: a
byte-fallback BPE vocabulary (SentencePiece-style, Gemma) as llama.cpp's `llama` model with
scores, a byte-level one (GPT-2 style, Qwen) as `gpt2` with its merges and pre-tokenizer name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlm_train.errors import UserError

OUTTYPES = ("f32", "f16", "bf16")
# HF model_type -> gguf architecture name (gguf.MODEL_ARCH_NAMES values)
ARCHITECTURES = {"gemma3_text": "gemma3", "qwen3": "qwen3"}
# Qwen2/3's pre-tokenizer split (tokenizer.json), which llama.cpp knows as "qwen2".
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class GGUFSummary:
    """What `write_gguf` wrote."""

    path: Path
    architecture: str
    outtype: str
    tensors: int
    vocab: int
    tokenizer_model: str
    bytes: int


def model_type(model_dir: Path) -> str:
    config = _read_json(model_dir / "config.json")
    kind = str(config.get("model_type"))
    if kind not in ARCHITECTURES:
        raise UserError(f"{model_dir}/config.json: model_type {kind!r} cannot be exported to GGUF here; "
                        f"supported: {', '.join(sorted(ARCHITECTURES))} (the architectures rlm-train trains)")
    return kind


def write_gguf(model_dir: Path, out: Path, outtype: str = "f16") -> GGUFSummary:
    """Write `model_dir` as the GGUF file `out` (written beside it under a temporary name, then renamed)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    kind = model_type(model_dir)
    config = _read_json(model_dir / "config.json")
    arch_name = ARCHITECTURES[kind]
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[outtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch_name)
    try:
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(int(file_type))
        _add_hyperparameters(writer, kind, config)
        vocab = _add_tokenizer(writer, model_dir, int(config["vocab_size"]))
        names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
        count = 0
        for hf_name, array in _tensors(model_dir, tied=bool(config.get("tie_word_embeddings", True))):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"{model_dir}: tensor {hf_name} has no GGUF name for {arch_name}; "
                                "this model is not laid out as the architecture llama.cpp expects")
            if kind == "gemma3_text" and hf_name.endswith("norm.weight"):
                array = array + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores the factor itself
            if array.ndim <= 1:  # norms stay f32, as llama.cpp's converter keeps them
                writer.add_tensor(name, array.astype("float32"))
            else:
                # bf16 comes back as bytes; the writer turns a byte shape into the tensor's shape itself
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            count += 1
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFSummary(out, arch_name, outtype, count, vocab.size, vocab.model, out.stat().st_size)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (--model must be a Hugging Face model directory, e.g. a merged/ "
                        "or model/ output of rlm-train sft/grpo)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _rope_theta(config: dict[str, Any], layer_type: str) -> float | None:
    params = config.get("rope_parameters") or {}
    params = params.get(layer_type, params) if isinstance(params, dict) else {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    return float(theta) if theta is not None else None


def _add_hyperparameters(writer: Any, kind: str, config: dict[str, Any]) -> None:
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    theta = _rope_theta(config, "full_attention")
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if kind == "gemma3_text":
        writer.add_sliding_window(int(config["sliding_window"]))
        scaling = (config.get("rope_parameters") or {}).get("full_attention") or config.get("rope_scaling") or {}
        if scaling.get("rope_type") == "linear" and scaling.get("factor"):
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))


def _tensors(model_dir: Path, tied: bool) -> Iterator[tuple[str, Any]]:
    """(HF name, float32 numpy array) for every weight, one file at a time; a tied output layer is left out."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{model_dir}: no model.safetensors (a PEFT adapter directory? export the merged/ "
                        "model: train with save_merged=true)")
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as handle:
            for name in handle.keys():
                if tied and name == "lm_head.weight":
                    continue
                yield name, handle.get_tensor(name).float().numpy()


@dataclass(frozen=True)
class _Vocab:
    model: str
    size: int


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> _Vocab:
    """tokenizer.ggml.*: tokens (padded to the embedding's rows), types, scores or merges, special ids,
    whether <bos> is added, and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    spec = _read_json(model_dir / "tokenizer.json")
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        raise UserError(f"{model_dir}/tokenizer.json: a {bpe.get('type')} tokenizer; only BPE vocabularies "
                        "(SentencePiece-style with byte fallback, or byte-level) are written to GGUF here")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {int(i): t for t, i in bpe["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    sentencepiece = bool(bpe.get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # rows of the embedding no token uses (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_TOKEN.fullmatch(text):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
        # llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first: a BPE vocabulary's
        # ids follow its merge order, so the score is minus the id.
        scores.append(0.0 if i in added else -float(i))
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        # llama.cpp puts a space before the text unless told otherwise; Gemma's tokenizer does not.
        writer.add_add_space_prefix("Prepend" in json.dumps(spec.get("normalizer"))
                                    or json.dumps(spec.get("pre_tokenizer")).count('"prepend_scheme": "always"') > 0)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec, model_dir))
        merges = bpe.get("merges") or []
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bool(bos is not None and tokenizer("a")["input_ids"][:1] == [bos]))
    writer.add_add_eos_token(False)
    eot = _end_of_turn_id(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    return _Vocab("llama" if sentencepiece else "gpt2", vocab_size)


def _pre_tokenizer_name(spec: dict[str, Any], model_dir: Path) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before merging."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if splits == [_QWEN2_SPLIT]:
        return "qwen2"
    raise UserError(f"{model_dir}/tokenizer.json: its pre-tokenizer is not one llama.cpp is known to share "
                    "(GPT-2's or Qwen2's split); a GGUF written with another name would tokenize differently")


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that ends an assistant turn under the model's chat template (llama.cpp stops there)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    from rlm_train.models.loading import end_of_turn_ids

    try:
        ids = end_of_turn_ids(tokenizer)
    except Exception:  # a template that does not render a plain chat: llama.cpp keeps its own EOG guess
        return None
    return ids[0] if ids and ids[0] != tokenizer.eos_token_id else None
