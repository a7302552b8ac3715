"""`rlm-train run` end to end in a subprocess, and the CLI's bad-input behaviour."""

import json
import socket
import subprocess
import sys

from conftest import REPO

from rlm_train.records import Outcome

QUERY = "What is the special magic number for quiet-harbor?"


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "rlm_train.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_help_imports_no_heavy_packages():
    code = (
        "import sys, rlm_train.cli as c\n"
        "c.main(['--help'])\n"
        "import rlm_train.rlm.commands, rlm_train.rlm, rlm_train.repl\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'vllm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "commands:" in out.stdout and "run" in out.stdout


def test_run_scripted_prints_the_answer_and_writes_the_trajectory(tmp_path):
    out_file = tmp_path / "traj.jsonl"
    res = cli(
        "run", "--context-file", "data/demo/haystack.txt", "--query", QUERY,
        "--policy", "scripted", "--family", "niah", "--trajectory-out", str(out_file),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "4817263"
    (record,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert record["schema"] == "rlm-train/trajectory/v1"
    assert record["final"] == "4817263" and record["outcome"] == Outcome.FINAL
    assert record["policy"] == "scripted"
    assert record["messages"][0]["role"] == "system"


def test_missing_context_file_is_one_line_and_exit_2(tmp_path):
    res = cli("run", "--context-file", str(tmp_path / "nope.txt"), "--query", "q", "--policy", "scripted")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.txt: context file not found" in lines[0]


def test_undecodable_context_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    res = cli("run", "--context-file", str(bad), "--query", "q", "--policy", "scripted")
    assert res.returncode == 2
    assert "not UTF-8 text (byte 0xe9 at offset 3)" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unknown_config_key_names_the_key(tmp_path):
    res = cli("run", "--context-file", "data/demo/haystack.txt", "--query", "q", "--policy", "scripted", "max_sub_calls=3")
    assert res.returncode == 2 and "unknown key 'max_sub_calls'" in res.stderr


def test_unreachable_server_is_recorded_and_exits_nonzero(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = tmp_path / "traj.jsonl"
    res = cli(
        "run", "--context-file", "data/demo/haystack.txt", "--query", QUERY,
        "--policy", "openai:some-model", "--base-url", f"http://127.0.0.1:{port}/v1",
        "--trajectory-out", str(out_file), "--max-retries", "2", "--recipe", str(_rlm_recipe(tmp_path)),
    )
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 2  # the summary line, then the one-line error
    assert f"127.0.0.1:{port}" in res.stderr
    (record,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert record["outcome"] == Outcome.ERROR and f"127.0.0.1:{port}" in record["error"]


def _rlm_recipe(tmp_path):
    recipe = tmp_path / "rlm.yaml"
    recipe.write_text("# rlm-train run --recipe rlm.yaml ...\nmax_wall_s: 60\n")
    return recipe
