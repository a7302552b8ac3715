"""What the Slurm cluster offers (sinfo, scontrol), checks of a stage's resources against it, and
the sbatch / squeue / sacct / scancel calls `rlm-train launch` makes. Every call goes through
`slurm_command`, so a missing binary or a controller that does not answer is one clear error."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from rlm_train.errors import UserError
from rlm_train.launch.resources import SlurmResources, mem_mb


@dataclass
class Partition:
    name: str
    nodes: int
    cpus_per_node: int
    mem_mb_per_node: int
    gpus_per_node: int
    up: bool = True


@dataclass
class ClusterInfo:
    partitions: dict[str, Partition] = field(default_factory=dict)
    default_partition: str | None = None
    accounts_enforced: bool = False  # AccountingStorageEnforce has associations
    accounts: list[str] | None = None  # the user's accounts, when sacctmgr answers
    default_account: str | None = None
    accounting: bool = False  # sacct has a database to ask


def slurm_command(args: list[str], timeout_s: float = 60) -> str:
    """Run a Slurm client command and return its stdout; a UserError with its message otherwise."""
    if shutil.which(args[0]) is None:
        raise UserError(f"{args[0]} not found on PATH: run `rlm-train launch` on a Slurm login node "
                        "(or add --dry-run to print the scripts without submitting)")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"{' '.join(args[:2])}: no answer in {timeout_s:.0f} s; is slurmctld up? (sinfo)") from None
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise UserError(f"{' '.join(args[:2])}: {message}")
    return proc.stdout


def _gpus(gres: str) -> int:
    """GPUs per node from sinfo's GRES column, e.g. gpu:h100:8(S:0-1),shard:8 -> 8."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"^gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def parse_sinfo(text: str) -> tuple[dict[str, Partition], str | None]:
    """`sinfo -h -o %P|%D|%c|%m|%G|%a` lines -> partitions (a partition listed on several lines,
    one per node configuration, keeps its largest nodes) and the default partition."""
    partitions: dict[str, Partition] = {}
    default = None
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        name, nodes, cpus, mem, gres, avail = parts
        if name.endswith("*"):
            name = name[:-1]
            default = name
        cpus_n = int(re.sub(r"\D.*", "", cpus) or 0)
        mem_n = int(re.sub(r"\D.*", "", mem) or 0)
        part = partitions.setdefault(name, Partition(name, 0, 0, 0, 0, avail.strip() == "up"))
        part.nodes += int(nodes or 0)
        part.cpus_per_node = max(part.cpus_per_node, cpus_n)
        part.mem_mb_per_node = max(part.mem_mb_per_node, mem_n)
        part.gpus_per_node = max(part.gpus_per_node, _gpus(gres))
    return partitions, default


def query_cluster() -> ClusterInfo:
    """Ask the controller what it has (sinfo, scontrol show config, sacctmgr where it answers)."""
    partitions, default = parse_sinfo(slurm_command(["sinfo", "-h", "-o", "%P|%D|%c|%m|%G|%a"]))
    config = slurm_command(["scontrol", "show", "config"])
    enforce = re.search(r"^AccountingStorageEnforce\s*=\s*(.*)$", config, re.M)
    storage = re.search(r"^AccountingStorageType\s*=\s*(.*)$", config, re.M)
    info = ClusterInfo(partitions, default,
                       accounts_enforced=bool(enforce and "associations" in enforce.group(1)),
                       accounting=bool(storage and "none" not in storage.group(1)))
    if info.accounting and shutil.which("sacctmgr"):
        try:
            import getpass

            user = getpass.getuser()
            rows = slurm_command(["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}", "format=account"], 30)
            info.accounts = sorted({row.strip() for row in rows.splitlines() if row.strip()})
            default_row = slurm_command(["sacctmgr", "-n", "-P", "show", "user", user, "format=defaultaccount"], 30)
            info.default_account = default_row.strip() or None
        except UserError:
            info.accounts = None  # sacctmgr unreachable from here: sbatch --test-only still checks
    return info


