"""`rlm-train serve`: vLLM for a model (and its LoRA adapters), the RLM gateway, or both.

    rlm-train serve --model gemma3-270m                          # vLLM's OpenAI API on :8000
    rlm-train serve --model DIR --adapter mine=ADAPTER --gateway # + the RLM gateway on :8100
    rlm-train serve --base-url http://HOST:8000/v1               # the gateway in front of any server

Everything is checked before anything starts; while vLLM starts (minutes on CPUs) a
progress line shows the time and vLLM's last log line; the URLs are printed on stdout
when ready; Ctrl-C or SIGTERM stops the gateway and vLLM's whole process group.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.serve.config import ServeConfig
from rlm_train.stage import Note, NoteKind, Output, Plan, Stage, add_stage_arguments, info, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    vllm = parser.add_argument_group("vLLM (started with --model)")
    vllm.add_argument("--model", help="gemma3-270m (the packaged weights), a Hugging Face model directory, "
                      "or a Hub id in the Hugging Face cache (Qwen/Qwen3-8B)")
    vllm.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                      help="a LoRA adapter served as model NAME (repeatable)")
    vllm.add_argument("--served-model-name", help="the base model's name in requests (default: gemma3-270m or the "
                                                  "directory's name)")
    vllm.add_argument("--host", help="vLLM's interface (default 127.0.0.1)")
    vllm.add_argument("--port", type=int, help="vLLM's port (default 8000; 0: a free one)")
    vllm.add_argument("--chat-template", help="auto (default) | model | qwen3 | gemma3 | FILE.jinja")
    vllm.add_argument("--vllm-python", help="the Python that has vLLM installed (default: this one)")
    vllm.add_argument("--vllm-args", help="extra vLLM flags in one string, e.g. \"--max-model-len 4096 --dtype bfloat16\" "
                                          "(one flag alone: --vllm-args=--enforce-eager)")
    vllm.add_argument("--start-timeout-s", type=float, help="seconds to wait for vLLM to be healthy (default 900)")
    vllm.add_argument("--log-file", help="vLLM's output (default: $RLM_TRAIN_CACHE/serve/vllm-PORT.log)")
    gw = parser.add_argument_group("RLM gateway (--gateway, or --base-url without --model)")
    gw.add_argument("--gateway", action="store_true", help="also serve the RLM gateway in front of vLLM")
    gw.add_argument("--gateway-host", help="the gateway's interface (default 127.0.0.1)")
    gw.add_argument("--gateway-port", type=int, help="the gateway's port (default 8100; 0: a free one)")
    gw.add_argument("--base-url", action="append", default=[],
                    help="upstream OpenAI-compatible server for the gateway, http://HOST:PORT/v1 (repeatable)")
    gw.add_argument("--gateway-model", action="append", default=[], metavar="NAME",
                    help="upstream model a request may name (repeatable; default: the served ones / the upstream's list)")
    gw.add_argument("--sub-model", help="upstream model for sub-calls (default: the request's model)")
    gw.add_argument("--token-env", metavar="VAR", help="environment variable with the bearer token requests must send")
    gw.add_argument("--context-dir", action="append", default=[], metavar="DIR",
                    help="directory requests may read context files from (repeatable; default: none)")
    gw.add_argument("--max-concurrent", type=int, help="episodes running at once (default 8)")
    gw.add_argument("--max-queue", type=int, help="episodes waiting; beyond it 429 (default 32)")
    add_stage_arguments(parser, recipe_required=False, config_name="ServeConfig", example="vllm.port=8001")


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


class Progress:
    """While vLLM starts: one line rewritten in place on a terminal, else a line every `every_s`."""

    def __init__(self, stream: TextIO, every_s: float = 15.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self.last = -every_s
        self.shown = False

    def __call__(self, elapsed: float, line: str) -> None:
        text = f"waiting for vLLM: {elapsed:4.0f} s | {line or '(no output yet)'}"
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + text[: width - 1])
            self.stream.flush()
            self.shown = True
        elif elapsed - self.last >= self.every_s:
            print(text, file=self.stream, flush=True)
            self.last = elapsed

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def split_vllm_args(text: str) -> list[str]:
    """--vllm-args as the shell would split it; an unclosed quote is the user's to fix."""
    try:
        return shlex.split(text)
    except ValueError as exc:  # shlex: "No closing quotation" / "No escaped character"
        raise UserError(f"--vllm-args {text!r}: {str(exc).lower()}; close the quote, or quote the whole "
                        "value once: --vllm-args \"--max-model-len 4096\"") from None


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    from rlm_train.serve.launcher import parse_adapters

    flags = {
        "vllm.model": args.model,
        "vllm.adapters": parse_adapters(args.adapter) if args.adapter else None,
        "vllm.served_model_name": args.served_model_name,
        "vllm.host": args.host,
        "vllm.port": args.port,
        "vllm.chat_template": args.chat_template,
        "vllm.python": args.vllm_python,
        "vllm.args": split_vllm_args(args.vllm_args) if args.vllm_args else None,
        "vllm.start_timeout_s": args.start_timeout_s,
        "vllm.log_file": args.log_file,
        "gateway.enabled": True if args.gateway else None,
        "gateway.host": args.gateway_host,
        "gateway.port": args.gateway_port,
        "gateway.base_urls": args.base_url or None,
        "gateway.models": args.gateway_model or None,
        "gateway.sub_model": args.sub_model,
        "gateway.token_env": args.token_env,
        "gateway.context_dirs": args.context_dir or None,
        "gateway.max_concurrent": args.max_concurrent,
        "gateway.max_queue": args.max_queue,
    }
    return load_config(ServeConfig, args.recipe, args.overrides, flags=flags)


