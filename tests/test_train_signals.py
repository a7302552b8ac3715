"""SIGTERM and SIGINT to `rlm-train sft`: it stops within seconds after the step it is on, with a
checkpoint whose adapter is exported as a partial result, exit code 128+signal; the same command then
resumes from it. A signal delivered twice at once (scancel and torchrun) is one request, in training and in
generation; a second one later stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.testing.tiny_models import build_tiny_qwen3, rlm_sample, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu-sft.yaml"


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlm_train.cli", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sft ended early ({proc.returncode}): {log.read_text()[-2000:]}")
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail("sft did not reach its first steps in time")


def stop_with(proc: subprocess.Popen, signum: int) -> float:
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{signal.Signals(signum).name}: sft still running 60 s later")
    return time.monotonic() - sent


@pytest.mark.slow
def test_sigterm_and_sigint_stop_with_a_checkpoint_and_the_next_run_resumes(tmp_path, capsys):
    model = build_tiny_qwen3(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(i) for i in range(8)])
    out = tmp_path / "out"
    base = ["sft", "--recipe", str(TINY_RECIPE), f"model={model}", f"dataset={data}", f"output_dir={out}",
            "save_merged=false", "training.batch_size=1", "training.save_steps=1000"]

    log = tmp_path / "term.log"
    proc = start(base + ["training.max_steps=100000", "--quiet"], log)
    wait_for_steps(proc, out / "metrics.jsonl", 2, log)
    took = stop_with(proc, signal.SIGTERM)
    print(f"SIGTERM -> exit in {took:.1f} s")
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-2000:]
    assert took < 30
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["global_step"]
    assert summary["stopped_by"] == "SIGTERM" and (out / f"checkpoint-{stopped_at}").is_dir()
    # The checkpoint's adapter, marked partial: weights to use, while the exit code says the run is unfinished.
    assert json.loads((out / "adapter" / "partial.json").read_text())["step"] == stopped_at
    assert summary["partial_step"] == stopped_at and not (out / "merged").exists()
    assert "run the same command again to resume" in log.read_text()

    # The next run (here: a target two steps further) resumes from that checkpoint.
    assert cli.main(base + [f"training.max_steps={stopped_at + 2}"]) == 0
    capsys.readouterr()
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_from"].endswith(f"checkpoint-{stopped_at}") and resumed["global_step"] == stopped_at + 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter" / "partial.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]

    log = tmp_path / "int.log"
    proc = start(base + ["training.max_steps=100000", "--quiet"], log)
    wait_for_steps(proc, out / "metrics.jsonl", len(steps) + 2, log)
    took = stop_with(proc, signal.SIGINT)
    print(f"SIGINT -> exit in {took:.1f} s")
    assert proc.returncode == 128 + signal.SIGINT and took < 30, log.read_text()[-2000:]
    interrupted = json.loads((out / "summary.json").read_text())
    assert interrupted["stopped_by"] == "SIGINT" and interrupted["global_step"] > stopped_at + 2
    assert (out / f"checkpoint-{interrupted['global_step']}").is_dir()
    assert "Traceback" not in log.read_text()


_FAILED_SAVE = """
import os, sys
import torch.distributed as dist
from rlm_train.errors import UserError
from rlm_train.train.common import fail_together, leave_process_group, main_process_only, process_rank

dist.init_process_group("gloo")

@main_process_only
def save():
    raise UserError("out/adapter: no space left on device")

try:
    save()
except Exception as exc:
    print(f"rank {process_rank()}: {type(exc).__name__}: {exc}", flush=True)
fail_together(lambda: None, "a later step")  # every rank is still in step: nobody hung
print(f"rank {process_rank()}: done", flush=True)
leave_process_group()  # as the training commands end
"""


def test_a_save_that_fails_on_the_main_process_fails_on_every_process(tmp_path):
    """Two processes (gloo): the main one's save raises; the other raises too, naming it, instead of waiting at
    a barrier for a process that has left."""
    port = str(29600 + os.getpid() % 1000)
    procs = [subprocess.Popen([sys.executable, "-c", _FAILED_SAVE], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 0: UserError: out/adapter: no space left on device" in outs[0]
    assert "rank 1: RuntimeError: save failed on process 0: UserError: out/adapter: no space left on device" in outs[1]
    assert all(f"rank {rank}: done" in out for rank, out in enumerate(outs))


def test_a_signal_repeated_within_moments_is_the_same_request_and_a_later_one_stops_at_once(capsys):
    """scancel signals every rank and torchrun passes its own signal on: a rank gets SIGTERM twice at once.
    That is one request (stop with a checkpoint); a second one later (Ctrl-C again) stops at once."""
    from rlm_train.rollouts.progress import SAME_REQUEST_S, SignalRepeats
    from rlm_train.train.interrupt import GracefulStop

    assert 1 <= SAME_REQUEST_S <= 10  # seconds: covers two deliveries of one request, not a person's second try
    with GracefulStop("sft", SignalRepeats(window_s=0.5)) as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm's
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's
        assert stop.requested == "SIGTERM"
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)  # a second request, later
            time.sleep(5)
    out = capsys.readouterr().out
    assert "[sft] SIGTERM: stopping with a checkpoint" in out and "[sft] SIGTERM again within 0.5 s: the same request" in out
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # put back


_GENERATION_SIGNALS = """
import asyncio, os, signal, sys
from rlm_train.rollouts.progress import SignalRepeats, StopOnSignals

async def main():
    stop = StopOnSignals(SignalRepeats(window_s=1.0))
    stop.install(asyncio.current_task())
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same request, twice
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        print("stopping", flush=True)
    await asyncio.sleep(1.2)
    print("still saving", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # a second request
    await asyncio.sleep(30)
    print("not reached", flush=True)

asyncio.run(main())
"""


def test_generation_takes_a_repeated_signal_as_one_request():
    proc = subprocess.run([sys.executable, "-c", _GENERATION_SIGNALS], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.stdout == "stopping\nstill saving\n", proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM  # the later one: at once, by the signal itself