def check_resources(stage: str, r: SlurmResources, cluster: ClusterInfo) -> list[str]:
    """Everything the cluster cannot give this stage, one line each (empty: fine)."""
    where = f"stage {stage}"
    problems: list[str] = []
    names = ", ".join(sorted(cluster.partitions)) or "none"
    name = r.partition or cluster.default_partition
    if name is None:
        return [f"{where}: no partition given and the cluster has no default one; "
                f"set slurm.partition (partitions: {names})"]
    part = cluster.partitions.get(name)
    if part is None:
        return [f"{where}: slurm.partition {name!r} does not exist on this cluster; partitions: {names}"]
    if not part.up:
        problems.append(f"{where}: partition {name} is not up (sinfo); pick another or wait for it")
    if r.nodes > part.nodes:
        problems.append(f"{where}: slurm.nodes={r.nodes} but partition {name} has {part.nodes} node(s)")
    if r.gpus_per_node and r.gpus_per_node > part.gpus_per_node:
        problems.append(f"{where}: needs {r.gpus_per_node} GPU(s) per node but partition {name} has "
                        f"{part.gpus_per_node} per node; lower slurm.gpus_per_node or pick a GPU partition")
    # What the job asks for per node (its defaults filled in), not only what the recipe wrote:
    # one task per node, so cpus_per_task is the CPUs per node.
    if r.cpus_per_task and part.cpus_per_node and r.cpus_per_task > part.cpus_per_node:
        problems.append(f"{where}: {r.shown('cpus_per_task')} asks {r.cpus_per_task} CPUs per node but partition "
                        f"{name}'s nodes have {part.cpus_per_node}; set slurm.cpus_per_task <= {part.cpus_per_node} "
                        "or exclusive: true")
    need_mb = mem_mb(r.mem)
    if need_mb and part.mem_mb_per_node and need_mb > part.mem_mb_per_node:
        problems.append(f"{where}: {r.shown('mem')} asks {need_mb} MB per node but partition {name}'s nodes have "
                        f"{part.mem_mb_per_node} MB; set slurm.mem <= {part.mem_mb_per_node // 1024}G or exclusive: true")
    if cluster.accounts_enforced and r.account is None and cluster.accounts is not None and not cluster.default_account:
        problems.append(f"{where}: this cluster charges jobs to accounts and you have no default one; "
                        f"set slurm.account (yours: {', '.join(cluster.accounts) or 'none'})")
    if r.account is not None and cluster.accounts is not None and r.account not in cluster.accounts:
        problems.append(f"{where}: slurm.account {r.account!r} is not one of yours "
                        f"({', '.join(cluster.accounts) or 'none'}); fix slurm.account")
    return problems


def dry_submit(script: str) -> None:
    """sbatch --test-only: the controller's own verdict on a script, nothing submitted."""
    proc = subprocess.run(["sbatch", "--test-only", script], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"{script}: sbatch --test-only refused it: {message[-1] if message else proc.returncode}")


def submit(script: str, after: list[str], extra: list[str] | None = None) -> str:
    """Submit one script, held until every job in `after` ends well; returns its job id. `extra`:
    sbatch options that override the script's own (`--array=1,3` for a resumed array job)."""
    args = ["sbatch", "--parsable", *(extra or [])]
    if after:
        # Fail fast: a dependency that can never be met cancels this job instead of leaving it pending.
        args += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    out = slurm_command([*args, script])
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch {script}: unexpected answer {out.strip()!r}")
    return job_id


def cancel(job_ids: list[str]) -> None:
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


@dataclass
class JobState:
    job_id: str  # 123 or 123_4 for an array task
    state: str
    reason: str = ""
    exit_code: str = ""


def job_states(job_ids: list[str]) -> dict[str, list[JobState]]:
    """The states of jobs (and their array tasks) by job id: squeue for live jobs, then sacct
    where accounting runs, else scontrol (the controller remembers ended jobs for MinJobAge)."""
    found: dict[str, list[JobState]] = {}
    if not job_ids:
        return found
    live = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                          capture_output=True, text=True, timeout=60)
    for line in live.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        found.setdefault(re.split(r"[_.]", job)[0], []).append(JobState(job, state, reason if reason != "None" else ""))
    for job_id in job_ids:
        if job_id in found:
            continue
        states = _sacct(job_id) if shutil.which("sacct") else []
        found[job_id] = states or _scontrol(job_id)
    return found


def _sacct(job_id: str) -> list[JobState]:
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return []
    states = []
    for line in proc.stdout.splitlines():
        job, state, code, reason = (line.split("|") + ["", "", ""])[:4]
        states.append(JobState(job, state.split()[0] if state else "", reason if reason != "None" else "", code))
    return states


def _scontrol(job_id: str) -> list[JobState]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    states = []
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        job = fields.get("JobId", job_id)
        if fields.get("ArrayTaskId"):
            job = f"{fields.get('ArrayJobId', job_id)}_{fields['ArrayTaskId']}"
        reason = fields.get("Reason", "")
        states.append(JobState(job, fields.get("JobState", "UNKNOWN"), "" if reason == "None" else reason,
                               fields.get("ExitCode", "")))
    return states
