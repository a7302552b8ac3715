"""One stage registry (issue 26): a stage is one typed object (rlm_train.stage.Stage) that the CLI,
`rlm-train pipeline` and `rlm-train launch` all read from rlm_train/registry.py; a stage planned in
another process answers in JSON (`--plan-json`); a pipeline's `with:` is parsed into the stage's config
class; fingerprints leave out comments and docstrings; the import graph has no circle and points down."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlm_train import cli, registry
from rlm_train.stage import NoteKind, Plan

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rlm_train"
TOY = Path(__file__).resolve().parent / "toy_stage" / "toy_rlm_stage.py"


# ---------------------------------------------------------------------------
# The import graph

# docs/architecture.md, "Layers": each row may import the rows below it. A package's command
# modules (`commands.py`, `*_commands.py`) are its face to the CLI and sit with the entry layer;
# rlm_train/testing (tests' and benches' stand-ins) ranks with it too.
LAYERS = [
    ("foundation", {"repl", "tasks", "records", "formats", "config", "config_help", "stage", "errors", "eventloop",
                    "version"}),
    ("loop and backends", {"rlm", "models"}),
    ("policies", {"policies"}),
    ("stages", {"rollouts", "train", "eval", "serve", "export", "cards"}),
    # The package itself (`rlm_train/__init__.py`) is the Python API's face: it loads rlm_train.api lazily.
    ("entry", {"cli", "registry", "config_commands", "api", "pipeline", "launch", "bench", "viewer", "testing",
               "__init__"}),
]


# Upward edges allowed, each with its reason (none today).
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def rank(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "commands" or parts[-1].endswith("_commands"):
        return len(LAYERS) - 1
    head = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if head in members:
            return index
    raise AssertionError(f"{module}: in no layer; add rlm_train.{head} to docs/architecture.md's table and LAYERS here")


def imports_of(module: str, module_level_only: bool) -> set[str]:
    """The rlm_train modules `module` imports: at module level (what importing it runs), or anywhere."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if module_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:  # imports for type checkers only never run
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")
                source = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub (a package being initialised allows it);
            # `from mod import name` needs mod.
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name for name in found if name in MODULES and name != module}


def test_no_import_circle_between_files():
    """Module-level imports (what importing a file runs) form no circle. A function-level import runs
    after every module is loaded, so it cannot deadlock an import; the layering below covers it."""
    graph = {module: imports_of(module, module_level_only=True) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                raise AssertionError("an import circle: " + " -> ".join(circle))
            if target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])


def test_no_import_from_a_lower_layer_up():
    """Every import, lazy ones included, points down (or stays in its layer)."""
    upward = [f"{module} ({LAYERS[rank(module)][0]}) -> {target} ({LAYERS[rank(target)][0]})"
              for module in sorted(MODULES) for target in sorted(imports_of(module, module_level_only=False))
              if rank(target) > rank(module) and (module, target) not in ALLOWED_UPWARD]
    assert upward == []


def test_the_layer_table_in_the_architecture_doc_names_every_layer_here():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for _, members in LAYERS:
        for member in members - {"__init__"}:
            assert f"rlm_train/{member}" in doc, f"docs/architecture.md's layer table does not name rlm_train/{member}"


# ---------------------------------------------------------------------------
# The registry


def overrides_example(parser) -> str:
    action = next(a for a in parser._actions if a.dest == "overrides")
    return re.search(r"e\.g\. (\S+?)[;,]? ", action.help).group(1)


def test_every_stage_is_one_typed_object_in_its_commands_module():
    from rlm_train.config import StrictModel
    from rlm_train.config_help import resolve_key

    stages = registry.stage_names()
    assert stages == ["tasks make", "generate", "filter", "sft", "grpo", "eval", "serve"]
    for found in registry.commands():
        module = found.load()
        assert callable(module.add_arguments) and callable(module.main), found.name
        if found.stage is None:
            continue
        stage = registry.stage(found.stage)
        assert stage is module.STAGE and stage.main.__module__ == found.module
        assert issubclass(stage.config, StrictModel)
        assert (REPO / "slurm" / stage.slurm_template).is_file(), stage.slurm_template
        parser = cli.build_parser(found.name, module, found.help)
        assert stage.config.__name__ in (parser.epilog or ""), found.name  # `--help` lists its config keys
        # `tasks` is a command with sub-commands; its stage's flags are those of `tasks make`.
        flags = argparse.ArgumentParser()
        stage.add_arguments(flags)
        key = overrides_example(flags).split("=")[0]
        assert resolve_key(stage.config, key) == key, f"{stage.name}: its KEY=VALUE example names no key: {key}"
    from rlm_train.rlm.commands import add_arguments as run_arguments
    from rlm_train.rlm.loop import RLMConfig

    flags = argparse.ArgumentParser()
    run_arguments(flags)
    assert resolve_key(RLMConfig, overrides_example(flags).split("=")[0]) is not None


