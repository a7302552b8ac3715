"""Write a tiny random Qwen3-shaped model and a few per-turn SFT samples: what
recipes/tiny-cpu-sft.yaml and recipes/tiny-cpu-grpo.yaml expect under runs/tiny.

    python scripts/make_tiny_models.py [DIR]      (default runs/tiny)

Writes DIR/model (model + tokenizer, built offline in seconds) and DIR/sft.jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlm_train.testing.tiny_models import build_tiny_qwen3, rlm_sample, write_jsonl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/make_tiny_models.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", default="runs/tiny", help="where to write model/ and sft.jsonl (default runs/tiny)")
    ap.add_argument("--samples", type=int, default=4, help="SFT samples to write (default 4)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    build_tiny_qwen3(root / "model")
    write_jsonl(root / "sft.jsonl", [rlm_sample(i) for i in range(args.samples)])
    print(f"wrote {root}/model and {root}/sft.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
