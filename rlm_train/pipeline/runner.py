"""Run a pipeline's stages in order, each as `rlm-train RUN --recipe OUT_DIR/pipeline/NAME.yaml`.

- A stage is skipped when it finished before with the same fingerprint (its config and every
  upstream stage's) and its outputs exist; a stage runs when an upstream stage ran in this run.
- Before a stage reruns with another fingerprint, its old outputs move to OUT_DIR/pipeline/stale/;
  with the same fingerprint (interrupted, failed) it resumes in place: the commands resume themselves.
- Background serve stages start before the first stage that needs them and stop after the last.
- Ctrl-C or SIGTERM: SIGINT to the running stage's process group (SIGKILL after a grace period or a
  second signal), the stage recorded as interrupted, every server stopped, exit 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, TextIO

from rlm_train.errors import UserError
from rlm_train.pipeline import state as st
from rlm_train.pipeline.plans import plan_isolated
from rlm_train.pipeline.recipe import FINGERPRINT_SCHEME, Pipeline, PipelineStage
from rlm_train.pipeline.servers import (BackgroundServer, check_background_stage, die_with_parent, serve_command,
                                        start_timeout, stop_group)
from rlm_train.stage import Plan

INTERRUPT_GRACE_S = 30.0  # after SIGINT, how long a stage may take to stop before SIGKILL
EXIT_INTERRUPTED = 130


def shell_command(stage: PipelineStage) -> str:
    import shlex

    return "rlm-train " + " ".join(shlex.quote(part) for part in stage.argv)


def decide(pipeline: Pipeline, states: dict[str, dict[str, Any] | None], fingerprints: dict[str, str],
           from_stage: str | None = None, only_stage: str | None = None, keep: tuple[str, ...] = ()) -> dict[str, str]:
    """Each stage's fate: 'run', 'skip' (finished with this config), 'keep' (finished with another
    fingerprint, its outputs reused: --keep), 'not selected' (--from/--only), or for background
    serve stages 'serve' / 'idle'. A stage runs when it has not finished with its fingerprint, or
    when a stage it comes after runs now (through background stages too)."""
    names = [s.name for s in pipeline.stages]
    fate: dict[str, str] = {}
    dirty: dict[str, bool] = {}
    start = names.index(from_stage) if from_stage else 0
    for index, stage in enumerate(pipeline.stages):
        upstream_runs = any(dirty.get(name) for name in stage.after)
        if stage.background:
            dirty[stage.name] = upstream_runs
            continue
        if only_stage:
            runs = stage.name == only_stage
        elif from_stage:
            runs = index >= start
        elif stage.name in keep and st.has_outputs(states.get(stage.name)) \
                and not st.is_finished(states.get(stage.name), fingerprints[stage.name]):
            fate[stage.name], dirty[stage.name] = "keep", False
            continue
        else:
            runs = upstream_runs or not st.is_finished(states.get(stage.name), fingerprints[stage.name])
        selected = (stage.name == only_stage) if only_stage else index >= start
        fate[stage.name] = "run" if runs else ("skip" if selected else "not selected")
        dirty[stage.name] = runs
    for stage in pipeline.stages:
        if stage.background:
            users = [s.name for s in pipeline.stages if stage.name in s.after and fate.get(s.name) == "run"]
            fate[stage.name] = "serve" if users else "idle"
    return {name: fate[name] for name in names}


class Runner:
    def __init__(self, pipeline: Pipeline, *, from_stage: str | None = None, only_stage: str | None = None,
                 keep: tuple[str, ...] = ()):
        self.pipeline = pipeline
        self.from_stage = from_stage
        self.only_stage = only_stage
        self.keep = keep
        self.out: TextIO = sys.stdout
        self.signals: list[int] = []
        self.errors: list[str] = []
        self.servers: dict[str, BackgroundServer] = {}
        self.timings = st.Timings(pipeline)
        self.started = time.monotonic()
        self.order = [s.name for s in pipeline.stages]

    # -- output ------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        """Kept for the end of the run: the one line that says what went wrong comes last, after
        the timings table."""
        self.errors.append(f"rlm-train pipeline: {text}")

    def _left(self, fate: dict[str, str], from_index: int) -> str:
        remaining = [s.name for s in self.pipeline.stages[from_index:] if fate.get(s.name) == "run"]
        seconds, unknown = self.timings.estimate(remaining)
        if not remaining or len(unknown) == len(remaining):
            return "time left: unknown (no earlier timings)" if remaining else ""
        more = f" + {', '.join(unknown)} (no timing yet)" if unknown else ""
        return f"~{st.format_duration(seconds)} left{more}, from the last run's timings"

    def header(self, index: int, stage: PipelineStage, what: str, fate: dict[str, str]) -> None:
        elapsed = st.format_duration(time.monotonic() - self.started)
        parts = [f"=== [{index + 1}/{len(self.order)}] {stage.name}: {what}", f"elapsed {elapsed}"]
        if (left := self._left(fate, index)):
            parts.append(left)
        self.say(" | ".join(parts))

    # -- signals -----------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def stop_requested(self) -> bool:
        return bool(self.signals)

    # -- the run -----------------------------------------------------------
    def run(self) -> int:
        pipeline = self.pipeline
        for name in (self.from_stage, self.only_stage):
            if name is not None and pipeline.stage(name).background:
                raise UserError(f"--from/--only {name}: a background serve stage starts with the stages that need it; "
                                "name one of those")
        for stage in pipeline.stages:
            if stage.run == "serve" and not stage.background:
                raise UserError(f"{pipeline.path}: stage {stage.name}: a serve stage runs beside the stages that use "
                                "it; set background: true (and list it in their `after`)")
            if stage.background:
                check_background_stage(stage, str(pipeline.path))
        st.ensure_writable(pipeline)
        fingerprints = pipeline.fingerprints()
        states = {s.name: st.read_state(pipeline, s) for s in pipeline.stages}
        fate = decide(pipeline, states, fingerprints, self.from_stage, self.only_stage, self.keep)
        if any(f == "run" for f in fate.values()):
            for req in pipeline.requires:
                if why := req.missing():
                    raise UserError(f"{pipeline.path}: requires {req.target}: {why}")
        pipeline.write_stage_recipes()
        plans = self._check_plans(fate)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            code = self._run_stages(fate, fingerprints, states, plans)
        except UserError as exc:
            self.error(str(exc))
            code = 2
        finally:
            held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self._stop_servers(list(self.servers))
                self.say("\n" + self.timings.table(self.order))
                try:
                    self.timings.write(self.order)
                    self.say(f"timings: {self.timings.path}")
                    if code == 0:
                        self._summary()
                except OSError as exc:  # a full disk must not hide the stage's own error
                    self.error(f"{exc.filename or self.timings.path}: not written ({exc.strerror or exc})")
                for line in self.errors:
                    print(line, file=sys.stderr, flush=True)
            finally:
                for sig, handler in {**held, **previous}.items():
                    signal.signal(sig, handler)
        return code

    def _summary(self) -> None:
        """OUT_DIR/report.md and viewer.html, then the eval stages' score tables, printed last."""
        from rlm_train.pipeline.summary import results_tables, write_summary

        written = write_summary(self.pipeline, self.timings.table(self.order))
        self.say(f"report: {', '.join(str(p) for p in written)}")
        tables = results_tables(self.pipeline)
        if tables:
            self.say("\n" + tables.rstrip())

    def _check_plans(self, fate: dict[str, str]) -> dict[str, Plan]:
        """Each stage that will run plans itself (its own --dry-run) before any stage runs, so a
        bad key in the last stage's config stops the pipeline now, not after hours of the others."""
        to_run = [s for s in self.pipeline.stages if fate[s.name] == "run"]
        if to_run:
            self.say(f"rlm-train pipeline: {self.pipeline.name}: checking the plans of {len(to_run)} stage(s)")
        plans = {}
        for stage in to_run:
            try:
                plans[stage.name] = plan_isolated(stage)
            except UserError as exc:
                raise UserError(f"stage {stage.name} ({self.order.index(stage.name) + 1}/{len(self.order)}) cannot "
                                f"start: {exc}; check it alone: {shell_command(stage)} --dry-run") from None
        return plans

    def _run_stages(self, fate: dict[str, str], fingerprints: dict[str, str],
                    states: dict[str, dict[str, Any] | None], plans: dict[str, Plan]) -> int:
        pipeline = self.pipeline
        last_user = {s.name: max((i for i, u in enumerate(pipeline.stages) if s.name in u.after and fate[u.name] == "run"),
                                 default=-1) for s in pipeline.stages if s.background}
        for index, stage in enumerate(pipeline.stages):
            if self.stop_requested():
                self.error("interrupted before stage " + stage.name + "; run the same command again to resume")
                return EXIT_INTERRUPTED
            if stage.background:
                continue
            if fate[stage.name] == "keep":
                self._keep(index, stage, fate, fingerprints[stage.name], states[stage.name] or {})
                continue
            if fate[stage.name] != "run":
                why = "finished before with the same config and code; outputs present" if fate[stage.name] == "skip" \
                    else "not selected (--from/--only)"
                self.header(index, stage, f"skipped ({why})", fate)
                self.timings.record(stage.name, "skipped" if fate[stage.name] == "skip" else "not selected")
                continue
            # Every server this stage needs starts at once (their start-ups overlap), then each is waited for.
            needed = [name for name in stage.after if pipeline.stage(name).background and name not in self.servers]
            for name in needed:
                self._launch_server(pipeline.stage(name), fate)
            for name in needed:
                self._wait_server(pipeline.stage(name))
                if self.stop_requested():
                    self.error(f"interrupted while starting {name}; run the same command again to resume")
                    return EXIT_INTERRUPTED
            code = self._run_stage(index, stage, fate, fingerprints[stage.name], states.get(stage.name),
                                   plans[stage.name])
            if code != 0:
                return code
            self._stop_servers([name for name, last in last_user.items() if last == index and name in self.servers])
        return 0

    def _keep(self, index: int, stage: PipelineStage, fate: dict[str, str], fingerprint: str,
              state: dict[str, Any]) -> None:
        """--keep: a stage finished with another config or code keeps its outputs; its state takes
        today's fingerprint, so later runs skip it too."""
        self.header(index, stage, f"kept (--keep): reusing the outputs of its last run ({state.get('finished')}) "
                                  "although its config or code changed since", fate)
        st.write_state(self.pipeline, stage, {**state, "fingerprint": fingerprint, "fingerprint_scheme": FINGERPRINT_SCHEME,
                                              "kept": st.now_iso()})
        self.timings.record(stage.name, "kept")

    def _launch_server(self, stage: PipelineStage, fate: dict[str, str]) -> None:
        index = self.order.index(stage.name)
        log_file = self.pipeline.state_dir / f"{stage.name}.log"
        server = BackgroundServer(stage, log_file, serve_command(stage))
        if server.healthy():  # another server on that port would pass for this one
            raise UserError(f"background stage {stage.name}: {server.url} already answers before it started: another "
                            "server holds that port; stop it, or set another vllm.port (and the base_urls that name it)")
        self.header(index, stage, f"starting in the background: {shell_command(stage)} (log: {log_file})", fate)
        server.start()
        self.servers[stage.name] = server

    def _wait_server(self, stage: PipelineStage) -> None:
        server = self.servers[stage.name]
        last = [-60.0]

        def progress(elapsed: float, line: str) -> None:
            if elapsed - last[0] >= 15:
                self.say(f"    waiting for {stage.name} ({server.url}): {elapsed:.0f} s | {line}")
                last[0] = elapsed

        server.wait_healthy(start_timeout(stage), self.stop_requested, progress)
        if server.healthy_after_s is not None:
            self.say(f"    {stage.name} is up after {server.healthy_after_s:.0f} s: {server.url}")

    def _stop_servers(self, names: list[str]) -> None:
        for name in names:
            server = self.servers.pop(name)
            if server.proc is None:
                continue
            self.say(f"    stopping background stage {name} (pid {server.proc.pid})")
            server.stop()
            self.timings.record(name, "served", server.up_seconds(),
                                **({"healthy_after_s": round(server.healthy_after_s, 2)}
                                   if server.healthy_after_s is not None else {}))

    def _run_stage(self, index: int, stage: PipelineStage, fate: dict[str, str], fingerprint: str,
                   previous: dict[str, Any] | None, plan: Plan) -> int:
        pipeline = self.pipeline
        if previous is None or previous.get("fingerprint") != fingerprint:
            old = list((previous or {}).get("outputs", {}).values()) or plan.output_paths
            moved = st.move_aside(pipeline, stage, [str(p) for p in old] + plan.output_paths)
            if moved is not None:
                why = ("an older rlm-train's run (another fingerprint scheme)" if st.other_scheme(previous) else
                       "another config or code" if previous else "an unknown config (no pipeline state)")
                self.say(f"    {stage.name}: outputs of {why} moved aside to {moved}")
        resume = previous is not None and previous.get("fingerprint") == fingerprint and previous.get("status") != "done"
        what = shell_command(stage) + (f" (resuming: last run {previous.get('status')})" if resume and previous else "")
        self.header(index, stage, what, fate)
        state: dict[str, Any] = {"stage": stage.name, "run": stage.run, "fingerprint": fingerprint,
                                 "fingerprint_scheme": FINGERPRINT_SCHEME, "status": "running",
                                 "started": st.now_iso(), "finished": None, "exit_code": None,
                                 "command": shell_command(stage),
                                 "outputs": plan.shown_outputs()}
        st.write_state(pipeline, stage, state)
        began = time.monotonic()
        code, why = self._wait_stage(stage)
        seconds = time.monotonic() - began
        status = "done" if code == 0 else ("interrupted" if why == "interrupted" else "failed")
        state.update(status=status, finished=st.now_iso(), exit_code=code, seconds=round(seconds, 2))
        st.write_state(pipeline, stage, state)
        self.timings.record(stage.name, status, seconds)
        if status == "interrupted":
            self.error(f"interrupted during stage {stage.name} ({index + 1}/{len(self.order)}); "
                       "run the same command again to resume it")
            return EXIT_INTERRUPTED
        if status == "failed":
            reason = why or f"exit code {code}"
            self.error(f"stage {stage.name} ({index + 1}/{len(self.order)}) failed ({reason}); rerun it alone: "
                       f"{shell_command(stage)} (or this pipeline again, which resumes there)")
            return code if 0 < code < 126 else 1
        return 0

    def _wait_stage(self, stage: PipelineStage) -> tuple[int, str]:
        """Run the stage's command in a process group of its own; returns (exit code, why) where
        why is 'interrupted', a background server's death, or '' for the command's own exit."""
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen([sys.executable, "-m", "rlm_train.cli", *stage.argv], start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGINT))
        servers = [self.servers[name] for name in stage.after if name in self.servers]
        signalled_at: float | None = None
        seen_signals = 0
        why = ""
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if len(self.signals) > seen_signals:
                seen_signals = len(self.signals)
                why = "interrupted"
                if signalled_at is None:
                    signalled_at = time.monotonic()
                    self.say(f"    stopping stage {stage.name} (SIGINT to its process group; Ctrl-C again kills it)")
                    _signal_group(proc.pid, signal.SIGINT)
                else:
                    _signal_group(proc.pid, signal.SIGKILL)
            elif signalled_at is not None and time.monotonic() - signalled_at > INTERRUPT_GRACE_S:
                _signal_group(proc.pid, signal.SIGKILL)
            if not why:
                for server in servers:
                    if (reason := server.died()):
                        why = reason
                        stop_group(proc, signal.SIGINT, INTERRUPT_GRACE_S)
        # Whatever the stage left in its group (workers of a killed command) goes too.
        stop_group(proc, signal.SIGTERM, 5.0)
        if code in (EXIT_INTERRUPTED, -signal.SIGINT) and not why:
            why = "interrupted"  # the stage was stopped by a SIGINT sent to it directly
        if why and why != "interrupted" and code == 0:
            code = 1
        return code, why


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
