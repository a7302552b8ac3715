"""Tiny random models built offline (no model hub), for tests and the tiny recipes: a real
Qwen3-shaped config with a small byte-level BPE tokenizer trained offline that has Qwen3's
special tokens, so our qwen3 chat template applies unchanged.

`python scripts/make_tiny_models.py runs/tiny` writes what recipes/tiny-cpu-*.yaml expect.
"""

from __future__ import annotations

from pathlib import Path

QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "You are a Recursive Language Model. The input is in the variable context.",
    "```repl\nprint(len(context))\nhits = [l for l in context.splitlines() if 'needle' in l]\nprint(hits[:3])\n```",
    "FINAL(answer) llm_query llm_query_batched rlm_query FINAL_VAR SHOW_VARS",
    "What is the special magic number for quiet-harbor? The number is 7421.",
    "The quick brown fox jumps over the lazy dog. 0123456789 {}[]()<>=+-*/_.,:;'\"!?#%&|\\",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer (every string encodes) saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_qwen3(out_dir: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a random Qwen3ForCausalLM (fp32, ~100k params) with its tokenizer into out_dir."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(out_dir)
    return out_dir


# Gemma-3's special tokens at their real ids: <pad>=0, <eos>=1, <bos>=2, <start_of_turn>=105, <end_of_turn>=106.
GEMMA3_SPECIALS = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<unused{i}>" for i in range(101)]
                   + ["<start_of_turn>", "<end_of_turn>"])


def build_tiny_gemma3(out_dir: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                      eos_in_generation_config: tuple[str, ...] = ("<eos>",)) -> Path:
    """Save a random Gemma3ForCausalLM (fp32) with a Gemma-shaped tokenizer (adds <bos>, turn markers at
    ids 105/106) into out_dir. Its generation_config lists only `eos_in_generation_config` as EOS, as the
    packaged Gemma-3-270m's did before conversion v2: the case where a trainer that trusts it never sees
    a turn end."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 20, trainer=trainers.BpeTrainer(
        vocab_size=400 + len(GEMMA3_SPECIALS), special_tokens=GEMMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.save_pretrained(out_dir)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=4096, sliding_window=64, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(out_dir)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in eos_in_generation_config]
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": 0}))
    return out_dir


def rlm_sample(i: int) -> dict:
    """One per-turn SFT sample shaped like `rlm-train filter` output: history, then ONE assistant turn."""
    return {
        "messages": [
            {"role": "system", "content": "You are a Recursive Language Model. The input is in the variable context."},
            {"role": "user", "content": f"What is the special magic number for quiet-harbor-{i}?"},
            {"role": "assistant", "content": "```repl\nprint(len(context))\n```"},
            {"role": "user", "content": "REPL output:\n6021"},
            {"role": "assistant", "content": f"```repl\nhits = [l for l in context.splitlines() if 'harbor' in l]\nprint(hits[:3])\n```\nFINAL({7000 + i})"},
        ],
        "task_id": f"needle-{i}",
        "turn": 1,
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
