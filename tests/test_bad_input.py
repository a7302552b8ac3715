"""Bad input, as a new user gives it: each case is one line on stderr naming the file or
field and the fix, and a non-zero exit (or, where going on is right, a one-line warning and
exit 0). The CLI runs in this process (`rlm_train.cli.main`), so the table stays fast.
README's bad-input table lists these cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.cli import main as cli_main


def tasks_file(d: Path, n: int = 2, name: str = "tasks.jsonl") -> Path:
    path = d / name
    write_scenario_tasks(path, n)
    return path


def corrupt(path: Path, lineno: int, text: str = '{"schema": "rlm-train/task/v1", "id": ') -> Path:
    lines = path.read_text().splitlines()
    lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(d: Path, text: str) -> str:
    path = d / "recipe.yaml"
    path.write_text(text)
    return str(path)


def gen(d: Path, *more: str) -> list[str]:
    return ["generate", "--policy", "scripted", "--out", str(d / "out"), "--no-progress", *more]


def sft(d: Path, *overrides: str) -> list[str]:
    from conftest import REPO

    return ["sft", "--recipe", str(REPO / "recipes/tiny-cpu-sft.yaml"), f"output_dir={d / 'out'}", *overrides,
            "--dry-run"]


def run_dir(d: Path, corrupt_line: int | None = None) -> Path:
    """A finished scripted generate run (optionally with a corrupt line in its shard)."""
    tasks = tasks_file(d, 3)
    assert cli_main(["generate", "--tasks", str(tasks), "--policy", "scripted", "--out", str(d / "run"),
                     "--no-progress"]) == 0
    if corrupt_line is not None:
        (shard,) = sorted((d / "run").glob("shard-*.jsonl"))
        corrupt(shard, corrupt_line, '{"schema": "rlm-train/trajectory/v1", "turns": [')
    return d / "run"


# (id, argv builder(tmp dir) -> argv, expected exit code, a phrase the message must hold)
CASES = [
    # -- recipes and overrides
    ("recipe-unknown-key-suggests", lambda d: gen(d, "--recipe", recipe(d, f"tasks: {tasks_file(d)}\nsampels: 2\n")),
     2, "unknown key 'sampels'; did you mean 'samples'?"),
    ("recipe-unknown-nested-key-suggests",
     lambda d: gen(d, "--recipe", recipe(d, f"tasks: {tasks_file(d)}\nrlm:\n  max_iteratons: 3\n")),
     2, "unknown key 'rlm.max_iteratons'; did you mean 'rlm.max_iterations'?"),
    ("override-unknown-key-suggests", lambda d: gen(d, "--tasks", str(tasks_file(d)), "client.request_timeout=5"),
     2, "did you mean 'client.request_timeout_s'?"),
    ("unknown-key-far-from-any", lambda d: gen(d, "--tasks", str(tasks_file(d)), "zzz=1"),
     2, "unknown key 'zzz'; remove it or check the spelling"),
    ("recipe-wrong-type", lambda d: gen(d, "--recipe", recipe(d, f"tasks: {tasks_file(d)}\nsamples: many\n")),
     2, "key 'samples': Input should be a valid integer"),
    ("recipe-not-a-mapping", lambda d: gen(d, "--recipe", recipe(d, "- tasks\n- out\n")),
     2, "a recipe must be a YAML mapping"),
    ("recipe-not-yaml", lambda d: gen(d, "--recipe", recipe(d, "tasks: [unclosed\n")), 2, "not valid YAML"),
    ("recipe-missing", lambda d: gen(d, "--recipe", str(d / "nope.yaml")), 2, "recipe file not found"),
    ("recipe-is-a-directory", lambda d: gen(d, "--recipe", str(d)), 2, "is a directory; pass a YAML recipe file"),
    ("override-without-value", lambda d: gen(d, "--tasks", str(tasks_file(d)), "samples"), 2, "expected KEY=VALUE"),
    ("override-value-not-yaml", lambda d: gen(d, "--tasks", str(tasks_file(d)), "samples=[1"),
     2, "override 'samples=[1': the value is not valid YAML (expected ',' or ']'"),
    ("list-key-given-one-value", lambda d: gen(d, "--tasks", str(tasks_file(d)), "base_urls=http://h:8000/v1"),
     2, "key 'base_urls': expects a list, got 'http://h:8000/v1'; write base_urls=[http://h:8000/v1]"),
    ("trl-name-in-the-wrong-section", lambda d: sft(d, "lora.num_train_epochs=2"),
     2, "unknown key 'lora.num_train_epochs'; did you mean 'training.epochs'?"),
    ("key-in-the-wrong-section", lambda d: sft(d, "lora.max_length=512"),
     2, "unknown key 'lora.max_length'; did you mean 'training.max_length'? (it belongs to that section)"),
    ("trl-name-and-ours-both", lambda d: sft(d, "num_train_epochs=2", "training.epochs=3"),
     2, "'num_train_epochs' and 'training.epochs' are the same setting"),
    # -- sizes and counts
    ("zero-samples", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--samples", "0"),
     2, "key 'samples': Input should be greater than or equal to 1"),
    ("zero-concurrency", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--concurrency", "0"),
     2, "key 'concurrency': Input should be greater than or equal to 1"),
    ("negative-retries", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--max-retries", "-1"),
     2, "key 'client.max_retries'"),
    ("zero-timeout", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--request-timeout-s", "0"),
     2, "key 'client.request_timeout_s': Input should be greater than 0"),
    ("shard-out-of-range", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--shard", "4/4"),
     2, "shard_index 4 must be below num_shards 4"),
    ("shard-malformed", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--shard", "half"), 2, "expected I/N"),
    ("absurd-samples", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--samples", "100000000000000000000"),
     2, "key 'samples': must be at most 10,000, got 100000000000000000000 (every (task, sample) pair"),
    ("too-many-pairs", lambda d: gen(d, "--tasks", str(tasks_file(d, 1001)), "--samples", "10000"),
     2, "1,001 tasks x samples=10,000 = 10,010,000 (task, sample) pairs, above the bound of 10,000,000 a run"),
    ("absurd-concurrency", lambda d: gen(d, "--tasks", str(tasks_file(d)), "--concurrency", "100000"),
     2, "key 'concurrency': must be at most 200, got 100000 (each episode in flight holds a REPL sandbox"),
    ("absurd-eval-samples", lambda d: ["eval", "--tasks", str(tasks_file(d)), "--method", "a=scripted", "--out",
                                       str(d / "e"), "--no-progress", "--samples", "99999999"],
     2, "key 'samples': must be at most 10,000"),
    ("absurd-root-max-tokens", lambda d: gen(d, "--tasks", str(tasks_file(d)), "rlm.root_max_tokens=1000000000"),
     2, "key 'rlm.root_max_tokens': must be at most 1,000,000"),
    ("absurd-gateway-concurrency", lambda d: ["serve", "--base-url", "http://127.0.0.1:9/v1", "--max-concurrent",
                                              "100000", "--dry-run"], 2, "key 'gateway.max_concurrent': must be at most 200"),
    ("tasks-make-absurd-n", lambda d: ["tasks", "make", "--family", "niah", "--n", "100000000000", "--context-tokens",
                                       "8000", "--out", str(d / "t.jsonl")],
     2, "n=100,000,000,000 is above the bound of 100,000 tasks a file"),
    ("tasks-make-too-many-tokens", lambda d: ["tasks", "make", "--family", "niah", "--n", "50000", "--context-tokens",
                                              "32000", "--out", str(d / "t.jsonl")],
     2, "= 1,600,000,000 context tokens, above the bound of 1,000,000,000"),
    ("zero-iterations", lambda d: gen(d, "--tasks", str(tasks_file(d)), "rlm.max_iterations=0"),
     2, "key 'rlm.max_iterations'"),
    ("absurd-sub-model-chars", lambda d: gen(d, "--tasks", str(tasks_file(d)), "rlm.sub_model_chars=10"),
     2, "key 'rlm.sub_model_chars': Input should be greater than or equal to 1000"),
    ("tasks-make-zero", lambda d: ["tasks", "make", "--family", "niah", "--n", "0", "--context-tokens", "8000",
                                   "--out", str(d / "t.jsonl")], 2, "n must be a positive integer"),
    ("tasks-make-tiny-context", lambda d: ["tasks", "make", "--family", "niah", "--n", "2", "--context-tokens", "5",
                                           "--out", str(d / "t.jsonl")], 2, "niah"),
    ("bench-zero-repeats", lambda d: ["bench", "runtime", "--repeats", "0"], 2, "--repeats must be at least 1"),
    ("bench-episodes-elsewhere", lambda d: ["bench", "tasks", "--episodes", "5"], 2, "only `bench soak` takes it"),
    # -- missing files, directories where files are expected, and the reverse
    ("tasks-missing", lambda d: gen(d, "--tasks", str(d / "none.jsonl")), 2, "task file not found"),
    ("tasks-is-a-directory", lambda d: gen(d, "--tasks", str(d)), 2, "is a directory; pass a task JSONL file"),
    ("out-is-a-file", lambda d: gen(d, "--tasks", str(tasks_file(d))) + ["--out", str(tasks_file(d, name="x"))],
     2, "--out"),
    ("context-missing", lambda d: ["run", "--policy", "scripted", "--context-file", str(d / "no.txt"), "--query", "q"],
     2, "context file not found"),
    ("context-is-a-directory", lambda d: ["run", "--policy", "scripted", "--context-file", str(d), "--query", "q"],
     2, "is a directory; pass the context as one file"),
    ("filter-trajectories-missing", lambda d: ["filter", "--trajectories", str(d / "nope"), "--out", str(d / "f")],
     2, "no such trajectory directory or file"),
    ("tasks-show-empty-directory", lambda d: ["tasks", "show", str(d)], 2, "is a directory with no task file"),
    ("out-in-proc", lambda d: ["tasks", "make", "--family", "niah", "--n", "1", "--context-tokens", "8000",
                               "--out", "/proc/x.jsonl"], 2, "/proc/x.jsonl: cannot write"),
    ("vllm-args-unclosed-quote", lambda d: ["serve", "--model", "gemma3-270m", "--vllm-args", "--chat-template 'x",
                                            "--dry-run"], 2, "--vllm-args \"--chat-template 'x\": no closing quotation"),
    ("eval-tasks-is-a-directory", lambda d: ["eval", "--tasks", str(d), "--method", "a=scripted",
                                             "--out", str(d / "e"), "--no-progress"], 2, "is a directory"),
    # -- encodings, empty contexts and queries, empty task sets
    ("context-not-utf8", lambda d: ["run", "--policy", "scripted", "--query", "q", "--context-file",
                                    str(_write(d / "c.txt", b"caf\xe9 latin-1"))], 2, "not UTF-8 text (byte 0xe9"),
    ("context-empty", lambda d: ["run", "--policy", "scripted", "--query", "q", "--context-file",
                                 str(_write(d / "c.txt", b""))], 2, "the context file is empty"),
    ("context-whitespace", lambda d: ["run", "--policy", "scripted", "--query", "q", "--context-file",
                                      str(_write(d / "c.txt", b"  \n\t\n"))], 2, "empty (only whitespace)"),
    ("context-empty-json", lambda d: ["run", "--policy", "scripted", "--query", "q", "--context-file",
                                      str(_write(d / "c.json", b"[]"))], 2, "holds an empty JSON value"),
    ("query-empty", lambda d: ["run", "--policy", "scripted", "--query", "  ", "--context-file",
                               str(_write(d / "c.txt", b"text"))], 2, "--query is empty"),
    ("tasks-not-utf8", lambda d: gen(d, "--tasks", str(_write(d / "t.jsonl", b'{"id": "caf\xe9"}\n'))),
     2, "t.jsonl:1:"),
    ("tasks-empty-file", lambda d: gen(d, "--tasks", str(_write(d / "t.jsonl", b"\n\n"))), 2, "no runnable tasks"),
    ("task-empty-context", lambda d: gen(d, "--tasks", str(_write(d / "t.jsonl", json.dumps(
        {"schema": "rlm-train/task/v1", "id": "a", "query": "q", "context": " ", "answer": "x",
         "scorer": "exact"}).encode() + b"\n"))), 2, "t.jsonl:1: task 'a': field 'context' is empty"),
    ("eval-empty-task-set", lambda d: ["eval", "--tasks", str(_write(d / "t.jsonl", b"")), "--method", "a=scripted",
                                       "--out", str(d / "e"), "--no-progress"], 2, "no runnable tasks"),
    # -- a corrupt line in any JSONL input: reported with its number by every command that reads it
    ("generate-corrupt-task-line", lambda d: gen(d, "--tasks", str(corrupt(tasks_file(d, 3), 2))),
     2, "tasks.jsonl:2: not valid JSON"),
    ("eval-corrupt-task-line", lambda d: ["eval", "--tasks", str(corrupt(tasks_file(d, 3), 3)), "--method",
                                          "a=scripted", "--out", str(d / "e"), "--no-progress"],
     2, "tasks.jsonl:3: not valid JSON"),
    ("tasks-show-corrupt-line", lambda d: ["tasks", "show", str(corrupt(tasks_file(d, 3), 2))],
     2, "tasks.jsonl:2: not valid JSON"),
    ("tasks-score-corrupt-prediction", lambda d: ["tasks", "score", "--tasks", str(tasks_file(d)), "--predictions",
                                                  str(_write(d / "p.jsonl", b'{"id": "bench-0", "answer": "x"}\n{"id"\n'))],
     2, "p.jsonl:2: not valid JSON"),
    ("filter-corrupt-trajectory-line", lambda d: ["filter", "--trajectories", str(run_dir(d, corrupt_line=2)),
                                                  "--out", str(d / "f")], 0, "-0of1-"),
    ("view-corrupt-trajectory-line", lambda d: ["view", str(run_dir(d, corrupt_line=2)), "-o", str(d / "v.html")],
     0, "-0of1-"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("build,code,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_fault(tmp_path, capsys, build, code, phrase):
    argv = build(tmp_path)
    capsys.readouterr()  # set-up output (a generate run for filter cases) is not under test
    assert cli_main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    if code:
        assert len(err) == 1, err  # one line, no traceback
        assert err[0].startswith(f"rlm-train {argv[0]}: error: ") and phrase in err[0], err[0]
    else:
        warnings = [line for line in err if line.startswith("warning: ")]
        assert warnings and any(phrase in w and ":2: not valid JSON" in w for w in warnings), err
    assert not (tmp_path / "out" / "summary.json").exists()  # nothing half-written by a refused run


def test_filter_prints_corrupt_lines_in_its_summary_and_not_the_task_files_warnings_again(tmp_path, capsys):
    tasks = corrupt(tasks_file(tmp_path, 4), 3)
    assert cli_main(["generate", "--tasks", str(tasks), "--policy", "scripted", "--out", str(tmp_path / "run"),
                     "--no-progress", "--skip-bad-lines"]) == 0
    generate_err = capsys.readouterr().err
    assert generate_err.count("tasks.jsonl:3: not valid JSON") == 1
    (shard,) = sorted((tmp_path / "run").glob("shard-*.jsonl"))
    corrupt(shard, 2, "garbage")
    assert cli_main(["filter", "--trajectories", str(tmp_path / "run"), "--out", str(tmp_path / "f")]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping {shard}:2: not valid JSON" in err
    assert f"1 corrupt trajectory lines skipped: {shard}:2" in out
    assert "tasks.jsonl:3" not in err  # generate reported it; filter only counts it
    assert "1 bad task-file lines skipped (as generate did)" in out


def test_scripted_summary_does_not_print_retries_where_they_do_not_apply(tmp_path, capsys):
    assert cli_main(gen(tmp_path, "--tasks", str(tasks_file(tmp_path)))) == 0
    out = capsys.readouterr().out
    assert "retries" not in out.splitlines()[0] and "0 errors)" in out.splitlines()[0]


def test_tasks_show_on_a_run_or_suite_directory_shows_its_task_files(tmp_path, capsys):
    run = run_dir(tmp_path)
    capsys.readouterr()
    assert cli_main(["tasks", "show", str(run), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert f"== {tmp_path / 'tasks.jsonl'}" in out and "3 tasks (niah: 3)" in out
    suite = tmp_path / "suite"
    suite.mkdir()
    tasks_file(suite, 2, "train.jsonl")
    tasks_file(suite, 1, "heldout.jsonl")
    (suite / "notes.jsonl").write_text('{"other": 1}\n')
    assert cli_main(["tasks", "show", str(suite), "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert "heldout.jsonl" in out and "train.jsonl" in out and "notes.jsonl" not in out


def test_filter_that_keeps_nothing_warns_before_writing_also_in_a_dry_run(tmp_path, capsys):
    run = run_dir(tmp_path)
    capsys.readouterr()
    args = ["filter", "--trajectories", str(run), "--out", str(tmp_path / "f"), "min_turns=50", "rl_max_pass_rate=0.5"]
    assert cli_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would keep 0 of 3 episodes (dropped: too_few_turns 3): 0 SFT samples, 0 RL prompts" in out
    assert "warning:" in out and "nothing to keep: all 3 episodes were dropped" in out and "Loosen the filter" in out
    assert not (tmp_path / "f").exists()
    # Only the SFT set empty: the warning says the RL set is what remains.
    assert cli_main([*args[:-1], "--dry-run"]) == 0
    assert "warning: no SFT sample kept" in capsys.readouterr().out


def test_a_hub_model_not_in_the_cache_is_one_line_with_the_download_command(tmp_path, capsys, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1) with an empty Hugging Face cache, every command that names a model
    stops on one line that gives the command that downloads it, before anything is written."""
    from conftest import REPO
    from rlm_train.testing.tiny_models import rlm_sample, write_jsonl

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(0)])
    tasks = tasks_file(tmp_path)
    out = tmp_path / "out"
    commands = [
        ["sft", "--recipe", str(REPO / "recipes/tiny-cpu-sft.yaml"), f"dataset={data}", f"output_dir={out}"],
        ["grpo", "--recipe", str(REPO / "recipes/tiny-cpu-grpo.yaml"), f"prompts={tasks}", f"output_dir={out}"],
        ["serve", "--port", "0"],
        ["eval", "--tasks", str(tasks), "--out", str(out), "--method", "tuned=hf:MODEL"],
        ["generate", "--tasks", str(tasks), "--out", str(out), "--no-progress", "--policy", "hf:MODEL"],
    ]
    for spec, phrase in (("org/absent", "download it: hf download org/absent"),
                         ("org//absent", "not found on this machine, and not a Hub id (org/name[@revision])")):
        for argv in commands:
            argv = [a.replace("MODEL", spec) for a in argv]
            argv += ["--model", spec] if argv[0] == "serve" else [] if "hf:" in argv[-1] else [f"model={spec}"]
            assert cli_main(argv) == 2, argv
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(err) == 1 and err[0].startswith(f"rlm-train {argv[0]}: error: ") and phrase in err[0], err
            assert not out.exists(), argv
