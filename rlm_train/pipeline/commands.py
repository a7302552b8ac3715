"""`rlm-train pipeline`: every stage of a pipeline recipe, in order, skipping what is done.

    rlm-train pipeline --recipe recipes/tiny-cpu-pipeline.yaml            # run (or resume) it all
    rlm-train pipeline --recipe recipes/qwen3-8b-pipeline.yaml --dry-run  # each stage's command and plan
    rlm-train pipeline --recipe R --from sft                              # rerun sft and what follows
    rlm-train pipeline --recipe R --only eval filter.min_turns=3          # one stage; a stage's key changed
    rlm-train pipeline --recipe R --keep generate                         # reuse generate's outputs after a code change

A stage is skipped when it finished with the same config (its own and every stage upstream), the
same rlm-train code it depends on (task generators, teacher, loop, filter, trainer) and its outputs
exist; a changed config or code (not a comment or docstring) reruns it and everything after it, its
old outputs moved aside to OUT_DIR/pipeline/stale/, unless `--keep STAGE` reuses them. Ctrl-C stops
the running stage cleanly; the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys

from rlm_train.errors import UserError
from rlm_train.pipeline.recipe import FINGERPRINT_SCHEME

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
    parser.add_argument("--keep", action="append", default=[], metavar="STAGE",
                        help="reuse STAGE's outputs from its last finished run although its config or code changed "
                             "since (repeatable); the stages after it still rerun when their own fingerprint changed")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                        help="a stage's config key, applied last, e.g. sft.training.max_steps=10")


def main(args: argparse.Namespace) -> int:
    from rlm_train.pipeline.recipe import load_pipeline

    pipeline = load_pipeline(args.recipe, args.overrides)
    for name in (args.from_stage, args.only_stage, *args.keep):
        if name is not None:
            pipeline.stage(name)  # a UserError naming the stages when there is none
    if args.from_stage and args.only_stage:
        raise UserError("--from and --only: pass one of them")
    keep = tuple(args.keep)
    if args.dry_run:
        return dry_run(pipeline, args.from_stage, args.only_stage, keep)
    from rlm_train.pipeline.runner import Runner

    return Runner(pipeline, from_stage=args.from_stage, only_stage=args.only_stage, keep=keep).run()


def _fate_text(fate: str, state: dict | None, fingerprint: str) -> str:
    if fate == "skip":
        return "skip: finished before with this config and code, outputs present"
    if fate == "not selected":
        return "not run (--from/--only)"
    if fate == "idle":
        return "not started: no stage that needs it runs"
    if fate == "serve":
        return "started in the background for the stages that need it"
    if fate == "keep":
        return "keep (--keep): its last run's outputs are reused although its config or code changed since"
    if state is None:
        return "run"
    if state.get("fingerprint_scheme", 1) != FINGERPRINT_SCHEME:
        return ("run: its state was written by an older rlm-train, whose fingerprints are of another kind (its old "
                "outputs move to OUT_DIR/pipeline/stale/; --keep STAGE reuses them instead)")
    if state.get("fingerprint") != fingerprint:
        return "run: config or code changed since its last run (its old outputs move to OUT_DIR/pipeline/stale/)"
    if state.get("status") != "done":
        return f"run: resume (its last run: {state.get('status')})"
    return "run: an upstream stage runs, or its outputs are missing"


def dry_run(pipeline, from_stage: str | None, only_stage: str | None, keep: tuple[str, ...] = ()) -> int:
    from rlm_train.pipeline import state as st
    from rlm_train.pipeline.chain import SourceKind, check_chain
    from rlm_train.pipeline.plans import plan_here
    from rlm_train.pipeline.runner import decide, shell_command
    from rlm_train.pipeline.servers import health_url
    from rlm_train.stage import NoteKind, Plan

    fingerprints = pipeline.fingerprints()
    states = {s.name: st.read_state(pipeline, s) if st.state_file(pipeline, s).is_file() else None
              for s in pipeline.stages}
    fate = decide(pipeline, states, fingerprints, from_stage, only_stage, keep)
    plans: dict[str, Plan] = {}
    errors: dict[str, str] = {}
    for stage in pipeline.stages:
        try:
            plans[stage.name] = plan_here(stage)
        except UserError as exc:
            plans[stage.name], errors[stage.name] = Plan(), str(exc)
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
            for name, path in plan.shown_outputs().items():
                print(f"    {name}: {path}")
        # An input an earlier stage makes is missing here now, as it should be: no note for it.
        upstream_made = {link.path for link in mine if link.kind == SourceKind.STAGE}
        notes = [note for note in plan.notes
                 if not (note.kind == NoteKind.MISSING_INPUT and upstream_made & set(note.paths))]
        if notes:
            print("  notes:")
            for note in notes[:NOTES_SHOWN]:
                print(f"    {note.text}")
            if len(notes) > NOTES_SHOWN:
                print(f"    ... {len(notes) - NOTES_SHOWN} more: {shell_command(stage)} --dry-run")
        if stage.name in errors:
            print(f"  plan: FAILS: {errors[stage.name]}")
    broken = [link for link in links if link.broken]
    print()
    if broken:
        print(f"chain: {len(broken)} input(s) no earlier stage makes and this machine lacks:")
        for link in broken:
            print(f"  {link.stage}: {link.describe()}")
    else:
        print(f"chain: all {len(links)} inputs are made by an earlier stage, listed in requires, or present here")
    if errors:  # the stage would stop at the same check when it runs: say so before anything runs
        print(f"plans: {len(errors)} stage(s) would stop at their own checks: {', '.join(errors)}")
    print("dry run: nothing run or written (pipeline)", file=sys.stderr)
    return 1 if broken or errors else 0
