"""`rlm-train launch`: a pipeline (or one stage recipe) as dependent Slurm jobs.

    rlm-train launch --recipe recipes/pipeline.yaml --slurm --dry-run   # print the sbatch scripts
    rlm-train launch --recipe recipes/pipeline.yaml --slurm             # check, then submit in order
    rlm-train launch --recipe recipes/qwen3-8b-sft-lora.yaml --slurm --resource partition=gpu
    rlm-train launch --status runs/pipeline                             # jobs, exit codes, outputs
    rlm-train launch --resume runs/pipeline                             # resubmit what did not complete

Before anything is submitted: every stage's own dry run (its config), what its job would lack
that this machine can see (launch/environment.py: packages in this venv, models in the Hugging
Face cache, inputs no stage makes; `--dry-run` lists them and exits 1), its resources against
the cluster (partition, nodes, GPUs, CPUs, memory, account) and `sbatch --test-only`. Then each
stage is submitted with `--dependency=afterok:` on the stages it comes after (a failed stage
cancels what waits for it); a failed submission cancels the jobs already submitted. `--resume`
(launch/resume.py) submits a launch again from the stages that failed, timed out or were cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rlm_train.errors import UserError

LAUNCH_SCHEMA = "rlm-train/launch/v1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="FILE", help="a pipeline recipe (stages:) or one stage's recipe")
    parser.add_argument("--slurm", action="store_true", help="launch on Slurm (the one launcher so far)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit and write nothing")
    parser.add_argument("--status", metavar="RUN", help="show the jobs of a launch: the pipeline's out_dir "
                                                        "(or a stage launch's --out, or the recipe)")
    parser.add_argument("--wait", action="store_true", help="with --status: poll until no job is pending or running")
    parser.add_argument("--resume", metavar="RUN", help="submit a launch (as --status names it) again from the stages that "
                                                        "failed, timed out or were cancelled; completed stages are not rerun")
    parser.add_argument("--stage-command", help="the command a single stage recipe runs (default: its first line)")
    parser.add_argument("--out", help="single stage recipes: where the launch state goes (default runs/launch/NAME)")
    parser.add_argument("--stages", help="only these stages (comma-separated); their `after` outside the list is dropped")
    parser.add_argument("--resource", action="append", default=[], metavar="[STAGE.]KEY=VALUE",
                        help="a Slurm resource for every stage (or STAGE's): nodes, gpus_per_node, time, shards, ...")
    parser.add_argument("--partition", help="partition for stages whose recipe names none")
    parser.add_argument("--account", help="account for stages whose recipe names none")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides: STAGE.KEY=VALUE for a pipeline, KEY=VALUE for a stage recipe")


def main(args: argparse.Namespace) -> int:
    if args.resume:
        if args.status or args.recipe:
            raise UserError("--resume RUN resubmits an existing launch; drop --status / --recipe")
        from rlm_train.launch.resume import resume

        return resume(args.resume, dry_run=args.dry_run)
    if args.status:
        from rlm_train.launch.status import show_status

        return show_status(args.status, wait=args.wait)
    if not args.recipe:
        raise UserError("pass --recipe FILE (and --slurm), --status RUN or --resume RUN")
    if not args.slurm:
        raise UserError("pass --slurm: Slurm is the one launcher (to run the stages on this machine: rlm-train pipeline)")
    return launch(args)


def launch(args: argparse.Namespace) -> int:
    from rlm_train.launch.environment import launch_lacks
    from rlm_train.launch.jobs import apply_resource_flags, build_scripts, load_launch_pipeline, select_stages
    from rlm_train.launch.render import render
    from rlm_train.launch.resources import step_budget_warning
    from rlm_train.pipeline.chain import fit_server_windows
    from rlm_train.pipeline.plans import plan_here
    from rlm_train.stage import Plan

    pipeline = load_launch_pipeline(args.recipe, args.overrides, args.stage_command, args.out)
    apply_resource_flags(pipeline, args.resource, args.partition, args.account)
    # Again after the flags (load_pipeline sized a pipeline's servers before them; a single stage
    # recipe's slurm.server was not sized yet): sizing a sized window changes nothing.
    fit_server_windows(pipeline)
    stages = select_stages(pipeline, args.stages)
    scripts = build_scripts(pipeline, stages)
    for job in scripts:
        budget = step_budget_warning(job.config, job.resources, f"stage {job.name}")
        if budget:
            print(f"rlm-train launch: warning: {budget}", file=sys.stderr)
    state = (pipeline.state_dir / "slurm").absolute()
    plans: dict[str, Plan] = {}
    by_name = {stage.name: stage for stage in stages}
    for job in scripts:
        stage = by_name[job.name]
        try:
            plans[stage.name] = plan_here(stage)
        except UserError as exc:
            message = f"stage {stage.name} ({stage.run}): its plan fails: {exc}"
            if not job.after:
                raise UserError(message) from None
            # Its inputs come from the stages before it, which have not run yet: what is on
            # disk now (nothing, or an older run's files) says little about how it will go.
            print(f"rlm-train launch: warning: {message} (launching anyway: its inputs come from "
                  f"{', '.join(job.after)})", file=sys.stderr)
        job.text = render(job, pipeline.name, state, Path.cwd().absolute())
    lacks = launch_lacks(pipeline, scripts, plans)
    if args.dry_run:
        return print_dry_run(pipeline, scripts, [lack.line() for lack in lacks])

    from rlm_train.launch import cluster

    info = cluster.query_cluster()  # sbatch absent or no controller: one clear error here
    problems = [lack.line() for lack in lacks]
    problems += [p for job in scripts for p in cluster.check_resources(job.name, job.resources, info)]
    if problems:
        for problem in problems:
            print(f"rlm-train launch: {problem}", file=sys.stderr)
        raise UserError(f"{pipeline.path}: {len(problems)} problem(s) above; nothing submitted")
    refuse_if_active(state)
    with tempfile.TemporaryDirectory(prefix="rlm-launch-check-") as tmp:
        for job in scripts:
            probe = Path(tmp) / job.script.name
            probe.write_text(job.text)
            cluster.dry_submit(str(probe))

    # Everything checked: write the state, then submit in order.
    pipeline.write_stage_recipes()
    for sub in ("logs", "exit"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    for job in scripts:
        for server in job.servers:
            if server.text is not None:
                server.recipe.write_text(server.text)
        job.script.write_text(job.text)
    ids: dict[str, str] = {}
    try:
        for job in scripts:
            ids[job.name] = cluster.submit(str(job.script.absolute()), [ids[name] for name in job.after])
    except UserError as exc:
        cluster.cancel(list(ids.values()))
        raise UserError(f"{exc}; cancelled the jobs already submitted ({', '.join(ids.values()) or 'none'})") from None
    record = {
        "schema": LAUNCH_SCHEMA, "pipeline": pipeline.name, "recipe": str(pipeline.path),
        "out_dir": str(pipeline.out_dir), "workdir": str(Path.cwd().absolute()),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": [{"name": job.name, "run": job.run, "job_id": ids[job.name], "shards": job.resources.shards,
                    "attempts": [{"job_id": ids[job.name], "tasks": None}],
                    "after": job.after, "script": str(job.script.absolute()), "log": job.log_pattern,
                    "outputs": (plans[job.name].shown_outputs() if job.name in plans else {})}
                   for job in scripts],
    }
    from rlm_train.formats import write_text_atomic

    write_text_atomic(state / "launch.json", json.dumps(record, indent=2) + "\n")
    for job in scripts:
        after = f"  after {', '.join(f'{n} ({ids[n]})' for n in job.after)}" if job.after else ""
        array = f" [{job.resources.shards} shards]" if job.resources.shards > 1 else ""
        print(f"{job.name}: job {ids[job.name]}{array}{after}")
    print(f"submitted {len(scripts)} job(s); follow them with: rlm-train launch --status {pipeline.out_dir}")
    return 0


def print_dry_run(pipeline, scripts, problems: list[str]) -> int:
    """The scripts on stdout; on stderr what a real launch would refuse on. Exit 1 when there is any."""
    for job in scripts:
        after = "--dependency=afterok:" + ":".join(f"<{name}>" for name in job.after) if job.after else ""
        print(f"# ==== stage {job.name}: sbatch {after + ' ' if after else ''}{job.script}")
        print(job.text.rstrip("\n"))
        for server in job.servers:
            if server.text is not None:
                print(f"# ==== {server.recipe} (the server this stage starts)")
                print(server.text.rstrip("\n"))
    for problem in problems:
        print(f"rlm-train launch: {problem}", file=sys.stderr)
    refusal = (f"; {len(problems)} problem(s) above, which a real launch refuses to submit on (the jobs run this "
               "environment and read these files)" if problems else "")
    print(f"dry run: {len(scripts)} script(s) rendered, nothing submitted or written "
          f"(state would go to {pipeline.state_dir / 'slurm'}){refusal}", file=sys.stderr)
    return 1 if problems else 0


def refuse_if_active(state: Path) -> None:
    """A second launch of the same pipeline while its jobs still run would write the same outputs."""
    path = state / "launch.json"
    if not path.is_file():
        return
    from rlm_train.launch.cluster import job_states
    from rlm_train.launch.status import ACTIVE

    previous = json.loads(path.read_text())
    ids = [stage["job_id"] for stage in previous.get("stages", [])]
    active = sorted({s.job_id for states in job_states(ids).values() for s in states if s.state in ACTIVE})
    if active:
        raise UserError(f"{path}: jobs of the last launch are still queued or running ({', '.join(active)}); "
                        f"wait for them (rlm-train launch --status {previous.get('out_dir')}) or scancel them")
