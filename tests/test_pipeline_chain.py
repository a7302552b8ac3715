"""The recipe chain: in the shipped pipelines (tiny CPU, Qwen3-8B on GPUs) every stage reads what an
earlier stage writes, learned from each stage's own `--dry-run` plan (no GPU, no model needed), and
every `openai:` model a stage calls is served by a background stage it comes after."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlm_train import cli
from rlm_train.pipeline.chain import check_chain
from rlm_train.pipeline.plans import stage_plan
from rlm_train.pipeline.recipe import load_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository


def links_of(recipe: str | Path):
    pipeline = load_pipeline(recipe)
    plans = {stage.name: stage_plan(stage) for stage in pipeline.stages}
    return pipeline, plans, check_chain(pipeline, plans)


def source(links, stage: str, name: str) -> str:
    found = [link.source for link in links if link.stage == stage and link.name == name]
    assert found, f"{stage} reads no input named {name}"
    return found[0]


def test_tiny_cpu_pipeline_chain():
    pipeline, plans, links = links_of("recipes/tiny-cpu-pipeline.yaml")
    assert [s.run for s in pipeline.stages] == ["tasks make", "generate", "filter", "sft", "grpo", "eval"]
    assert {name: plan.error for name, plan in plans.items() if plan.error} == {}
    assert [link.describe() for link in links if link.broken] == []
    assert source(links, "generate", "tasks") == "stage tasks"
    assert source(links, "filter", "trajectories") == "stage generate"
    assert source(links, "sft", "dataset") == "stage filter"
    assert source(links, "sft", "model") == "requires"  # the tiny model: scripts/make_tiny_models.py
    assert source(links, "grpo", "model") == "stage sft" and source(links, "grpo", "prompts") == "stage filter"
    assert source(links, "eval", "tasks") == "stage tasks"
    assert {link.source for link in links if link.stage == "eval" and link.name == "methods.tuned.policy"} == \
        {"stage sft", "stage grpo"}


def test_qwen3_8b_pipeline_chain_dry_run():
    pipeline, plans, links = links_of("recipes/qwen3-8b-pipeline.yaml")
    runs = [s.run for s in pipeline.stages if not s.background]
    assert runs == ["tasks make", "generate", "filter", "sft", "grpo", "eval"]
    # Every stage plans (a serve stage notes a model or adapter an earlier stage will write).
    assert {name: plan.error for name, plan in plans.items() if plan.error and not pipeline.stage(name).background} == {}
    assert [link.describe() for link in links if link.broken] == []
    assert source(links, "generate", "tasks") == "stage tasks"
    assert source(links, "generate", "policy") == "served by serve-teacher"
    assert source(links, "filter", "trajectories") == "stage generate"
    assert source(links, "sft", "dataset") == "stage filter" and source(links, "sft", "model") == "requires"
    assert source(links, "grpo", "model") == "stage sft" and source(links, "grpo", "prompts") == "stage filter"
    assert source(links, "serve-eval", "adapters") == "stage sft"
    assert source(links, "serve-grpo", "adapters") == "stage grpo"
    assert source(links, "eval", "methods.grpo-rlm.policy") == "served by serve-grpo"
    assert source(links, "eval", "methods.sft-rlm.policy") == "served by serve-eval"
    for stage in pipeline.stages:
        if not stage.background:
            assert {"nodes", "gpus_per_node", "time"} <= set(stage.slurm), stage.name


def test_a_broken_link_is_found(tmp_path):
    """A GRPO prompt set no stage writes, and an eval model asked of a server that does not serve it."""
    data = yaml.safe_load((REPO / "recipes/qwen3-8b-pipeline.yaml").read_text())
    for stage in data["stages"]:
        if stage["name"] == "grpo":
            stage["with"]["prompts"] = "runs/qwen3-8b/rl-prompts"  # filter writes runs/qwen3-8b/data/rl
        if stage["name"] == "eval":
            stage["with"]["methods"][2]["policy"] = "openai:rlm-qwen3-8b"  # served on :8001, not :8000
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    _, _, links = links_of(recipe)
    broken = {(link.stage, link.name) for link in links if link.broken}
    assert broken == {("grpo", "prompts"), ("eval", "methods.sft-rlm.policy")}


def test_pipeline_dry_run_prints_every_stage_command_and_writes_nothing(capsys):
    pipeline = load_pipeline("recipes/qwen3-8b-pipeline.yaml")
    before = pipeline.out_dir.exists()
    assert cli.main(["pipeline", "--recipe", "recipes/qwen3-8b-pipeline.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for index, stage in enumerate(pipeline.stages, 1):
        assert f"[{index}/{len(pipeline.stages)}] {stage.name} (" in out
        assert f"  command: rlm-train {stage.run} --recipe runs/qwen3-8b/pipeline/{stage.name}.yaml" in out
    assert "chain: all " in out and "requires models/Qwen3-8B" in out
    assert "schedule     2 epoch(s)" in out  # the SFT stage's own plan
    assert pipeline.out_dir.exists() == before
