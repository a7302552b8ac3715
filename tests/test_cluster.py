"""The rehearsal of the cluster run (`make test-cluster`): recipes/qwen3-8b-pipeline.yaml's stage graph
through `rlm-train launch --slurm` on a real two-node Slurm on this machine (scripts/cluster2_up.sh:
slurmctld and two slurmd, each node in its own network namespace with its own address on a private
bridge, nodes declared like 8-GPU cluster nodes), changed only by the launch arguments in SUBSTITUTIONS.

What it checks: every stage's outputs; generation as an array job on both nodes; SFT as a 2-node
`accelerate launch` whose ranks ran on both nodes; GRPO; eval against the served models; that a stage
stopped by its time limit is reported, its dependents with it (`--status`), and that `launch --resume`
finishes the pipeline from there. Skips, with the reason, where namespaces or Slurm cannot be made
(not root, no CAP_NET_ADMIN/CAP_SYS_ADMIN, no apt-get to install Slurm)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster_stand_ins import CPU_RANKS_ACCELERATE, fake_vllm_interpreter, write_tiny_qwen3_8b
from conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.cluster, pytest.mark.timeout(1800)]

RECIPE = "recipes/qwen3-8b-pipeline.yaml"
STATE = Path(os.environ.get("RLM_CLUSTER2_DIR", "/tmp/rlm-cluster2"))
NODES = ("node1", "node2")

# The only changes the rehearsal makes to the pipeline, as `rlm-train launch` arguments: STAGE.KEY=VALUE
# overrides and `--resource STAGE.KEY=VALUE`, each with what the GPU cluster runs instead (the recipe's own
# value is printed beside it). `{serve}` stands for every serve stage of the recipe, `{stand_ins}` for the
# directory of the stand-ins this test writes. One that would set what the recipe already says is left out.
# Not here because nothing changes: the model (the tiny model is put into the Hugging Face cache as
# Qwen/Qwen3-8B: HF_HUB_CACHE), the GPUs a stage asks for (each node declares 8 to Slurm:
# scripts/cluster2_up.sh), the stage graph, dependencies, templates and every other setting.
FAMILIES = ("niah", "oolong", "pairs", "multihop", "codeqa")
TASKS_PER_FAMILY = {"train": 2, "rl": 2, "heldout": 1}
SUBSTITUTIONS: dict[str, str] = {
    # tasks: the suite at a size CPU stand-ins get through in seconds.
    "tasks.context_tokens=[4000]": "the suite's context lengths",
    "tasks.families=" + json.dumps({family: TASKS_PER_FAMILY for family in FAMILIES}): "the suite's task counts",
    # servers: no vLLM here, and no GPU for it.
    "{serve}.vllm.python={stand_ins}/fake-vllm/python": "vLLM serving the model on the node's GPUs; here a mock "
    "OpenAI server answering as the scripted teacher (half its final answers wrong), started, health-checked "
    "and stopped by the same `rlm-train serve` in the same jobs",
    # sft: CPU processes for GPUs, gloo for NCCL.
    "sft.device=cpu": "cuda",
    "sft.dtype=float32": "bf16 (this CPU has no bf16 matmul)",
    "sft.attn_implementation=sdpa": "the recipe's attention kernels (flash-attn needs a GPU)",
    "sft.requires.gpus=0": "the check that the node has the recipe's GPUs",
    "sft.launch.accelerate_config={stand_ins}/accelerate-cpu-ranks.yaml": "the recipe's accelerate config; "
    "here accelerate's same multi-node launcher with CPU ranks (gloo where GPU ranks use NCCL)",
    "sft.training.max_steps=2": "the recipe's epochs over the filtered set",
    "sft.training.batch_size=1": "the recipe's batch on 80 GB GPUs",
    "sft.training.gradient_accumulation_steps=1": "the recipe's accumulation",
    "sft.training.max_length=4096": "the recipe's row length (for 8k-128k-token tasks)",
    "sft.training.logging_steps=1": "the recipe's logging interval (a line per step here)",
    "sft.training.warmup_steps=0": "the recipe's warmup (10 steps, longer than the 2 here: their learning rate "
    "would be 0)",
    # grpo: one CPU process generating in-process, for vLLM server mode beside the training GPUs.
    "grpo.device=cpu": "cuda",
    "grpo.dtype=float32": "bf16",
    "grpo.rollout.backend=transformers": "a vLLM server on the node's vLLM GPUs in TRL's server mode, weights "
    "pushed over NCCL every step (neither vLLM nor NCCL runs here)",
    "grpo.launch.num_processes=1": "one training rank per training GPU (in-process generation allows one)",
    "grpo.requires.gpus=0": "the check that the node has the training GPUs",
    "grpo.requires.vllm=false": "the check that vLLM is installed",
    "grpo.training.max_steps=2": "the recipe's step budget (hours)",
    "grpo.training.num_generations=2": "the recipe's episodes per prompt",
    "grpo.training.batch_size=2": "the recipe's per-GPU batch",
    "grpo.training.gradient_accumulation_steps=1": "the recipe's accumulation",
    "grpo.rlm.max_iterations=2": "the recipe's turns (a random tiny model writes no useful code: short episodes)",
    "grpo.rlm.root_max_tokens=48": "the recipe's tokens per turn",
    # eval: one episode per held-out task and method.
    "eval.samples=1": "the recipe's samples per task",
    # Slurm: an array task per node, SFT on two nodes, GRPO on one "GPU", a time limit run into on purpose.
    "--resource generate.shards=2": "as many array tasks as the cluster has teacher nodes",
    "--resource generate.time=00:01:00": "the recipe's hours; one minute here, so the first attempt (its server "
    "made to hang) is stopped by its time limit and `rlm-train launch --resume` has to finish it",
    "--resource sft.nodes=2": "the recipe's nodes; two here, so SFT runs as the multi-node job (`srun` + one "
    "`accelerate launch` per node, rendezvous from SLURM_*) with one rank per node",
    "--resource grpo.gpus_per_node=1": "the recipe's GPUs (vLLM's and the training ranks')",
}


@dataclass
class Substitution:
    stage: str
    key: str  # in the stage's config, or in its slurm section for a resource
    value: str  # as written on the command line (YAML)
    resource: bool
    was: Any  # the recipe's value
    instead: str

    def arguments(self) -> list[str]:
        item = f"{self.stage}.{self.key}={self.value}"
        return ["--resource", item] if self.resource else [item]

    def line(self) -> str:
        was = self.was if isinstance(self.was, str) else json.dumps(self.was)
        return (f"  {'--resource ' if self.resource else ''}{self.stage}.{self.key}: {was} -> {self.value}"
                f"    # GPU cluster: {self.instead}")


def substitutions(stand_ins: Path) -> list[Substitution]:
    """SUBSTITUTIONS against the recipe as it is: `{serve}` made one per serve stage, `{stand_ins}`
    filled in, and those that would set what the recipe already says left out."""
    import yaml

    from rlm_train.config import get_dotted
    from rlm_train.pipeline.recipe import load_pipeline

    pipeline = load_pipeline(REPO / RECIPE, [])
    serve = [stage.name for stage in pipeline.stages if stage.run == "serve"]
    out = []
    for item, instead in SUBSTITUTIONS.items():
        resource = item.startswith("--resource ")
        target, _, value = item.removeprefix("--resource ").replace("{stand_ins}", str(stand_ins)).partition("=")
        head, _, key = target.partition(".")
        for name in serve if head == "{serve}" else [head]:
            stage = pipeline.stage(name)
            was = get_dotted(stage.slurm if resource else stage.raw, key, "(unset)")
            if was != yaml.safe_load(value):
                out.append(Substitution(name, key, value, resource, was, instead))
    return out


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rlm(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "rlm_train.cli", *args], cwd, env, timeout)


def alive(pid: int) -> bool:
    """A process that has not ended (a zombie waiting for this machine's PID 1 counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cluster_pids() -> list[int]:
    """The daemons of the two-node cluster and every process inside its node namespaces."""
    pids = [int(p.read_text()) for p in STATE.glob("*.pid") if p.read_text().strip().isdigit()]
    for node in NODES:
        out = subprocess.run(["ip", "netns", "pids", f"rlmc2-{node}"], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


@pytest.fixture(scope="module")
def cluster():
    """A running two-node Slurm; environment for its clients. Torn down after, with nothing left behind."""
    started = time.monotonic()
    # Leftovers of a run that was killed before its teardown would make the start refuse.
    subprocess.run(["bash", str(REPO / "scripts" / "cluster2_down.sh")], capture_output=True, timeout=120)
    up = subprocess.run(["bash", str(REPO / "scripts" / "cluster2_up.sh")], capture_output=True, text=True, timeout=600)
    if up.returncode == 3:
        pytest.skip(f"no two-node Slurm here: {(up.stderr.strip().splitlines() or ['exit 3'])[-1]}")
    assert up.returncode == 0, up.stdout + up.stderr
    print(up.stdout.strip(), f"({time.monotonic() - started:.1f} s)")
    env = {**os.environ, "SLURM_CONF": str(STATE / "etc" / "slurm.conf")}
    try:
        yield env
    finally:
        pids = cluster_pids()
        started = time.monotonic()
        down = subprocess.run(["bash", str(REPO / "scripts" / "cluster2_down.sh")], capture_output=True, text=True,
                              timeout=120)
        print(down.stdout.strip(), f"({time.monotonic() - started:.1f} s)")
        assert down.returncode == 0, down.stderr
        assert [pid for pid in pids if alive(pid)] == []
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        assert "rlmc2" not in links, links
        assert not any(Path("/run/netns").glob("rlmc2-*"))


PROBE = r'''
import os, socket, sys
import torch
import torch.distributed as dist

if sys.argv[1] == "gloo":  # one srun task per node, rendezvous by hand
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:29511", rank=rank, world_size=world)
else:  # under accelerate launch
    from accelerate import PartialState

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
print(f"{sys.argv[1]}: rank {rank} of {world} on {socket.gethostname()}: all_reduce sum {total.item():g}", flush=True)
dist.destroy_process_group()
'''

# slurm/sft.sbatch's multi-node launch, with a probe for the trainer.
TWO_NODE_JOB = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=1 --mem=1G --time=5
#SBATCH --output={out}
set -euo pipefail
export PY={python} PROBE={probe} ACCELERATE_CONFIG={accelerate} NODES=2
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29512 NUM_PROCESSES=2
srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec "$PY" "$PROBE" gloo'
srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec "$PY" -m accelerate.commands.launch \\
  --config_file "$ACCELERATE_CONFIG" --num_machines "$NODES" --num_processes "$NUM_PROCESSES" \\
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$PROBE" accelerate'
"""


def wait_for_job(job_id: str, env: dict[str, str], timeout_s: float) -> str:
    """A job's final state, polled (sbatch --wait polls at growing intervals, seconds behind)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown = run(["scontrol", "show", "job", "-o", job_id], Path.cwd(), env).stdout
        state = re.search(r"JobState=(\w+)", shown)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state.group(1)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still not done after {timeout_s:.0f} s")


def test_two_nodes_reduce_over_gloo_with_srun_and_accelerate(cluster, tmp_path):
    """The network the rehearsal stands on: ranks on both nodes find each other by host name (each node
    resolves its own name to its own address), with srun alone and with accelerate's launcher."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "accelerate.yaml").write_text(CPU_RANKS_ACCELERATE)
    out = tmp_path / "job.out"
    (tmp_path / "job.sbatch").write_text(TWO_NODE_JOB.format(
        out=out, python=sys.executable, probe=tmp_path / "probe.py", accelerate=tmp_path / "accelerate.yaml"))
    started = time.monotonic()
    submitted = run(["sbatch", "--parsable", str(tmp_path / "job.sbatch")], tmp_path, cluster)
    assert submitted.returncode == 0, submitted.stderr
    job_state = wait_for_job(submitted.stdout.strip().split(";")[0], cluster, timeout_s=300)
    log = out.read_text() if out.exists() else ""
    print("\n".join(line for line in log.splitlines() if ": rank " in line), f"({time.monotonic() - started:.1f} s)")
    assert job_state == "COMPLETED", job_state + "\n" + log[-3000:]
    for kind in ("gloo", "accelerate"):
        ranks = sorted(re.findall(rf"^{kind}: rank (\d) of 2 on (\w+): all_reduce sum 3$", log, re.M))
        assert ranks == [("0", "node1"), ("1", "node2")], log[-3000:]


def status_rows(text: str) -> dict[str, tuple[str, str]]:
    """`launch --status` stage rows: name -> (state, detail)."""
    return {m[0]: (m[1], m[2].strip()) for m in re.findall(r"^  (\S+)\s+job \S+\s+([A-Z_]+)\s*(.*)$", text, re.M)}


def downstream(launch: dict[str, Any], stage: str) -> list[str]:
    """The stages of a launch (launch.json) that wait on `stage`, directly or through others."""
    found: list[str] = []
    for row in launch["stages"]:
        if any(name == stage or name in found for name in row["after"]):
            found.append(row["name"])
    return found


def logs(state: Path, pattern: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((state / "logs").glob(pattern)))


def test_qwen3_8b_pipeline_rehearsal(cluster, tmp_path):
    from rlm_train.pipeline.recipe import load_pipeline
    from rlm_train.rollouts.shards import check_run

    clock = started = time.monotonic()
    phases: list[str] = []

    def phase(name: str) -> None:
        nonlocal clock
        phases.append(f"{name} {time.monotonic() - clock:.0f} s")
        clock = time.monotonic()

    # A working directory laid out like a clone (the recipe names recipes/... relative to it), the
    # stand-ins beside it, and the environment the jobs inherit (sbatch exports the submitter's).
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(REPO / "recipes")
    stand_ins = tmp_path / "stand-ins"
    write_tiny_qwen3_8b(stand_ins / "tiny-qwen3", stand_ins / "hf-hub")
    fake_vllm_interpreter(stand_ins / "fake-vllm")
    (stand_ins / "accelerate-cpu-ranks.yaml").write_text(CPU_RANKS_ACCELERATE)
    gate = stand_ins / "teacher-hangs"
    gate.touch()
    pipeline = load_pipeline(REPO / RECIPE, [])
    out = work / pipeline.out_dir

    def output(stage: str, key: str) -> Path:
        """Where the recipe has a stage write (its config's `key`), in the working directory."""
        return work / pipeline.stage(stage).raw[key]

    env = {**cluster, "HF_HUB_CACHE": str(stand_ins / "hf-hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RLM_REHEARSAL_TASKS": str(output("tasks", "out_dir") / "*.jsonl"), "RLM_REHEARSAL_GATE": str(gate)}
    subs = substitutions(stand_ins)
    print(f"rehearsal of {RECIPE}: its substitutions (recipe's value -> the rehearsal's); the rest is the recipe's")
    print("\n".join(sub.line() for sub in subs))
    # Overrides first, then --resource flags: argparse takes the KEY=VALUE positionals as one run.
    arguments = [a for sub in subs if not sub.resource for a in sub.arguments()]
    arguments += [a for sub in subs if sub.resource for a in sub.arguments()]
    phase("setup")

    # 1. The launch: every stage checked against the cluster, then submitted with its dependencies.
    launched = rlm(["launch", "--recipe", RECIPE, "--slurm", *arguments], work, env)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    print(launched.stdout)
    stages = re.findall(r"^([\w-]+): job (\d+)", launched.stdout, re.M)
    assert [name for name, _ in stages] == [s.name for s in pipeline.stages if s.run != "serve"]

    # 2. Generation's teacher hangs after a few episodes: the time limit stops both array tasks with what
    # they recorded saved, and --status names the stage and every stage it takes down with it. (Slurm calls
    # it TIMEOUT, or FAILED with 143 when the stage ends on the early SIGTERM before the limit itself.)
    first = rlm(["launch", "--status", str(out), "--wait"], work, env, timeout=600)
    print(first.stdout)
    phase("first attempt (until generation's time limit)")
    rows = status_rows(first.stdout)
    state = out / "pipeline" / "slurm"
    assert first.returncode == 1 and rows["tasks"][0] == "COMPLETED", first.stdout
    assert rows["generate"][0] == "TIMEOUT" or (rows["generate"][0] == "FAILED" and "143" in rows["generate"][1])
    for name in downstream(json.loads((state / "launch.json").read_text()), "generate"):
        assert rows[name][0] == "CANCELLED" and "never runs: generate " in rows[name][1], first.stdout
    first_logs = logs(state, "generate-[0-9]*.out")
    print("generation, first attempt:\n" + "\n".join(
        line for line in first_logs.splitlines() if line.startswith(("stage generate", "rlm-train generate: stopped"))))
    assert sorted(set(re.findall(r"^stage generate of qwen3-8b: job \d+_\d on (\w+)", first_logs, re.M))) == list(NODES)
    saved = check_run([output("generate", "out")]).records
    assert saved > 0 and not check_run([output("generate", "out")]).complete, first_logs[-3000:]

    # 3. --resume: the array tasks again (they skip what was recorded), then everything after them.
    gate.unlink()
    resumed = rlm(["launch", "--resume", str(out)], work, env)
    print(resumed.stdout)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r"^generate: job \d+ \[tasks 0,1\]", resumed.stdout, re.M), resumed.stdout
    done = rlm(["launch", "--status", str(out), "--wait"], work, env, timeout=900)
    print(done.stdout)
    phase("resumed run")
    rows = status_rows(done.stdout)
    assert done.returncode == 0 and {st for st, _ in rows.values()} == {"COMPLETED"}, done.stdout + done.stderr
    resumed_logs = logs(state, "generate-[0-9]*.out").replace(first_logs, "")
    ran = [int(n) for n in re.findall(r"\(this run: (\d+) episodes", resumed_logs)]
    assert len(ran) == 2 and sum(ran) + saved == check_run([output("generate", "out")]).expected, resumed_logs[-3000:]
    assert check_run([output("generate", "out")]).complete

    # 4. Every stage's outputs.
    manifest = json.loads((output("tasks", "out_dir") / "manifest.json").read_text())
    print("tasks:", json.dumps(manifest.get("counts", manifest))[:300])
    for split, n in TASKS_PER_FAMILY.items():
        assert len((output("tasks", "out_dir") / f"{split}.jsonl").read_text().splitlines()) == n * len(FAMILIES)
    assert len((output("filter", "out") / "sft-train.jsonl").read_text().splitlines()) > 0

    # SFT: one `accelerate launch` per node, ranks 0 and 1 of one process group, on the two nodes.
    sft_log = logs(state, "sft-*.out")
    two_nodes = [line for line in sft_log.splitlines()
                 if re.match(r"(stage sft |sft: machine rank |\[sft\] (step|adapter_dir|merged_dir))", line)]
    print("SFT, two nodes:\n" + "\n".join(two_nodes))
    assert sorted(re.findall(r"^sft: machine rank (\d) of 2 on (\w+)$", sft_log, re.M)) == [("0", "node1"),
                                                                                          ("1", "node2")]
    summary = json.loads((output("sft", "output_dir") / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["exit_code"] == 0
    adapter = output("sft", "output_dir") / "adapter" / "adapter_model.safetensors"
    assert (output("sft", "output_dir") / "merged" / "config.json").is_file()
    # The two ranks trained: LoRA's B matrices start at zero, and moved.
    from safetensors.torch import load_file

    moved = [name for name, tensor in load_file(adapter).items() if "lora_B" in name and tensor.abs().max() > 0]
    assert moved, f"{adapter}: every lora_B is still zero"

    # The SFT model's pass rates (its server, the RL prompt set), GRPO from the merged model, eval.
    assert check_run([output("generate-rl", "out")]).complete
    assert len((output("filter-rl", "out") / "rl-train.jsonl").read_text().splitlines()) > 0
    grpo_log = logs(state, "grpo-*.out")
    print("GRPO:\n" + "\n".join(line for line in grpo_log.splitlines() if line.startswith(("stage grpo", "[grpo]"))))
    assert (output("grpo", "output_dir") / "adapter" / "adapter_model.safetensors").is_file(), grpo_log[-3000:]
    steps = [json.loads(line) for line in (output("grpo", "output_dir") / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in steps) == 2
    methods = json.loads((output("eval", "out") / "report.json").read_text())["methods"]
    print("eval:", {name: (m["episodes"], m["outcomes"], m["score"]["all"]["mean"]) for name, m in methods.items()})
    recipe_methods = [m["name"] for m in pipeline.stage("eval").raw["methods"]]
    assert sorted(methods) == sorted(recipe_methods)
    heldout = TASKS_PER_FAMILY["heldout"] * len(FAMILIES)
    assert all(m["episodes"] == m["expected_episodes"] == heldout for m in methods.values()), methods

    # Every serve stage ran inside the jobs that needed it, as the stand-in, and answered.
    for stage in (s.name for s in pipeline.stages if s.run == "serve"):
        log = (work / pipeline.stage(stage).raw["vllm"]["log_file"]).read_text()
        assert "stand-in vLLM" in log and "Application startup complete" in log, (stage, log[-2000:])
    print("\n".join(phases), f"\nrehearsal: {time.monotonic() - started:.0f} s in all")
