"""Every stage command shares one skeleton (rlm_train.stage): the same flags, the same
`--dry-run` plan, and output paths checked before any work, each bad one a one-line error."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rlm_train import cli, registry
from rlm_train.errors import UserError
from rlm_train.stage import check_output, format_plan

HEADER = re.compile(r"^rlm-train (run|tasks make|generate|filter|sft|grpo) plan "
                    r"\((recipe: \S+|command line)(; overrides: .+)?\)$")
STAGES = ["run", "tasks", "generate", "filter", "sft", "grpo", "eval"]


def cli_run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rlm_train.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def snapshot(root):
    """Every path under root, with each file's bytes: what a failed command must leave as it was."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def dry_runs(tmp):
    """One dry run per stage command (both forms of `tasks make`), every output under tmp."""
    return {
        "run": ["run", "--context-file", "data/demo/haystack.txt", "--query", "What is the number?",
                "--policy", "scripted", "--trajectory-out", tmp / "traj.jsonl", "max_depth=2"],
        "tasks make": ["tasks", "make", "--family", "niah", "--n", 2, "--context-tokens", 8000, "--out", tmp / "t.jsonl"],
        "tasks make suite": ["tasks", "make", "--recipe", "recipes/tasks-tiny.yaml", f"out_dir={tmp / 'suite'}"],
        "generate": ["generate", "--recipe", "recipes/generate-scripted-cpu.yaml", "--out", tmp / "gen"],
        "filter": ["filter", "--trajectories", tmp / "gen", "--out", tmp / "data"],
        "sft": ["sft", "--recipe", "recipes/tiny-cpu-sft.yaml", f"output_dir={tmp / 'sft'}"],
        "grpo": ["grpo", "--recipe", "recipes/tiny-cpu-grpo.yaml", f"output_dir={tmp / 'grpo'}"],
    }


