"""Every recipe under recipes/ is headed by the command that runs it, and dry-runs."""

import re

import pytest

from conftest import REPO
from rlm_train import cli

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# The sub-command word(s) a stage's dry-run needs after `rlm-train`.
DRY_RUN_ARGS = {"tasks": ["tasks", "make"], "generate": ["generate"], "filter": ["filter"], "sft": ["sft"], "grpo": ["grpo"],
                "eval": ["eval"], "pipeline": ["pipeline"]}


def launch_command(recipe):
    """The rlm-train command the recipe's first line runs, directly or through a Slurm template."""
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# "), f"{recipe.name}: the first line must be a comment with its launch command"
    assert f"recipes/{recipe.name}" in first, f"{recipe.name}: the first line must name the recipe itself"
    found = re.findall(r"rlm-train (\w+)", first)
    if not found:
        sbatch = re.search(r"sbatch (\S+\.sbatch)", first)
        assert sbatch, f"{recipe.name}: first line runs neither rlm-train nor an sbatch template"
        found = re.findall(r"rlm_train.cli (\w+)", (REPO / sbatch.group(1)).read_text())
    return found[-1]


def test_there_are_recipes_for_every_stage():
    assert {launch_command(r) for r in RECIPES} >= set(DRY_RUN_ARGS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_runs(recipe, capsys):
    command = launch_command(recipe)
    assert command in DRY_RUN_ARGS, f"{recipe.name}: no dry-run known for `rlm-train {command}`"
    assert cli.main([*DRY_RUN_ARGS[command], "--recipe", str(recipe), "--dry-run"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()
