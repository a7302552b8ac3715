"""Is a GGUF file the model it was written from? Load it back with transformers (its own GGUF
reader, independent of our writer), and compare with the Hugging Face model directory:

- the tokenizer: the GGUF's encodes a sample RLM conversation to the same ids;
- the next-token logits at every position of that conversation, in float32, against
  (a) the model with its matrices rounded to the file's storage type (what the file should
  hold exactly: the difference is the export's error, held to `tolerance`), and (b) the model
  as it is (the difference includes f16/bf16 storage; printed, not judged).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a Recursive Language Model. The input is in the variable `context`; "
                                  "write ```repl``` code to read it and answer with FINAL(...)."},
    {"role": "user", "content": "What is the special magic number for quiet-harbor? The number is 7421."},
    {"role": "assistant", "content": "```repl\nhits = [l for l in context.splitlines() if 'harbor' in l]\nprint(hits[:3])\n```"},
    {"role": "user", "content": "REPL output:\n['The number is 7421.']"},
]
DEFAULT_TOLERANCE = 1e-3


class GGUFLoadFailed(Exception):
    """transformers could not load or run the file: the export is not usable as written."""


@dataclass(frozen=True)
class GGUFCheck:
    tokens: int
    tokenizer_matches: bool
    first_token_difference: int | None
    max_abs_diff: float
    """Against the model with its matrices rounded to the file's type: the export's own error."""
    max_abs_diff_unrounded: float
    """Against the model as saved (includes the storage type's rounding)."""
    max_abs_logit: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.tokenizer_matches and self.max_abs_diff <= self.tolerance


def sample_text(tokenizer: Any) -> str:
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.apply_chat_template(SAMPLE_MESSAGES, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in SAMPLE_MESSAGES)


def _round_matrices(model: Any, outtype: str) -> None:
    """Round every matrix to the storage type and back in place (vectors stay float32, as in the file)."""
    import torch

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[outtype]
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(param.to(dtype).float())


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def check_gguf(model_dir: Path, gguf_path: Path, outtype: str, tolerance: float = DEFAULT_TOLERANCE) -> GGUFCheck:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlm_train.models.loading import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = sample_text(tokenizer)
    ids = tokenizer(text)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]

    model = load_causal_lm(model_dir, dtype="float32")
    model.eval()
    reference = _logits(model, ids)
    rounded = reference
    if outtype != "f32":
        _round_matrices(model, outtype)
        rounded = _logits(model, ids)
    del model

    # From a directory holding only the file: transformers must read the GGUF, not a config.json beside it.
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as folder:
        link = Path(folder) / gguf_path.name
        os.symlink(gguf_path.resolve(), link)
        try:
            loaded_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=link.name)
            loaded: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=link.name, dtype="float32")
            loaded.eval()
            got = _logits(loaded, ids)
        except Exception as exc:  # what transformers makes of the file is the finding, whatever it raises
            raise GGUFLoadFailed(f"transformers could not run the GGUF it read back: {type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:300]}") from exc
    del loaded

    reloaded = loaded_tokenizer(text, add_special_tokens=False)["input_ids"]
    first = next((i for i, (a, b) in enumerate(zip(plain, reloaded)) if a != b), None)
    if first is None and len(plain) != len(reloaded):
        first = min(len(plain), len(reloaded))
    return GGUFCheck(
        tokens=len(ids), tokenizer_matches=first is None, first_token_difference=first,
        max_abs_diff=float((got - rounded).abs().max()), max_abs_diff_unrounded=float((got - reference).abs().max()),
        max_abs_logit=float(reference.abs().max()), tolerance=tolerance,
    )