@dataclass
class Checked:
    """What serving a config would start, checked before anything starts."""

    launch: Any  # the vLLM LaunchPlan, or None when no vLLM is started
    gateway: Any  # the gateway's config, its upstream filled in
    gateway_on: bool
    notes: list[Note]


def check(config: ServeConfig, dry_run: bool) -> Checked:
    """Every check before anything starts; on a dry run a problem vLLM would meet is a note where it can be."""
    from rlm_train.rlm.window import server_window_tokens
    from rlm_train.serve.launcher import check_port_free, format_command, plan_vllm
    from rlm_train.serve.vllm_window import WindowNeed

    vcfg, gcfg = config.vllm, config.gateway
    start_vllm = bool(vcfg.model)
    gateway_on = gcfg.enabled or (not start_vllm and bool(gcfg.base_urls))
    if not start_vllm and not gateway_on:
        raise UserError("nothing to serve: pass --model M to start vLLM (add --gateway for the RLM gateway), "
                        "or --base-url http://HOST:PORT/v1 for the gateway in front of a running server")
    if vcfg.adapters and not start_vllm:
        raise UserError("--adapter needs --model: adapters are served by the vLLM that --model starts")
    if start_vllm and gcfg.base_urls:
        raise UserError("--base-url names the gateway's upstream when no --model is given; with --model the "
                        "gateway uses the vLLM it starts")

    if gateway_on and gcfg.port:
        check_port_free(gcfg.host, gcfg.port, "--gateway-port")
    plan = None
    notes: list[Note] = []
    if start_vllm:
        reserved = ((gcfg.host, gcfg.port),) if gateway_on and gcfg.port else ()
        # The vLLM this command starts for its own gateway gets the window the gateway's episodes need
        # (or the model's positions, the gateway's RLM config then lowered to fit: plan.gateway_rlm).
        need = WindowNeed(server_window_tokens(gcfg.rlm), "the gateway's RLM config", "gateway.rlm",
                          gcfg.rlm) if gateway_on else None
        plan = plan_vllm(vcfg, dry_run=dry_run, reserved_ports=reserved, window_need=need)
        notes += plan.notes
        notes += info(f"vLLM command: {format_command(plan.command)}",
                      f"vLLM URL: {plan.base_url} (models: {', '.join(plan.model_names)})")
        gcfg = gcfg.model_copy(update={"base_urls": [plan.base_url], "models": gcfg.models or plan.model_names,
                                       "rlm": plan.gateway_rlm or gcfg.rlm, "tokenizer": gcfg.tokenizer or str(plan.model_dir)})

    if gateway_on:
        if not gcfg.models and not dry_run:
            from rlm_train.serve.gateway_thread import list_upstream_models

            gcfg = gcfg.model_copy(update={"models": list_upstream_models(gcfg.base_urls[0])})
        if gcfg.host not in ("127.0.0.1", "localhost", "::1") and not gcfg.token_env:
            notes += info(f"gateway: listens on {gcfg.host} without --token-env: it makes a token at start and "
                          "requires it (the line it prints names the token's file)")
        notes += info(f"gateway: http://{gcfg.host}:{gcfg.port or 'a free port'} in front of "
                      f"{', '.join(gcfg.base_urls)} (models: {', '.join(gcfg.models) or 'the upstream list'})")
    return Checked(plan, gcfg, gateway_on, notes)


