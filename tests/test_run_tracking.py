"""Generate and eval metrics to TensorBoard / W&B when asked (`report_to`, `wandb_project`), and
progress as plain lines with an ETA where stderr is not a terminal (Slurm logs, pipes)."""

import importlib.machinery
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.bench.scenario import scenario_responder, write_scenario_tasks
from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig
from rlm_train.eval.run import run_eval
from rlm_train.models.base import CallablePolicy
from rlm_train.rlm import RLMConfig
from rlm_train.rollouts.generate import GenerateConfig, run_generate
from rlm_train.testing.mock_server import MockOpenAIServer

pytest.importorskip("tensorboard", reason="report_to tensorboard needs the tensorboard package (rlm-train[train])")


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under `logdir`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_generate_sends_scalars_during_the_run_and_at_the_end(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 6)
    out = tmp_path / "gen"
    # Each episode is 4 model latencies of 0.15 s, 2 at a time: ~1.8 s, several 0.3 s intervals.
    with MockOpenAIServer(responder=scenario_responder, latency_s=0.15) as server:
        summary = run_generate(GenerateConfig(
            tasks=str(tasks), out=str(out), policy="openai:mock-model", base_urls=[server.base_url],
            concurrency=2, progress=False, progress_every_s=0.3, report_to=["tensorboard"],
            rlm=RLMConfig(max_iterations=4)))
    assert summary["records"] == 6 and summary["mean_score"] == 1.0
    seen = scalars(out / "tensorboard")
    episodes = seen["generate/episodes"]
    assert episodes[-1] == (6, 6.0)
    assert len(episodes) >= 2 and episodes[0][1] < 6, episodes  # points before the end, too
    assert [step for step, _ in episodes] == sorted(step for step, _ in episodes)
    assert seen["generate/mean_score"][-1][1] == 1.0
    assert seen["generate/niah/mean_score"][-1][1] == 1.0
    assert seen["generate/niah/final_rate"][-1][1] == 1.0
    assert seen["generate/errors"][-1][1] == 0.0
    assert seen["generate/tokens/root_completion"][-1][1] == summary["tokens"]["root_completion"] > 0
    assert seen["generate/episodes_per_s"][-1][1] == pytest.approx(summary["this_run"]["episodes_per_s"])
    assert seen["generate/tokens_per_s"][-1][1] > 0


def test_no_report_to_writes_no_event_files(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 1)
    run_generate(GenerateConfig(tasks=str(tasks), out=str(tmp_path / "gen"), policy="scripted", progress=False))
    assert not (tmp_path / "gen" / "tensorboard").exists()


def test_eval_sends_each_methods_scores_per_family_and_the_paired_difference(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 3)
    wrong = CallablePolicy(lambda messages, call: "```repl\nFINAL('zzz wrong')\n```", name="wrong")
    config = EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), progress=False, report_to="tensorboard",
                        methods=[{"name": "teacher", "policy": "scripted"}, {"name": "wrong", "policy": "scripted"}],
                        rlm=RLMConfig(max_iterations=4))
    report = run_eval(config, policies={"wrong": (wrong, None)})
    seen = scalars(tmp_path / "eval" / "tensorboard")
    assert seen["eval/teacher/score"] == [(6, 1.0)]  # one point, at the 6 episodes the eval holds
    assert seen["eval/wrong/score"] == [(6, 0.0)]
    assert seen["eval/teacher/niah/score"] == [(6, 1.0)]
    assert seen["eval/paired/wrong-teacher"] == [(6, -1.0)]
    assert seen["eval/teacher/episodes"] == [(6, 3.0)] and seen["eval/wrong/errors"] == [(6, 0.0)]
    assert seen["eval/teacher/cost/root_tokens"][0][1] == pytest.approx(report["methods"]["teacher"]["cost"]["root_tokens"])
    assert seen["eval/teacher/episodes_per_s"][0][1] > 0


def test_report_to_takes_trl_spellings():
    assert GenerateConfig(report_to="wandb").report_to == ["wandb"]
    assert GenerateConfig(report_to="tensorboard,wandb").report_to == ["tensorboard", "wandb"]
    assert GenerateConfig(report_to="none").report_to == [] == EvalConfig(report_to=[]).report_to
    with pytest.raises(ValueError, match="report_to"):
        GenerateConfig(report_to="mlflow")


