"""`rlm-train export`: the tuned model where people run models.

    rlm-train export --model runs/demo/sft/merged --gguf tuned.gguf            # llama.cpp / Ollama
    rlm-train export --model runs/demo/sft/merged --eval runs/demo/eval        # model card with the eval table
    rlm-train export --model runs/demo/sft/merged --push-to-hub me/gemma-rlm   # card, then upload

--gguf writes the GGUF, loads it back with transformers and compares next-token logits with the
model: it prints the largest difference and exits 1 (removing the file) above --tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlm_train.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a Hugging Face model directory: merged/ or model/ of rlm-train sft/grpo (adapter/ for cards)")
    parser.add_argument("--gguf", metavar="OUT.gguf", help="write the model as one GGUF file (llama.cpp, Ollama)")
    parser.add_argument("--outtype", choices=("f16", "bf16", "f32"), default="f16",
                        help="storage type of the GGUF's matrices (norms stay f32); default f16")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest next-token logit difference accepted between the GGUF (loaded back with "
                             "transformers) and the model with its matrices rounded to --outtype (default 1e-3)")
    parser.add_argument("--eval", metavar="EVAL_DIR", help="an `rlm-train eval` output (report.json): its table "
                        "goes into the model card (README.md), which is rewritten")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the model directory, card included, to "
                        "this Hugging Face Hub repo (a token from `hf auth login` or HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def main(args: argparse.Namespace) -> int:
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise UserError(f"--model {args.model}: no such directory")
    if not (args.gguf or args.eval or args.push_to_hub):
        raise UserError("nothing to do: pass --gguf OUT.gguf, --eval EVAL_DIR and/or --push-to-hub REPO_ID")
    if args.tolerance is not None and not 0 <= args.tolerance < float("inf"):
        raise UserError(f"--tolerance {args.tolerance}: must be a finite number >= 0")
    from rlm_train.train.runtime import plain_logs_when_not_a_terminal

    plain_logs_when_not_a_terminal()  # transformers' GGUF and loading bars would be one long line in a log
    if args.push_to_hub:
        from rlm_train.cards import check_hub_token, check_repo_id

        check_repo_id(args.push_to_hub, "--push-to-hub")
        check_hub_token("--push-to-hub")
    if args.eval or args.push_to_hub:
        from rlm_train.cards import refresh_model_card

        card = refresh_model_card(model, Path(args.eval) if args.eval else None)
        print(f"[export] model card: {card}")
    if args.gguf:
        status = export_gguf(model, Path(args.gguf).expanduser(), args.outtype, args.tolerance)
        if status:
            return status
    if args.push_to_hub:
        from rlm_train.cards import push_folder

        url = push_folder(model, args.push_to_hub, "model", private=args.private)
        print(f"[export] pushed {model} to {url}")
    return 0


def export_gguf(model: Path, out: Path, outtype: str, tolerance: float | None) -> int:
    from rlm_train.export.gguf_check import DEFAULT_TOLERANCE, GGUFLoadFailed, check_gguf
    from rlm_train.export.gguf_file import model_type, write_gguf

    if out.suffix != ".gguf":
        raise UserError(f"--gguf {out}: name the file with a .gguf suffix (llama.cpp and Ollama look for it)")
    if out.is_dir():
        raise UserError(f"--gguf {out}: is a directory; name the file to write")
    model_type(model)  # refuse an architecture we cannot map before any work
    written = write_gguf(model, out, outtype)
    print(f"[export] wrote {written.path} ({written.architecture}, {outtype}, {written.tensors} tensors, "
          f"{written.vocab} tokens as llama.cpp's {written.tokenizer_model!r} tokenizer, {written.bytes / 1e6:.1f} MB)",
          flush=True)
    limit = DEFAULT_TOLERANCE if tolerance is None else tolerance
    try:
        check = check_gguf(model, out, outtype, limit)
    except GGUFLoadFailed as exc:
        out.unlink(missing_ok=True)
        print(f"[export] refused: {exc}; {out} removed", file=sys.stderr)
        return 1
    print(f"[export] check: {check.tokens} tokens of a sample RLM conversation; next-token logits of the GGUF "
          f"(loaded back with transformers) vs the model with its matrices rounded to {outtype}: max abs difference "
          f"{check.max_abs_diff:.3g} (tolerance {limit:g}); vs the model as saved: {check.max_abs_diff_unrounded:.3g} "
          f"(largest logit {check.max_abs_logit:.3g})")
    if not check.tokenizer_matches:
        out.unlink(missing_ok=True)
        print(f"[export] refused: the GGUF's tokenizer encodes the sample differently from {model}'s "
              f"(first difference at token {check.first_token_difference}); {out} removed", file=sys.stderr)
        return 1
    if not check.ok:
        out.unlink(missing_ok=True)
        print(f"[export] refused: max abs logit difference {check.max_abs_diff:.3g} is above the tolerance "
              f"{limit:g}; {out} removed (raise --tolerance to keep it anyway)", file=sys.stderr)
        return 1
    print(f"[export] ok: llama-server -m {out}  |  Ollama: a Modelfile with `FROM {out.resolve()}`, "
          "then `ollama create NAME -f Modelfile`")
    return 0
