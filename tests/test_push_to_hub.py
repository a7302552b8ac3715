"""push_to_hub for models and datasets, against a stand-in Hub on 127.0.0.1 that speaks the endpoints
huggingface_hub calls (rlm_train/testing/hub_server.py): what is created and what is uploaded."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from rlm_train.errors import UserError
from rlm_train.testing.hub_server import USER, HubServer
from rlm_train.testing.tiny_models import build_tiny_gemma3

TOKEN = "hf_test_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubServer(TOKEN) as server:
        # huggingface_hub reads HF_ENDPOINT once, at import: point the imported module at the stand-in.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished SFT run's output directory, as the trainer leaves it: merged/ and the run's config."""
    run = tmp_path_factory.mktemp("run") / "sft"
    build_tiny_gemma3(run / "merged")
    return run


def _write_config(run, **hub_keys):
    config = {"model": "gemma3-270m", "dataset": "runs/x/data/sft", "output_dir": str(run), "chat_template": "auto",
              "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
              "training": {"max_steps": 3, "learning_rate": 1e-4}, "dtype": "float32", **hub_keys}
    (run / "sft_config.json").write_text(json.dumps(config))


def test_a_finished_run_pushes_its_merged_model_and_card(hub, tiny_run, tmp_path):
    from rlm_train.cards import write_run_cards

    run = tmp_path / "sft"
    shutil.copytree(tiny_run, run)
    _write_config(run, push_to_hub=True, hub_model_id="team/gemma-rlm", hub_private_repo=True)
    write_run_cards(run, {"merged_dir": str(run / "merged"), "global_step": 3, "train_loss": 1.5})

    repo = hub.repos["team/gemma-rlm"]
    assert repo.repo_type == "model" and repo.private
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(repo.files)
    assert repo.files["model.safetensors"] == (run / "merged" / "model.safetensors").read_bytes()
    card = repo.files["README.md"].decode()
    assert card.startswith("---\nbase_model: google/gemma-3-270m\n") and "only works inside the RLM loop" in card


def test_nothing_is_pushed_without_the_flag(hub, tiny_run, tmp_path):
    from rlm_train.cards import write_run_cards

    run = tmp_path / "sft"
    shutil.copytree(tiny_run, run)
    _write_config(run, push_to_hub=False, hub_model_id="team/never")
    written = write_run_cards(run, {"merged_dir": str(run / "merged")})
    assert written == [run / "merged" / "README.md"]
    assert hub.repos == {} and hub.requests == []


def test_a_partial_run_is_never_pushed(hub, tiny_run, tmp_path):
    from rlm_train.cards import write_run_cards

    run = tmp_path / "sft"
    shutil.copytree(tiny_run, run)
    _write_config(run, push_to_hub=True)
    write_run_cards(run, {"merged_dir": str(run / "merged"), "partial_step": 2})
    assert hub.requests == []


def test_missing_token_is_one_line_before_any_work(hub, monkeypatch, tmp_path, capsys):
    from rlm_train.export import commands

    monkeypatch.delenv("HF_TOKEN")
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    model = tmp_path / "merged"
    build_tiny_gemma3(model)
    with pytest.raises(UserError) as error:
        commands.main(parser.parse_args(["--model", str(model), "--push-to-hub", "me/x"]))
    assert "\n" not in str(error.value) and "no Hugging Face token" in str(error.value) and "HF_TOKEN" in str(error.value)
    assert hub.requests == [] and not (model / "README.md").exists()


def test_a_refused_token_is_one_line_and_keeps_the_files(hub, monkeypatch, tiny_run, tmp_path):
    from rlm_train.cards import push_folder

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(UserError) as error:
        push_folder(tiny_run / "merged", "me/x", "model")
    assert "\n" not in str(error.value) and "the Hub refused" in str(error.value) and "kept locally" in str(error.value)
    assert hub.requests and all(status == 401 for _, _, status in hub.requests)
    assert (tiny_run / "merged" / "model.safetensors").is_file()


def test_export_pushes_under_the_users_namespace_and_again_into_the_same_repo(hub, tiny_run, tmp_path):
    from rlm_train.export import commands

    run = tmp_path / "sft"
    shutil.copytree(tiny_run, run)
    _write_config(run)
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args(["--model", str(run / "merged"), "--push-to-hub", "gemma-rlm"])
    assert commands.main(args) == 0
    assert commands.main(args) == 0  # the repo exists now: kept, one more commit
    repo = hub.repos[f"{USER}/gemma-rlm"]
    assert not repo.private and len(repo.commits) == 2 and "README.md" in repo.files


def test_filter_pushes_the_jsonl_splits_card_and_report_as_a_dataset(hub, tmp_path):
    from test_filter import THREE_TURNS, make_traj

    from rlm_train.formats import append_jsonl
    from rlm_train.rollouts.filter import FilterConfig, run_filter

    run = tmp_path / "run"
    run.mkdir()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"schema": "rlm-train/task/v1", "id": f"t{i}", "family": "niah", "query": f"q{i}",
                                         "context": "c", "answer": ["42"], "scorer": "all_strings", "meta": {}}) + "\n"
                             for i in range(6)))
    (run / "manifest.json").write_text(json.dumps({"schema": "rlm-train/generate-run/v1", "tasks_file": str(tasks),
                                                   "policy": "scripted", "sub_policy": "oracle"}))
    for i in range(6):
        append_jsonl(run / "shard-0.jsonl", make_traj(THREE_TURNS, task_id=f"t{i}", sample=0))
        append_jsonl(run / "shard-0.jsonl", make_traj(THREE_TURNS, task_id=f"t{i}", sample=1, score=0.0))
    out = tmp_path / "data"
    run_filter(FilterConfig(trajectories=[str(run)], out=str(out), push_to_hub=True, hub_dataset_id="team/rlm-data",
                            validation_fraction=0.2))

    repo = hub.repos["team/rlm-data"]
    assert repo.repo_type == "dataset" and not repo.private
    assert set(repo.files) == {"README.md", "filter_report.json", "sft-train.jsonl", "sft-validation.jsonl",
                               "rl-train.jsonl", "rl-validation.jsonl"}
    assert repo.files["sft-train.jsonl"] == (out / "sft-train.jsonl").read_bytes()
    card = repo.files["README.md"].decode()
    assert "path: sft-train.jsonl" in card and "the scripted teacher" in card and "the oracle" in card


def test_training_with_push_to_hub_and_no_token_is_refused_by_the_dry_run_checks(hub, monkeypatch):
    from rlm_train.config import build_config
    from rlm_train.train.run_config import check_run_config
    from rlm_train.train.sft import SFTConfig

    monkeypatch.delenv("HF_TOKEN")
    # `hub_private` (the short name) is accepted for TRL's hub_private_repo.
    cfg = build_config(SFTConfig, {"model": "m", "dataset": "d", "output_dir": "o", "push_to_hub": True,
                                   "hub_model_id": "team/x", "hub_private": True, "report_to": "none"})
    assert cfg.hub_private_repo is True
    with pytest.raises(UserError) as error:
        check_run_config(cfg, "recipe.yaml")
    assert str(error.value).startswith("recipe.yaml: push_to_hub: no Hugging Face token") and "\n" not in str(error.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    check_run_config(cfg, "recipe.yaml")  # with a token it passes, and nothing was sent
    assert hub.requests == []
