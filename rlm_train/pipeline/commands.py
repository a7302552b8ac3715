"""`rlm-train pipeline`: every stage of a pipeline recipe, in order, skipping what is done.

    rlm-train pipeline --recipe recipes/tiny-cpu-pipeline.yaml            # run (or resume) it all
    rlm-train pipeline --recipe recipes/qwen3-8b-pipeline.yaml --dry-run  # each stage's command and plan
    rlm-train pipeline --recipe R --from sft                              # rerun sft and what follows
    rlm-train pipeline --recipe R --only eval filter.min_turns=3          # one stage; a stage's key changed

A stage is skipped when it finished with the same config (its own and every stage upstream), the
same rlm-train code it depends on (task generators, teacher, loop, filter, trainer) and its outputs
exist; a changed config or code reruns it and everything after it, its old outputs moved aside to
OUT_DIR/pipeline/stale/. Ctrl-C stops the running stage cleanly; the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys

from rlm_train.errors import UserError

NOTES_SHOWN = 12  # a stage's plan notes shown per stage in the pipeline's dry run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", "--config", dest="recipe", required=True, metavar="FILE",
                        help="pipeline recipe (see recipes/*-pipeline.yaml; its first line is the command that runs it)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each stage's command, what it would do (run, skip, resume) and its own plan "
                             "(inputs with the stage that makes each, outputs, notes); run and write nothing")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE",
                        help="run STAGE and every stage after it, even when finished (earlier stages are not run)")
    parser.add_argument("--only", dest="only_stage", metavar="STAGE",
                        help="run only STAGE (and the background servers it needs), even when finished")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                        help="a stage's config key, applied last, e.g. sft.training.max_steps=10")


def main(args: argparse.Namespace) -> int:
    from rlm_train.pipeline.recipe import load_pipeline

    pipeline = load_pipeline(args.recipe, args.overrides)
    for name in (args.from_stage, args.only_stage):
        if name is not None:
            pipeline.stage(name)  # a UserError naming the stages when there is none
    if args.from_stage and args.only_stage:
        raise UserError("--from and --only: pass one of them")
    if args.dry_run:
        return dry_run(pipeline, args.from_stage, args.only_stage)
    from rlm_train.pipeline.runner import Runner

    return Runner(pipeline, from_stage=args.from_stage, only_stage=args.only_stage).run()


def _fate_text(fate: str, state: dict | None, fingerprint: str) -> str:
    if fate == "skip":
        return "skip: finished before with this config and code, outputs present"
    if fate == "not selected":
        return "not run (--from/--only)"
    if fate == "idle":
        return "not started: no stage that needs it runs"
    if fate == "serve":
        return "started in the background for the stages that need it"
    if state is None:
        return "run"
    if state.get("fingerprint") != fingerprint:
        return "run: config or code changed since its last run (its old outputs move to OUT_DIR/pipeline/stale/)"
    if state.get("status") != "done":
        return f"run: resume (its last run: {state.get('status')})"
    return "run: an upstream stage runs, or its outputs are missing"


def dry_run(pipeline, from_stage: str | None, only_stage: str | None) -> int:
    from rlm_train.pipeline import state as st
    from rlm_train.pipeline.chain import check_chain
    from rlm_train.pipeline.plans import stage_plan
    from rlm_train.pipeline.runner import decide, shell_command
    from rlm_train.pipeline.servers import health_url

    fingerprints = pipeline.fingerprints()
    states = {s.name: st.read_state(pipeline, s) if st.state_file(pipeline, s).is_file() else None
              for s in pipeline.stages}
    fate = decide(pipeline, states, fingerprints, from_stage, only_stage)
    plans = {s.name: stage_plan(s) for s in pipeline.stages}
    links = check_chain(pipeline, plans)
    n = len(pipeline.stages)
    print(f"rlm-train pipeline plan: {pipeline.name} ({pipeline.path}), {n} stages; state in {pipeline.state_dir}")
    for req in pipeline.requires:
        why = req.missing()
        print(f"requires {req.target}: {f'MISSING here: {why}' if why else 'present'}")
    for index, stage in enumerate(pipeline.stages):
        print(f"\n[{index + 1}/{n}] {stage.name} ({stage.run}{', background' if stage.background else ''}; "
              f"after: {', '.join(stage.after) or '-'}): {_fate_text(fate[stage.name], states[stage.name], fingerprints[stage.name])}")
        print(f"  command: {shell_command(stage)}")
        if stage.background:
            users = [s.name for s in pipeline.stages if stage.name in s.after]
            print(f"  serves: {', '.join(users) or 'no stage (list it in a stage`s after)'}; health: {health_url(stage)}")
        if stage.slurm:
            print("  slurm: " + ", ".join(f"{k}={v}" for k, v in stage.slurm.items()))
        plan = plans[stage.name]
        mine = [link for link in links if link.stage == stage.name]
        if mine:
            print("  reads:")
            for link in mine:
                print(f"    {link.describe()}")
        if plan.outputs:
            print("  writes:")
            for name, path in plan.outputs.items():
                print(f"    {name}: {path}")
        upstream_made = [link.path for link in mine if link.source.startswith("stage ")]
        notes = [note for note in plan.notes
                 if not (("not found" in note or "does not exist" in note) and any(path in note for path in upstream_made))]
        if notes:
            print("  notes:")
            for note in notes[:NOTES_SHOWN]:
                print(f"    {note}")
            if len(notes) > NOTES_SHOWN:
                print(f"    ... {len(notes) - NOTES_SHOWN} more: {shell_command(stage)} --dry-run")
        if plan.error:
            print(f"  plan: not available here: {plan.error}")
    broken = [link for link in links if link.broken]
    print()
    if broken:
        print(f"chain: {len(broken)} input(s) no earlier stage makes and this machine lacks:")
        for link in broken:
            print(f"  {link.stage}: {link.describe()}")
    else:
        print(f"chain: all {len(links)} inputs are made by an earlier stage, listed in requires, or present here")
    print("dry run: nothing run or written (pipeline)", file=sys.stderr)
    return 1 if broken else 0