def test_a_stage_planned_in_another_process_answers_in_json(tmp_path, monkeypatch):
    """`--plan-json` prints the plan the pipeline reads: the same as the stage's plan(config) here."""
    from rlm_train.rollouts.commands import STAGE

    monkeypatch.chdir(REPO)
    args = ["generate", "--recipe", "recipes/generate-scripted-cpu.yaml", f"out={tmp_path / 'gen'}",
            f"tasks={tmp_path / 'absent.jsonl'}"]
    done = subprocess.run([sys.executable, "-m", "rlm_train.cli", *args, "--plan-json"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = Plan.from_json(done.stdout)
    parser = argparse.ArgumentParser()
    STAGE.add_arguments(parser)
    config = STAGE.config_from_args(parser.parse_args(args[1:]))
    assert plan == STAGE.plan(config)
    assert [out.name for out in plan.outputs] == ["run_dir"]
    missing = [note for note in plan.notes if note.kind == NoteKind.MISSING_INPUT]
    assert [note.paths for note in missing] == [(str(tmp_path / "absent.jsonl"),)]
    assert not (tmp_path / "gen").exists()


# ---------------------------------------------------------------------------
# Bad input: a typo in any stage's `with:`


def typo_of(key: str) -> str:
    return key[:-1] + "zz" if len(key) > 4 else key + "zz"


@pytest.mark.parametrize("recipe", ["recipes/tiny-cpu-pipeline.yaml", "recipes/qwen3-8b-pipeline.yaml"])
def test_a_typo_in_any_stages_with_is_one_line_naming_the_stage_key_and_closest_key(recipe, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.chdir(REPO)
    data = yaml.safe_load(Path(recipe).read_text())
    for index, stage in enumerate(data["stages"]):
        config_class = registry.stage(stage["run"]).config
        key = next(name for name in config_class.model_fields if len(name) > 3)
        broken = json.loads(json.dumps(data))
        broken["stages"][index].setdefault("with", {})[typo_of(key)] = 1
        path = tmp_path / f"typo-{index}.yaml"
        path.write_text(yaml.safe_dump(broken, sort_keys=False))
        assert cli.main(["pipeline", "--recipe", str(path), "--dry-run"]) == 2
        out, err = capsys.readouterr()
        assert out == "", out
        assert err == (f"rlm-train pipeline: error: {path}: stage {stage['name']}: unknown key '{typo_of(key)}'; "
                       f"did you mean '{key}'?\n"), err
    # A nested key: the dotted key and the dotted closest one.
    broken = json.loads(json.dumps(data))
    sft = next(s for s in broken["stages"] if s["run"] == "sft")
    sft["with"]["training"] = {**sft["with"].get("training", {}), "learning_rat": 1e-4}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False))
    assert cli.main(["launch", "--recipe", str(path), "--slurm", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"rlm-train launch: error: {path}: stage sft: unknown key 'training.learning_rat'; "
                                 "did you mean 'training.learning_rate'?\n"), err


# ---------------------------------------------------------------------------
# Fingerprints: the typed config and the code, comments and docstrings left out


def copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "copy" / "rlm_train"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_comments_and_docstrings_change_no_fingerprint_code_and_templates_do(tmp_path, monkeypatch):
    from rlm_train.pipeline import code
    from rlm_train.pipeline.recipe import load_pipeline

    monkeypatch.chdir(REPO)

    def fingerprints() -> dict[str, str]:
        return load_pipeline("recipes/demo-cpu.yaml").fingerprints()

    original = fingerprints()
    root = copy_package(tmp_path)
    monkeypatch.setattr(code, "PACKAGE_ROOT", root)
    assert fingerprints() == original  # the same code, elsewhere
    for path in root.rglob("*.py"):
        text = path.read_text()
        if text.startswith('"""'):
            text = '"""Edited: a docstring says more now. ' + text[3:]
        path.write_text(text.replace("\n\n\n", "\n\n# a comment added between definitions\n\n", 1) + "\n# the end\n")
    assert fingerprints() == original

    loop = root / "rlm" / "loop.py"
    loop.write_text(loop.read_text() + "\nEDITED = 1\n")
    after = fingerprints()
    changed = {name for name in original if after[name] != original[name]}
    assert "generate" in changed and "filter" in changed and "eval" in changed  # the loop, and what follows
    assert "tasks" not in changed  # task generation does not import the loop
    template = root / "models" / "templates" / "gemma3.jinja"
    before_template = after
    template.write_text(template.read_text() + "\n")
    assert fingerprints()["sft"] != before_template["sft"]  # a chat template is part of SFT's code


# ---------------------------------------------------------------------------
# A stage added through the registry alone: the toy stage, published as a plugin


def toy_environment(tmp_path: Path) -> dict[str, str]:
    """A directory with the toy stage's module and a dist-info that publishes it (`rlm_train.commands`),
    on PYTHONPATH: what `pip install` of a package with that entry point leaves behind."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(TOY, site / TOY.name)
    info = site / "toy_rlm_stage-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-rlm-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rlm_train.commands]\ntoy = toy_rlm_stage\n")
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


def rlm_train_cli(env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlm_train.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def toy_pipeline(tmp_path: Path, **slurm) -> Path:
    (tmp_path / "in.txt").write_text("hello stages\n")
    stages = [{"name": "upper", "run": "toy", "with": {"source": str(tmp_path / "in.txt"), "out": str(tmp_path / "a.txt")},
               "slurm": slurm},
              {"name": "again", "run": "toy", "with": {"source": str(tmp_path / "a.txt"), "out": str(tmp_path / "b.txt")},
               "slurm": slurm}]
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "out_dir": str(tmp_path / "out"), "stages": stages}))
    return path


def test_a_toy_stage_added_through_the_registry_alone_runs_in_a_pipeline(tmp_path):
    env = toy_environment(tmp_path)
    listing = rlm_train_cli(env, "--help")
    assert re.search(r"^  toy\s+toy: a stage added through the registry alone", listing.stdout, re.M), listing.stdout
    keys = rlm_train_cli(env, "config", "toy")
    assert keys.returncode == 0 and "source" in keys.stdout and "out" in keys.stdout, keys.stderr
    recipe = toy_pipeline(tmp_path)
    planned = rlm_train_cli(env, "pipeline", "--recipe", str(recipe), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert f"source: {tmp_path / 'a.txt'} <- stage upper" in planned.stdout  # chained through the plans
    ran = rlm_train_cli(env, "pipeline", "--recipe", str(recipe))
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "b.txt").read_text() == "HELLO STAGES\n"
    again = rlm_train_cli(env, "pipeline", "--recipe", str(recipe))
    assert again.returncode == 0 and again.stdout.count("skipped (finished before") == 2, again.stdout


def test_a_toy_stage_renders_a_slurm_script_that_bash_runs(tmp_path):
    from test_launch import FAKE_SBATCH, FAKE_SCONTROL, FAKE_SINFO, split_scripts

    env = toy_environment(tmp_path)
    recipe = toy_pipeline(tmp_path, env={"PYTHONPATH": env["PYTHONPATH"]})
    rendered = rlm_train_cli(env, "launch", "--recipe", str(recipe), "--slurm", "--dry-run")
    assert rendered.returncode == 0, rendered.stderr
    scripts = split_scripts(rendered.stdout)
    assert list(scripts) == ["upper", "again"]
    for name, script in scripts.items():
        assert subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True).returncode == 0, name
        assert f"run_stage rlm toy --recipe {tmp_path / 'out' / 'pipeline' / name}.yaml" in script

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "sinfo": FAKE_SINFO, "scontrol": FAKE_SCONTROL,
                       "squeue": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = {**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_SLURM_LOG": str(tmp_path / "calls.jsonl"),
             "FAKE_SINFO": "cpu*|8|64|256000|(null)|up"}
    submitted = rlm_train_cli(slurm, "launch", "--recipe", str(recipe), "--slurm")
    assert submitted.returncode == 0, submitted.stderr
    state = tmp_path / "out" / "pipeline" / "slurm"
    plain = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k != "PYTHONPATH"}
    for name in ("upper", "again"):  # the scripts as a node runs them, one after the other
        job = subprocess.run(["bash", str(state / f"{name}.sbatch")], capture_output=True, text=True, env=plain,
                             timeout=300)
        assert job.returncode == 0, job.stdout + job.stderr
    assert (tmp_path / "b.txt").read_text() == "HELLO STAGES\n"


# ---------------------------------------------------------------------------
# Pipeline state written before fingerprints had a scheme; --keep


def test_an_old_state_is_rerun_saying_why_and_keep_reuses_its_outputs(tmp_path):
    env = toy_environment(tmp_path)
    recipe = toy_pipeline(tmp_path)
    assert rlm_train_cli(env, "pipeline", "--recipe", str(recipe)).returncode == 0
    state_file = tmp_path / "out" / "pipeline" / "upper.state.json"
    state = json.loads(state_file.read_text())
    assert state["fingerprint_scheme"] == 2
    # As e13e08c wrote it: no scheme, a fingerprint of its own kind, directories with a trailing slash.
    old = {k: v for k, v in state.items() if k != "fingerprint_scheme"} | {"fingerprint": "0123456789abcdef"}
    state_file.write_text(json.dumps(old))
    planned = rlm_train_cli(env, "pipeline", "--recipe", str(recipe), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "[1/2] upper (toy; after: -): run: its state was written by an older rlm-train" in planned.stdout

    kept = rlm_train_cli(env, "pipeline", "--recipe", str(recipe), "--keep", "upper")
    assert kept.returncode == 0, kept.stderr
    lines = [line for line in kept.stdout.splitlines() if "upper: kept (--keep)" in line]
    assert len(lines) == 1 and "reusing the outputs of its last run" in lines[0]
    assert json.loads(state_file.read_text())["fingerprint_scheme"] == 2
    assert not (tmp_path / "out" / "pipeline" / "stale").exists()
    again = rlm_train_cli(env, "pipeline", "--recipe", str(recipe))
    assert again.stdout.count("skipped (finished before") == 2, again.stdout

    state_file.write_text(json.dumps(old))
    rerun = rlm_train_cli(env, "pipeline", "--recipe", str(recipe))
    assert rerun.returncode == 0, rerun.stderr
    assert "upper: outputs of an older rlm-train's run (another fingerprint scheme) moved aside to" in rerun.stdout
    assert (tmp_path / "b.txt").read_text() == "HELLO STAGES\n"


# ---------------------------------------------------------------------------
# The CLI (issue 27): every key listed, `--key value` answered with KEY=VALUE, no BrokenPipe traceback


def test_config_and_help_list_every_key(capsys):
    from rlm_train.config_help import config_keys
    from rlm_train.train.sft import SFTConfig

    assert cli.main(["config", "sft"]) == 0
    listing = capsys.readouterr().out
    keys = [key.key for key in config_keys(SFTConfig)]
    assert "training.learning_rate" in keys and "lora.r" in keys
    assert all(key in listing for key in keys)
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    helped = capsys.readouterr().out
    assert all(key in helped for key in keys)
    assert cli.main(["config", "view"]) == 2  # not a stage
    assert "not a stage command" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["sft", "--recipe", "recipes/tiny-cpu-sft.yaml", "--learning_rate", "1e-4"], "training.learning_rate=1e-4"),
    (["generate", "--recipe", "recipes/generate-scripted-cpu.yaml", "--max-iterations", "3"], "rlm.max_iterations=3"),
    (["filter", "--min_turns=2"], "min_turns=2"),
])
def test_an_unknown_flag_is_answered_with_the_key_value_form(argv, hint, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rlm-train {argv[0]}: error: unrecognized arguments: "), err
    assert err[0].endswith(f"config keys are set as KEY=VALUE: {hint}"), err


@pytest.mark.parametrize("argv", [["--help"], ["sft", "--help"]])
def test_help_into_a_closed_pipe_prints_no_traceback(argv):
    done = subprocess.run(f"{sys.executable} -m rlm_train.cli {' '.join(argv)} | head -1", shell=True,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.startswith("usage: rlm-train") and done.stderr == "", done.stderr
