"""SFT data: reading the per-turn dataset `rlm-train filter` writes (train and validation splits),
checking samples, tokenizing with the loss on the last assistant turn only, and packing a
micro-batch into one padding-free row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.formats import iter_jsonl
from rlm_train.rollouts.datasets import load_train_split

# sdpa and eager attention turn a packed row's restarting position ids into a dense [L, L] mask
# (and eager/CPU sdpa into [heads, L, L] float scores): 16k tokens is already ~1 GiB per head.
# A row of one sample needs no mask: sdpa runs plain causal attention (PyTorch's flash kernel on GPUs).
DENSE_ATTENTION_MAX_TOKENS = 16_384
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def read_sft_dataset(path: str | os.PathLike, split: str = "train") -> list[list[dict]]:
    """The `messages` column of a per-turn SFT dataset (save_to_disk dir or JSONL), validated."""
    path = Path(path).expanduser()
    if path.is_dir():
        ds = load_train_split(path) if split == "train" else _load_split(path, split)
        if "messages" not in ds.column_names:
            raise UserError(f"{path}: no 'messages' column (columns: {ds.column_names}); use the SFT dataset from `rlm-train filter`")
        rows = ds["messages"]
    elif path.is_file():
        records = iter_jsonl(path, check=_has_messages, fix="use the SFT dataset from `rlm-train filter`")
        rows = [record["messages"] for _, record in records]
    else:
        raise UserError(f"dataset {path} not found; make one with `rlm-train filter` (a directory or .jsonl)")
    if not rows:
        raise EmptySplit(path, split)
    for i, messages in enumerate(rows):
        check_sample(messages, f"{path} sample {i}")
    return [list(m) for m in rows]


def read_sample_kinds(path: str | os.PathLike) -> list[str] | None:
    """The train split's `kind` column (root_turn / sub_call, from `rlm-train filter`), row for row
    with `read_sft_dataset`; None when the data has no such column."""
    path = Path(path).expanduser()
    if path.is_dir():
        ds = load_train_split(path)
        return [str(k) for k in ds["kind"]] if "kind" in ds.column_names else None
    kinds = [record.get("kind") for _, record in iter_jsonl(path, check=_has_messages)]
    return None if any(k is None for k in kinds) else [str(k) for k in kinds]


class EmptySplit(UserError):
    """A dataset split with no samples (filter kept nothing, or held out no task for validation)."""

    def __init__(self, path: Path, split: str = "train"):
        report = path.parent / "filter_report.json"  # filter writes OUT/sft/, OUT/sft-*.jsonl and OUT/filter_report.json
        hint = (f"; {report} says why" if report.is_file()
                else "; `rlm-train filter` kept nothing (its filter_report.json says why)")
        super().__init__(f"{path}: the dataset's {split} split is empty (0 samples), nothing to train on{hint}")
        self.path = path
        self.split = split


def _load_split(path: Path, split: str) -> Any:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if not isinstance(ds, DatasetDict) or split not in ds:
        raise UserError(f"{path}: no {split!r} split")
    return ds[split]


def count_samples(path: str | os.PathLike) -> int | None:
    """Rows in the train split without reading them all (None when the dataset is not there):
    a dry run can say the dataset is empty before any model is loaded."""
    path = Path(path).expanduser()
    if path.is_file():
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    if path.is_dir():
        return len(load_train_split(path))
    return None


def find_validation(dataset: str | os.PathLike, choice: str) -> Path | None:
    """The validation split that goes with `dataset` ('auto': the same save_to_disk directory's
    'validation' split, or sft-validation.jsonl beside sft-train.jsonl; 'none'; or a path).
    Returns the directory or file to read with split='validation' (directories) or as is."""
    if choice == "none":
        return None
    if choice != "auto":
        path = Path(choice).expanduser()
        if not path.exists():
            raise UserError(f"evaluation.validation={choice}: not found; the SFT dataset's validation split "
                            "from `rlm-train filter`, 'auto' or 'none'")
        return path
    path = Path(dataset).expanduser()
    if path.is_dir():
        return path if (path / "validation").is_dir() else None
    if path.name.endswith("-train.jsonl"):
        sibling = path.with_name(path.name[: -len("-train.jsonl")] + "-validation.jsonl")
        return sibling if sibling.is_file() else None
    return None


def read_validation(path: Path) -> list[list[dict]]:
    """Validation samples ([] when the split is empty: filter held out no task)."""
    try:
        return read_sft_dataset(path, split="validation" if path.is_dir() else "train")
    except EmptySplit:
        return []


def _has_messages(record: dict[str, Any]) -> str | None:
    return None if "messages" in record else "no 'messages' field"


def check_sample(messages: Any, where: str) -> None:
    """A trainable sample: a list of {role, content}; the last is the ONE assistant turn trained on."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message needs string 'role' and 'content' (got {m!r:.80})")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{where}: no assistant turn, so there is nothing to train on; the SFT dataset must end each "
            "sample with the assistant turn to learn (make it with `rlm-train filter`)"
        )
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message is {messages[-1]['role']!r}, not 'assistant'; each sample must end with "
            "the ONE assistant turn that is trained on (history first)"
        )
    if len(messages) < 2:
        raise UserError(f"{where}: an assistant turn with no prompt before it; a sample needs the history it answers")