@pytest.mark.parametrize("case", list(dry_runs(REPO)))
def test_every_stage_dry_run_prints_the_same_plan(case, tmp_path):
    argv = dry_runs(tmp_path)[case]
    res = cli_run(*argv, "--dry-run")
    assert res.returncode == 0, res.stderr
    header, body = res.stdout.split("\n", 1)
    assert HEADER.match(header), header
    assert header.split(" plan ")[0] == f"rlm-train {case.removesuffix(' suite')}"
    plan = yaml.safe_load(body)  # everything after the header is one YAML document
    assert list(plan)[:2] == ["inputs", "outputs"] and list(plan)[-1] == "config"
    assert set(plan) <= {"inputs", "outputs", "notes", "config"}
    assert plan["outputs"] and all(str(tmp_path) in str(path) for path in plan["outputs"].values())
    assert isinstance(plan["config"], dict) and plan["config"]
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_config_is_the_resolved_config(tmp_path):
    res = cli_run(*dry_runs(tmp_path)["run"], "--max-iterations", 3, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("rlm-train run plan (command line; overrides: max_depth=2)\n")
    config = yaml.safe_load(res.stdout.split("\n", 1)[1])["config"]
    assert config["max_depth"] == 2 and config["max_iterations"] == 3
    assert "4817263" not in res.stdout  # no episode ran


def test_training_plans_keep_their_notes(tmp_path):
    res = cli_run(*dry_runs(tmp_path)["grpo"], "--dry-run")
    plan = yaml.safe_load(res.stdout.split("\n", 1)[1])
    notes = plan["notes"]  # train.grpo.plan's lines, kept whole
    assert "REPL output tokens masked" in notes and ("resources    ok" in notes or "MISSING HERE" in notes)
    assert plan["config"]["output_dir"] == str(tmp_path / "grpo")


# ---------------------------------------------------------------------------
# Output paths: checked before any work, one line, exit 2, nothing written


def output_cases(tmp):
    """(name, argv, what the error starts with: the flag or config key and the path, then the
    path at fault). `adir` exists as a directory, `afile` as a file."""
    adir, afile = tmp / "adir", tmp / "afile"
    under_file = afile / "sub" / "x.jsonl"
    run = ["run", "--context-file", "data/demo/haystack.txt", "--query", "q", "--policy", "scripted"]
    make = ["tasks", "make", "--family", "niah", "--n", 1, "--context-tokens", 8000]
    gen = ["generate", "--tasks", tmp / "tasks.jsonl", "--policy", "scripted"]
    blocked = tmp / "blocked" / "sft"
    return [
        ("run --trajectory-out DIR", [*run, "--trajectory-out", adir], f"--trajectory-out {adir}: is a directory"),
        ("run --trajectory-out under a file", [*run, "--trajectory-out", under_file],
         f"--trajectory-out {under_file}: {afile} is not a directory"),
        ("tasks make --out DIR", [*make, "--out", adir], f"--out {adir}: is a directory"),
        ("tasks make --out under a file", [*make, "--out", under_file], f"--out {under_file}: {afile} is not a directory"),
        ("tasks make out_dir=FILE", ["tasks", "make", "--recipe", "recipes/tasks-tiny.yaml", f"out_dir={afile}"],
         f"out_dir={afile}: is a file"),
        ("tasks score --out DIR", ["tasks", "score", "--tasks", tmp / "tasks.jsonl", "--predictions", afile,
                                   "--out", adir], f"--out {adir}: is a directory"),
        ("generate --out FILE", [*gen, "--out", afile], f"--out {afile}: is a file"),
        ("generate --out under a file", [*gen, "--out", afile / "run"], f"--out {afile / 'run'}: {afile} is not a directory"),
        ("filter --out FILE", ["filter", "--trajectories", adir, "--out", afile], f"--out {afile}: is a file"),
        ("filter --out with a file where sft/ goes", ["filter", "--trajectories", adir, "--out", blocked.parent],
         f"--out {blocked}: is a file"),
        ("sft output_dir=FILE", ["sft", "--recipe", "recipes/tiny-cpu-sft.yaml", f"output_dir={afile}"],
         f"output_dir={afile}: is a file"),
        ("grpo output_dir under a file", ["grpo", "--recipe", "recipes/tiny-cpu-grpo.yaml", f"output_dir={afile / 'g'}"],
         f"output_dir={afile / 'g'}: {afile} is not a directory"),
        ("bench --json-out DIR", ["bench", "runtime", "--json-out", adir], f"--json-out {adir}: is a directory"),
    ]


CASES = output_cases(REPO)


PARAMS = [pytest.param(i, dry, id=f"{name}{' --dry-run' if dry else ''}") for i, (name, argv, _) in enumerate(CASES)
          for dry in (False, True) if not dry or argv[0] in STAGES and argv[:2] != ["tasks", "score"]]


@pytest.mark.parametrize("index, dry_run", PARAMS)
def test_bad_output_path_is_one_line_before_any_work(index, dry_run, tmp_path):
    name, argv, message = output_cases(tmp_path)[index]
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "tasks.jsonl").write_text("")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "sft").write_text("a file where filter writes a directory\n")
    before = snapshot(tmp_path)
    res = cli_run(*argv, *(["--dry-run"] if dry_run else []))
    assert res.returncode == 2, (name, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"rlm-train {argv[0]}: error: {message}"), lines[0]
    assert "Traceback" not in res.stderr
    assert res.stdout == ""  # no plan, no work
    assert snapshot(tmp_path) == before  # nothing created or changed


def test_unwritable_parent_is_one_line():
    # root may write anywhere: as root, run the command as `nobody` (setpriv), in a directory it can reach.
    as_user = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root, and no setpriv to drop to another user")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="rlm-train-locked-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        out = locked / "new" / "t.jsonl"
        res = subprocess.run([*as_user, sys.executable, "-m", "rlm_train.cli", "tasks", "make", "--family", "niah",
                              "--n", "1", "--context-tokens", "8000", "--out", str(out)],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"rlm-train tasks: error: --out {out}: cannot write in {locked} (permission denied); "
            "pass a path you can write to"]
        assert list(locked.iterdir()) == []
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)


