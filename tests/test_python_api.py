"""The Python API (`rlm_train.api`, exported lazily by `rlm_train`): episodes, policies and evals
from scripts and from inside a running event loop (Jupyter), and the example notebook, executed."""

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rlm_train
from rlm_train import eventloop
from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.errors import UserError
from rlm_train.records import Outcome

REPO = Path(__file__).resolve().parents[1]


def scenario_task(tmp_path: Path) -> dict:
    write_scenario_tasks(tmp_path / "tasks.jsonl", 1)
    return json.loads((tmp_path / "tasks.jsonl").read_text().splitlines()[0])


def test_import_is_light_and_the_api_names_resolve(tmp_path):
    code = ("import sys, rlm_train; light = not any(m in sys.modules for m in ('pydantic', 'torch', 'rlm_train.api')); "
            "names = [getattr(rlm_train, n).__name__ for n in ('run_episode', 'run_episode_sync', 'build_policies', "
            "'run_eval', 'run_generate', 'RLMConfig', 'EvalConfig', 'GenerateConfig')]; print(light, names)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True ['run_episode', 'run_episode_sync', 'build_policies', 'run_eval'")
    from rlm_train import api

    assert all(getattr(api, n).__doc__ for n in ("run_episode", "run_episode_sync", "run_eval", "run_generate"))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rlm_train.nope  # noqa: B018


def test_run_episode_sync_in_a_script_and_inside_a_running_loop(tmp_path):
    task = scenario_task(tmp_path)
    record = rlm_train.run_episode_sync(task, policy="scripted", config={"max_iterations": 4})
    assert record["outcome"] == Outcome.FINAL and "key0" in record["final"] and record["score"] == 1.0
    assert record["task_id"] == "bench-0" and record["family"] == "niah" and record["sample"] == 0

    async def notebook_cell():  # what a Jupyter cell is: code running inside the kernel's loop
        loop_thread = threading.get_ident()
        record = rlm_train.run_episode_sync("What is the answer?", task["context"], policy="scripted")
        return loop_thread, record

    loop_thread, inside = asyncio.run(notebook_cell())
    assert loop_thread == threading.get_ident()
    assert inside["outcome"] == Outcome.FINAL and inside.get("score") is None  # a bare question has no scorer
    # The awaitable form, and the loop module's own run_episode_sync, in a running loop too.
    from rlm_train.policies.spec import build_policy
    from rlm_train.rlm import run_episode_sync as loop_sync

    async def both():
        scripted = build_policy("scripted")
        awaited = await rlm_train.run_episode(task, policy=scripted)
        return awaited, loop_sync("What is the answer?", task["context"], scripted,
                                  hints={"family": "niah", "task_id": "bench-0"})

    awaited, direct = asyncio.run(both())
    assert awaited["score"] == 1.0 and "key0" in direct["final"]


def test_an_interrupt_while_waiting_cancels_the_work_on_the_worker_thread():
    cancelled = threading.Event()

    async def long_work():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def cell():
        import _thread
        import signal

        # ipykernel turns the stop button's SIGINT into a KeyboardInterrupt in the running cell
        # (Python's default handler); asyncio.run's own handler would only cancel this coroutine.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Timer(0.3, _thread.interrupt_main, args=(signal.SIGINT,)).start()
        return eventloop.run(long_work())

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(cell())
    assert cancelled.is_set() and time.monotonic() - started < 30


def test_errors_of_the_work_reach_the_caller_inside_a_loop(tmp_path):
    async def cell():
        return rlm_train.run_episode_sync({"id": "t1", "query": "q", "context_path": "c.txt"}, policy="scripted")

    with pytest.raises(UserError, match="keeps its context in a file"):
        asyncio.run(cell())


def test_run_eval_and_run_generate_take_a_dict_or_a_recipe(tmp_path):
    write_scenario_tasks(tmp_path / "tasks.jsonl", 2)
    report = rlm_train.run_eval({"tasks": str(tmp_path / "tasks.jsonl"), "out": str(tmp_path / "eval"), "progress": False,
                                 "methods": [{"name": "teacher", "policy": "scripted"}]})
    assert report["methods"]["teacher"]["score"]["all"]["mean"] == 1.0
    recipe = tmp_path / "gen.yaml"
    recipe.write_text(f"tasks: {tmp_path / 'tasks.jsonl'}\nout: {tmp_path / 'gen'}\npolicy: scripted\nprogress: false\n")
    assert rlm_train.run_generate(recipe)["records"] == 2
    with pytest.raises(UserError, match="samplez"):
        rlm_train.run_generate({"tasks": "x", "out": "y", "samplez": 2})
    with pytest.raises(UserError, match="expected a GenerateConfig, a dict of its keys or a recipe path, got int"):
        rlm_train.run_generate(3)


def test_the_quickstart_notebook_runs_offline(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    text = "\n".join(str(out.get("text", "")) for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    assert "outcome: final | final: 1656178 | score: 1.0" in text  # the scripted teacher, in Jupyter's loop
    assert "stand-in: I could not find it score 0.0" in text
    assert "{'teacher': 1.0, 'stand-in': 0.0}" in text
    markdown = [out["data"]["text/markdown"] for cell in notebook.cells if cell.cell_type == "code"
                for out in cell.get("outputs", []) if "text/markdown" in out.get("data", {})]
    assert markdown and "| teacher |" in markdown[0] and "| stand-in |" in markdown[0]