def tokenize_sample(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = -100 everywhere but the last assistant turn.

    The prompt (history + generation prompt) and the answer are tokenized separately and
    concatenated: exactly what the model sees at inference, where it continues the prompt.
    """
    from rlm_train.models.loading import render_chat

    prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = render_chat(tokenizer, messages)
    if not full.startswith(prompt):
        raise UserError(
            "the chat template renders the history differently with and without the answer, so the "
            "trained turn cannot be isolated; use a template whose generation prompt is a prefix (ours are)"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def build_train_dataset(tokenizer: Any, samples: list[list[dict]], max_length: int,
                        kinds: list[str] | None = None) -> tuple[Any, dict]:
    """Tokenized `datasets.Dataset` (input_ids, labels) and stats; over-long samples are dropped.
    With each sample's `kinds`, the stats count the samples kept of each kind."""
    from collections import Counter

    from datasets import Dataset

    ids, labels, dropped, kept_kinds = [], [], 0, Counter[str]()
    for i, messages in enumerate(samples):
        x, y = tokenize_sample(tokenizer, messages)
        if len(x) > max_length:
            dropped += 1
            continue
        ids.append(x)
        labels.append(y)
        if kinds is not None:
            kept_kinds[kinds[i]] += 1
    if not ids:
        raise UserError(f"all {len(samples)} samples are longer than training.max_length={max_length}; raise it")
    stats = {
        "samples": len(ids), "dropped_too_long": dropped,
        "tokens": sum(map(len, ids)), "trained_tokens": sum(sum(t != -100 for t in y) for y in labels),
        "max_len": max(map(len, ids)),
        **({"samples_by_kind": dict(sorted(kept_kinds.items()))} if kinds is not None else {}),
    }
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), stats


def longest_packed_row(lengths: list[int], batch_size: int) -> int:
    """The longest row PackedCollator can build: the `batch_size` longest samples packed together."""
    return sum(sorted(lengths, reverse=True)[:batch_size])


def dense_mask_problem(attn_implementation: str, row_tokens: int, batch_size: int) -> str | None:
    """Why a packed row of `row_tokens` is too long for a dense-mask attention kernel (None: fine).
    Rows of one sample need no mask (plain causal); flash-attention reads the packing as varlen."""
    if batch_size <= 1 or attn_implementation in VARLEN_ATTENTION or row_tokens <= DENSE_ATTENTION_MAX_TOKENS:
        return None
    gib = row_tokens * row_tokens / 2**30
    return (f"attn_implementation={attn_implementation} with packed rows of up to {row_tokens:,} tokens "
            f"(training.batch_size={batch_size}) builds a dense {row_tokens:,}x{row_tokens:,} attention mask "
            f"(~{gib:.1f} GiB, more per head for the scores); set training.batch_size=1 (one sample a row, no mask; "
            f"raise gradient_accumulation_steps to keep the samples per step), lower training.max_length so a row "
            f"stays under {DENSE_ATTENTION_MAX_TOKENS:,}, or use attn_implementation=flash_attention_2 (flash-attn installed)")


class PackedCollator:
    """Pack a micro-batch into ONE row with no padding: position ids restart per sample, which
    transformers turns into a block-diagonal attention mask (samples never see each other)."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        input_ids = [torch.as_tensor(f["input_ids"]) for f in features]
        labels = [torch.as_tensor(f["labels"]).clone() for f in features]
        for y in labels:
            y[0] = -100  # never predict a sample's first token from the previous sample's last
        positions = [torch.arange(len(x)) for x in input_ids]
        return {
            "input_ids": torch.cat(input_ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
        }