def test_wandb_asked_for_but_not_installed_fails_the_dry_run_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether or not it is installed here
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 1)
    out = tmp_path / "gen"
    argv = ["generate", "--tasks", str(tasks), "--out", str(out), "--policy", "scripted", "--dry-run"]
    assert cli.main(argv + ["report_to=wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report_to: wandb is asked for but not installed; pip install 'rlm-train[wandb]'" in err[0]
    assert cli.main(argv + ["wandb_project=demo"]) == 2
    assert "wandb_project: wandb is asked for but not installed" in capsys.readouterr().err
    eval_argv = ["eval", "--tasks", str(tasks), "--out", str(tmp_path / "eval"), "--method", "t=scripted", "--dry-run"]
    assert cli.main(eval_argv + ["report_to=[tensorboard, wandb]"]) == 2
    assert "report_to: wandb is asked for but not installed" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "eval").exists()
    with pytest.raises(UserError, match="report_to: wandb"):
        run_generate(GenerateConfig(tasks=str(tasks), out=str(out), policy="scripted", report_to=["wandb"]))
    assert not out.exists()


def test_the_dry_run_plan_says_where_metrics_go(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 1)
    argv = ["generate", "--tasks", str(tasks), "--out", str(tmp_path / "gen"), "--policy", "scripted", "--dry-run"]
    assert cli.main(argv + ["report_to=tensorboard"]) == 0
    assert f"metrics: also to TensorBoard ({tmp_path / 'gen' / 'tensorboard'})" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "metrics:" not in capsys.readouterr().out  # nothing asked, nothing claimed
    assert not (tmp_path / "gen").exists()


def test_wandb_gets_the_same_scalars_through_its_run_api(tmp_path, monkeypatch):
    """A stand-in `wandb` module (recording init/log/finish) in place of the real client, which
    needs an account or its offline files; what reaches it is what TensorBoard gets."""
    calls: list[tuple] = []

    class StandInRun:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    stand_in = types.ModuleType("wandb")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    stand_in.init = lambda **kw: calls.append(("init", kw)) or StandInRun()
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)
    run_generate(GenerateConfig(tasks=str(tasks), out=str(tmp_path / "gen"), policy="scripted", progress=False,
                                wandb_project="rlm-demo", run_name="scripted-2"))
    assert calls[0][0] == "init"
    init = calls[0][1]
    assert (init["project"], init["name"], init["dir"]) == ("rlm-demo", "scripted-2", str(tmp_path / "gen"))
    assert init["config"]["policy"] == "scripted"
    final = [c for c in calls if c[0] == "log"][-1]
    assert final[1] == 2 and final[2]["generate/episodes"] == 2 and final[2]["generate/mean_score"] == 1.0
    assert calls[-1] == ("finish",)


LINE = re.compile(r"generate: (\d+)/(\d+) episodes \(\d+%\), (\S+), ([\d.]+) ep/s, ETA (\S+); score=(\S+) errors=\d+ "
                  r"turns=\d+ tokens=[\d,]+ \([\d,]+/s\)")


def test_progress_in_a_pipe_is_plain_lines_with_eta(tmp_path, rlm_cli):
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 6)
    with MockOpenAIServer(responder=scenario_responder, latency_s=0.15) as server:
        done = subprocess.run(
            rlm_cli + ["generate", "--tasks", str(tasks), "--out", str(tmp_path / "gen"), "--policy", "openai:mock-model",
                       "--base-url", server.base_url, "--concurrency", "2", "progress_every_s=0.3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # no bar redraws piling up in a log
    lines = [line for line in done.stderr.splitlines() if line.startswith("generate: ")]
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    counts = [int(m.group(1)) for m in matches]
    assert counts[0] == 0 and counts[-1] == 6 and counts == sorted(counts) and len(counts) >= 3, lines
    assert all(int(m.group(2)) == 6 for m in matches)
    assert matches[-1].group(5) == "0s" and matches[-1].group(6) == "1.000"
    assert any(m.group(5) not in ("?", "0s") for m in matches[1:-1]), lines  # an estimate mid-run


def test_progress_every_s_is_bounded():
    with pytest.raises(ValueError, match="progress_every_s"):
        GenerateConfig(progress_every_s=0)


def test_a_wandb_run_that_cannot_start_is_one_line_before_any_episode(tmp_path, monkeypatch):
    """The stand-in raises as the real client does without a login."""
    def no_login(**kw):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    stand_in = types.ModuleType("wandb")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    stand_in.init = no_login
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    tasks = tmp_path / "tasks.jsonl"
    write_scenario_tasks(tasks, 2)
    with pytest.raises(UserError) as caught:
        run_generate(GenerateConfig(tasks=str(tasks), out=str(tmp_path / "gen"), policy="scripted", progress=False,
                                    report_to=["tensorboard", "wandb"]))
    assert str(caught.value) == ("wandb: could not start a run (api_key not configured (no-tty). call "
                                 "wandb.login(key=[your_api_key])); set WANDB_API_KEY or run `wandb login`, or "
                                 "WANDB_MODE=offline to sync later")
    from rlm_train.rollouts import store

    assert list(store.iter_records(tmp_path / "gen")) == []  # no episode ran
    with pytest.raises(UserError, match="wandb: could not start a run"):
        run_eval(EvalConfig(tasks=[str(tasks)], out=str(tmp_path / "eval"), progress=False, wandb_project="p",
                            methods=[{"name": "teacher", "policy": "scripted"}]))
    assert not (tmp_path / "eval" / "runs").exists()  # the eval stopped before its first method