def _plan_of(config: ServeConfig, checked: Checked) -> Plan:
    vcfg = config.vllm
    inputs = {"model": vcfg.model, "adapters": [f"{k}={v}" for k, v in vcfg.adapters.items()],
              "base_url": checked.gateway.base_urls}
    outputs = [Output("vllm_log", str(checked.launch.log_file), "file", "--log-file")] if checked.launch else []
    return Plan(inputs={k: v for k, v in inputs.items() if v}, outputs=outputs, notes=list(checked.notes))


def plan(config: ServeConfig) -> Plan:
    return _plan_of(config, check(config, dry_run=True))


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    dry_run = args.dry_run or args.plan_json
    checked = check(config, dry_run)
    gcfg, gateway_on = checked.gateway, checked.gateway_on
    app = None
    if gateway_on and not dry_run:
        app = _create_app(gcfg)  # checks the token variable and the context directories before start
    shown = config.model_copy(update={"gateway": gcfg.model_copy(update={"enabled": gateway_on})})
    if prepare("serve", args, shown, _plan_of(config, checked)):
        return 0
    for note in checked.notes:
        if note.kind == NoteKind.WARNING:
            print(f"rlm-train serve: {note.text}", file=sys.stderr, flush=True)
    return _run(checked.launch, app, gcfg, config.vllm.start_timeout_s, config.vllm.stop_timeout_s)


def _create_app(gcfg: Any) -> Any:
    try:
        from rlm_train.serve.gateway import create_app
    except ModuleNotFoundError as exc:
        raise UserError(f"the RLM gateway needs the package {exc.name!r}: pip install fastapi uvicorn") from None
    return create_app(gcfg)


def _run(plan: Any, app: Any, gcfg: Any, start_timeout_s: float, stop_timeout_s: float) -> int:
    from rlm_train.serve.launcher import VLLMProcess

    server = VLLMProcess(plan) if plan is not None else None
    gateway = None
    progress = Progress(sys.stderr)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    stopped_by = None
    try:
        if server is not None:
            server.start()
            print(f"rlm-train serve: starting vLLM (pid {server.pid}) on {plan.model_dir}; log: {plan.log_file}",
                  file=sys.stderr, flush=True)
            took = server.wait_healthy(start_timeout_s, progress=progress)
            progress.clear()
            print(f"vLLM ready after {took:.0f} s: {plan.base_url} (models: {', '.join(plan.model_names)}; "
                  f"pid {server.pid})", flush=True)
        if app is not None:
            from rlm_train.serve.gateway_thread import GatewayThread

            gateway = GatewayThread(app, gcfg.host, gcfg.port).start()
            print(f"RLM gateway ready: {gateway.url} (POST /v1/rlm, POST /v1/chat/completions; "
                  f"models: {', '.join(gcfg.models)})", flush=True)
        print("rlm-train serve: Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.5)
            if server is not None:
                server.check_alive()
            if gateway is not None and not gateway.thread.is_alive():
                raise UserError("the RLM gateway stopped unexpectedly; see the messages above")
    except KeyboardInterrupt:
        stopped_by = "SIGINT"
    except _Stop as stop:
        stopped_by = str(stop)
    finally:
        # No second signal may cut the clean-up short and leave vLLM running.
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            progress.clear()
            if gateway is not None:
                gateway.stop()
            if server is not None and server.proc is not None:
                print(f"rlm-train serve: stopping vLLM (pid {server.pid})...", file=sys.stderr, flush=True)
                server.stop(stop_timeout_s)
        finally:
            for sig, handler in {**held, **previous}.items():
                if handler is not None:
                    signal.signal(sig, handler)
    what = ["the gateway"] if gateway is not None else []
    what += [f"vLLM (pid {server.pid}) and its processes"] if server is not None else []
    verb = "have" if len(what) > 1 or server is not None else "has"
    print(f"rlm-train serve: stopped ({stopped_by}); {' and '.join(what)} {verb} exited", file=sys.stderr, flush=True)
    return 0


STAGE = Stage(name="serve", config=ServeConfig, add_arguments=add_arguments, config_from_args=config_from_args,
              plan=plan, main=main, slurm_template="serve.sbatch")
