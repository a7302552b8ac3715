"""The stand-ins tests/test_cluster.py's rehearsal uses where a GPU cluster has real pieces:

- `write_tiny_qwen3_8b`: a tiny random Qwen3-shaped model (rlm_train/testing/tiny_models.py) whose
  config claims Qwen3-8B's 40,960 positions, put into a Hugging Face hub cache as `Qwen/Qwen3-8B`;
- `fake_vllm_interpreter`: an interpreter under which `python -m vllm.entrypoints.openai.api_server`
  serves the mock OpenAI server (rlm_train/testing/mock_server.py) on the host and port it is given,
  answering as `teacher_responder` does (rlm_train/testing/fake_vllm.py writes the package);
- `teacher_responder`: the scripted teacher (rlm_train/policies/scripted) behind HTTP: root turns are
  the programs it writes for the task whose query the conversation carries (found in the task files
  named by $RLM_REHEARSAL_TASKS), sub-calls its extractive reader; half its final answers are replaced
  by a wrong one, so the RL stage finds tasks a model solves sometimes, never always;
- a stuck server on demand: while the file $RLM_REHEARSAL_GATE exists, a server that has sent
  `GATE_AFTER_FINALS` final answers stops answering chat requests (its /health still answers), as a hung
  engine would: the stage that talks to it runs into its time limit;
- `CPU_RANKS_ACCELERATE`: the accelerate config of a multi-node run whose ranks are CPU processes.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent

# accelerate's GPU launcher (torchrun: one launcher per node, ranks from --machine_rank) with the ranks
# on CPUs: the trainer then joins a gloo process group where the cluster's ranks join NCCL.
# (distributed_type MULTI_CPU would start one process per launcher with no rank: it expects mpirun.)
CPU_RANKS_ACCELERATE = """\
# accelerate launch on CPU processes, one per "GPU" (tests/test_cluster.py's rehearsal)
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: 'no'
num_machines: 1
num_processes: 1
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: false
use_cpu: true
"""

FAKE_VLLM_SERVER = f'''
import argparse, os, sys, time

sys.path.insert(0, {str(TESTS)!r})
ap = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--chat-template"):
    ap.add_argument(flag)
ap.add_argument("--port", type=int)
args, rest = ap.parse_known_args()
print(f"INFO stand-in vLLM (mock server, scripted teacher) pid {{os.getpid()}} on {{args.host}}:{{args.port}}, "
      f"model {{args.model}} as {{args.served_model_name}}; ignored flags: {{' '.join(rest)}}", flush=True)
from cluster_stand_ins import teacher_responder
from rlm_train.testing.mock_server import MockOpenAIServer

import cluster_stand_ins
from rlm_train.testing.mock_server import FailPlan

server = MockOpenAIServer(responder=teacher_responder, host=args.host, port=args.port, model=args.served_model_name)
server.start()
print("INFO Application startup complete.", flush=True)
gate = os.environ.get("RLM_REHEARSAL_GATE", "")
while True:
    if (gate and server.fail_plan.p == 0 and os.path.exists(gate)
            and cluster_stand_ins.finals_sent >= cluster_stand_ins.GATE_AFTER_FINALS):
        server.fail_plan = FailPlan(p=1.0, mode="hang")
        print(f"INFO stuck on purpose ({{gate}} exists): chat requests hang from now on", flush=True)
    time.sleep(0.02)
'''


def write_tiny_qwen3_8b(model_dir: Path, hub_cache: Path, repo_id: str = "Qwen/Qwen3-8B") -> Path:
    """The tiny model in `model_dir`, and as `repo_id`'s snapshot in `hub_cache`; returns the snapshot."""
    from rlm_train.testing.hub_cache import write_hub_snapshot
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    build_tiny_qwen3(model_dir)
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = 40960  # Qwen3-8B's: the recipe's server windows fit it
    config_file.write_text(json.dumps(config, indent=2))
    return write_hub_snapshot(hub_cache, repo_id, model_dir)


def fake_vllm_interpreter(root: Path) -> Path:
    from rlm_train.testing.fake_vllm import fake_vllm_python

    return fake_vllm_python(root, FAKE_VLLM_SERVER)


GATE_AFTER_FINALS = 4
finals_sent = 0  # final answers this server sent (the stuck-server gate counts them)
_coin = random.Random()

_QUERY_RE = re.compile(r"^Query: (.*?)\n\nThe context is ", re.S)
_tasks: dict[str, dict[str, Any]] | None = None


def _task_for(query: str) -> dict[str, Any] | None:
    """The task whose query this is, from the task files the rehearsal names."""
    global _tasks
    if _tasks is None:
        _tasks = {}
        for pattern in os.environ.get("RLM_REHEARSAL_TASKS", "").split(os.pathsep):
            for path in glob.glob(pattern) if pattern else []:
                for line in Path(path).read_text().splitlines():
                    task = json.loads(line)
                    _tasks.setdefault(task["query"], task)
    return _tasks.get(query)


def teacher_responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The scripted teacher's turn for this conversation (a mock server responder)."""
    from rlm_train.models.base import CallContext, Role
    from rlm_train.policies.scripted import ScriptedTeacher, extractive_answer
    from rlm_train.rlm.prompts import ANSWER_NOW_PROMPT

    if not any(m.get("role") == "system" for m in messages):
        return extractive_answer(str(messages[-1].get("content") or ""))
    users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
    match = _QUERY_RE.match(users[0]) if users else None
    query = match.group(1) if match else (users[0] if users else "")
    task = _task_for(query) or {}
    call = CallContext(role=Role.ROOT, depth=0, query=query, last_turn=ANSWER_NOW_PROMPT in users[-1],
                       hints={"family": task.get("family"), "task_id": task.get("id", "unknown")})
    reply = ScriptedTeacher()._answer(messages, call)
    if "FINAL" in reply:
        global finals_sent
        finals_sent += 1
        if _coin.random() < 0.5:
            return "Not sure; submitting a guess.\n```repl\nFINAL('no idea')\n```"
    return reply
