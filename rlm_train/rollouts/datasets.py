"""The `datasets` datasets stages exchange: written by filter (the SFT set, the RL prompt set),
read by training."""

from __future__ import annotations

from typing import Any


def message_feature():
    """A conversation column: a list of {role, content}."""
    from datasets import Value

    return [{"role": Value("string"), "content": Value("string")}]


def write_datasets(path, splits: dict[str, list[dict[str, Any]]], features) -> None:
    """A DatasetDict of the splits via save_to_disk (empty splits keep their columns)."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()  # our own report says what was written
    def split(rows):
        if not rows:  # from_list([]) has no columns to cast: build the empty table from the features
            return Dataset.from_dict({column: [] for column in features}, features=features)
        return Dataset.from_list(rows, features=features)

    # An empty split saved with the default sharding writes no data file, and load_from_disk
    # then fails on it (datasets 5.2): one shard each keeps it loadable.
    empty = {name: 1 for name, rows in splits.items() if not rows}
    DatasetDict({name: split(rows) for name, rows in splits.items()}).save_to_disk(str(path), num_shards=empty or None)


def load_train_split(path):
    """A `datasets` save_to_disk directory (a Dataset, or a DatasetDict with a 'train' split)."""
    from datasets import DatasetDict, load_from_disk

    from rlm_train.errors import UserError

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a `datasets` save_to_disk directory ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: dataset has splits {list(ds)} but no 'train' split")
        ds = ds["train"]
    return ds