# ---------------------------------------------------------------------------
# In process: the checks themselves, the flags, the backstop


def test_check_output(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    check_output(tmp_path / "new" / "deeper" / "x.json", "file", "--out")  # parents are created later
    check_output(tmp_path / "f", "file", "--out")  # an existing file is replaced or appended to
    check_output(tmp_path / "d", "dir", "--out")
    check_output(tmp_path / "new", "dir", "out_dir")
    cases = [
        (tmp_path / "d", "file", "--out", f"--out {tmp_path / 'd'}: is a directory; pass a file path"),
        (tmp_path / "f", "dir", "out_dir", f"out_dir={tmp_path / 'f'}: is a file; pass a directory path"),
        (tmp_path / "f" / "x", "dir", "--out", f"--out {tmp_path / 'f' / 'x'}: {tmp_path / 'f'} is not a directory"),
        (tmp_path / "f" / "a" / "b.json", "file", "--json-out", f"{tmp_path / 'f'} is not a directory"),
        ("/dev/null", "file", "--out", "--out /dev/null: exists and is not a regular file"),
        ("", "dir", "--out", "--out: no path given"),
    ]
    for path, kind, flag, message in cases:
        with pytest.raises(UserError) as info:
            check_output(path, kind, flag)
        assert message in str(info.value) and "\n" not in str(info.value)
    assert list((tmp_path / "d").iterdir()) == [] and not (tmp_path / "new").exists()


def stage_parsers():
    for name in STAGES:
        module = registry.command(name).load()
        parser = argparse.ArgumentParser(prog=f"rlm-train {name}")
        module.add_arguments(parser)
        if name == "tasks":  # the stage is `tasks make`
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices["make"]
        yield name, parser


def test_every_stage_has_the_same_recipe_dry_run_and_override_flags():
    seen: dict[str, set] = {"recipe": set(), "dry_run": set(), "overrides": set()}
    for name, parser in stage_parsers():
        actions = {a.dest: a for a in parser._actions}
        assert actions["recipe"].option_strings == ["--recipe", "--config"], name
        assert actions["dry_run"].option_strings == ["--dry-run"], name
        assert actions["overrides"].nargs == "*" and actions["overrides"].metavar == "KEY=VALUE", name
        seen["recipe"].add(re.sub(r"of \w+ keys", "of <config> keys", actions["recipe"].help))
        seen["dry_run"].add(actions["dry_run"].help)
        assert actions["plan_json"].option_strings == ["--plan-json"], name
        seen["overrides"].add(re.sub(r"e\.g\. \S+;", "e.g. <a key of its config>;", actions["overrides"].help))
    assert all(len(helps) == 1 for helps in seen.values()), seen


def test_an_os_error_naming_a_file_is_one_line(monkeypatch, capsys):
    import rlm_train.bench as bench

    def fails(args):
        raise PermissionError(13, "Permission denied", "/data/out/x.json")

    monkeypatch.setattr(bench, "main", fails)
    assert cli.main(["bench", "runtime"]) == 2
    assert capsys.readouterr().err == "rlm-train bench: error: /data/out/x.json: Permission denied\n"

    def bug(args):
        raise OSError("no file named: a bug or a connection error keeps its traceback")

    monkeypatch.setattr(bench, "main", bug)
    with pytest.raises(OSError):
        cli.main(["bench", "runtime"])


def test_plan_format_reads_back():
    text = format_plan("filter", {"out": "o", "n": 1}, "recipe: r.yaml", {"trajectories": ["a", "b"], "tasks": None},
                       {"out": "o/"}, ["line one: with a colon", "  'quoted' {braces}  "])
    assert text.splitlines()[0] == "rlm-train filter plan (recipe: r.yaml)"
    assert yaml.safe_load(text.split("\n", 1)[1]) == {
        "inputs": {"trajectories": ["a", "b"]}, "outputs": {"out": "o/"},
        "notes": "line one: with a colon\n'quoted' {braces}\n", "config": {"out": "o", "n": 1}}
