"""vLLM's OpenAI-compatible server for a model spec: checked, started, watched, stopped.

    plan = plan_vllm(VLLMConfig(model="gemma3-270m", adapters={"mine": "runs/sft/adapter"}))
    server = VLLMProcess(plan)
    server.start()
    server.wait_healthy(progress=...)   # elapsed time and vLLM's last log line while it starts
    ...
    server.stop()                       # SIGTERM to its process group, SIGKILL after a timeout

Everything that can be wrong with the input is found by `plan_vllm`, before anything
starts: a model that does not exist, an adapter trained on another base (both bases
named), a chat template that does not fit, a port in use, vLLM not installed. It sizes the
window (vllm_window.py) and, on vLLM's CPU build, its memory from what is free
(vllm_memory.py). vLLM runs in a session of its own, so stopping it stops its engine and
worker processes too, and `stop()` returns only when none of them is left. When it dies,
the line of its log that says why comes first (vllm_log.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rlm_train.errors import UserError
from rlm_train.serve.config import VLLMConfig
from rlm_train.serve.vllm_install import VLLM_HOWTO, vllm_build
from rlm_train.serve.vllm_log import root_cause
from rlm_train.stage import Note, NoteKind, info, warning
from rlm_train.serve.vllm_window import WindowNeed, fit_window, max_model_len_arg, read_json_object

if TYPE_CHECKING:
    from rlm_train.rlm import RLMConfig

# Flags the launcher sets itself; passing them in vllm.args would contradict it.
_OWN_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--chat-template", "--enable-lora",
              "--lora-modules", "--max-lora-rank", "--max-loras")
# vLLM accepts only these values of --max-lora-rank.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class LaunchPlan:
    """What `serve` will start, found and checked before anything starts."""

    command: list[str]
    env: dict[str, str]  # added to the environment
    model_dir: Path
    served_name: str
    adapters: dict[str, Path]
    chat_template: Path | None  # None: the tokenizer's own
    host: str
    port: int
    log_file: Path
    notes: list[Note] = field(default_factory=list)
    gateway_rlm: RLMConfig | None = None
    """The window need's RLM config lowered to the window vLLM got (None: it fits as it is)."""

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}/v1"

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapters]


def parse_adapters(items: list[str]) -> dict[str, str]:
    """`NAME=PATH` items (from --adapter) into a dict; bad forms and duplicate names are errors."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--adapter {item!r}: expected NAME=PATH, e.g. --adapter mine=runs/sft/adapter")
        if name in adapters:
            raise UserError(f"--adapter {item!r}: the name {name!r} is given twice; give each adapter its own name")
        adapters[name] = path
    return adapters


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int, flag: str) -> None:
    """A UserError naming the flag when host:port cannot be bound (in use, or not an address here)."""
    try:
        with socket.socket(_family(host)) as s:
            # As the server itself binds: connections of a server stopped moments ago (TIME_WAIT) do
            # not hold the port, a listening socket still does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise UserError(f"{flag} {port}: port {port} on {host} is in use by another program; "
                            f"stop it, or pass another port ({flag} 0 picks a free one)") from None
        raise UserError(f"{flag} {port} on {host}: cannot listen there ({exc.strerror or exc}); "
                        "check the host and the port") from None


# ---------------------------------------------------------------------------
# Checks before start


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (no torch needed)."""
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                return {}
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    return {name: list(meta.get("shape", [])) for name, meta in header.items()
            if name != "__metadata__" and isinstance(meta, dict)}


def check_adapter_fits(name: str, adapter_dir: str, model_spec: str, model_dir: Path) -> tuple[Path, int]:
    """Fail (naming both bases) unless the adapter was trained on this base. Returns (dir, LoRA rank).

    Adapters we saved carry their base (`loading.check_adapter`); for others, the base their
    adapter_config names is compared when it is a local model, and the LoRA matrices' widths
    are compared with the model's hidden size."""
    from rlm_train.models import loading

    path = Path(adapter_dir).expanduser()
    if not path.exists():
        raise UserError(f"--adapter {name}={adapter_dir}: no such directory")
    loading.check_adapter(path, model_spec)  # raises naming both bases when our metadata says so
    adapter_config = read_json_object(path / "adapter_config.json")
    base_named = str(adapter_config.get("base_model_name_or_path") or "unknown")
    have = loading.model_config(model_dir)
    named_dir = Path(base_named).expanduser()
    if (named_dir / "config.json").is_file() and named_dir.resolve() != model_dir.resolve():
        want = loading.base_fingerprint(named_dir)
        mine = {k: have.get(k) for k in loading.BASE_FINGERPRINT_KEYS}
        diff = [f"{k}: adapter's base {want[k]!r} vs model {mine[k]!r}" for k in want if want[k] != mine[k]]
        if diff:
            raise UserError(f"adapter {name} ({path}) was trained on base model {base_named}, not on "
                            f"{model_spec} ({', '.join(diff)}); serve it with its own base")
    hidden = have.get("hidden_size")
    weights = path / "adapter_model.safetensors"
    if hidden and weights.is_file():
        for tensor, shape in _safetensors_shapes(weights).items():
            # lora_A of the attention and MLP input projections reads the hidden state.
            if ".lora_A." in tensor and re.search(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)", tensor) \
                    and len(shape) == 2 and shape[1] != hidden:
                raise UserError(f"adapter {name} ({path}) was trained on base model {base_named}, not on "
                                f"{model_spec}: its {tensor.split('.lora_A')[0].rsplit('.', 1)[-1]} matrices read "
                                f"{shape[1]} features, the model's hidden size is {hidden}; serve it with its own base")
    rank = adapter_config.get("r") or 0
    if not isinstance(rank, int) or rank < 1:
        rank = 8
    return path, rank


def _eos_ids(model_dir: Path) -> list[int]:
    for name in ("generation_config.json", "config.json"):
        file = model_dir / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else [int(v) for v in value]
    return []


def _resolve_template(config: VLLMConfig, model_dir: Path, notes: list[Note]) -> Path | None:
    """The chat template file to pass to vLLM (None: the tokenizer's own), checked against the
    tokenizer; a template whose end-of-turn token is not an EOS of the model gets a note."""
    from rlm_train.models import loading

    tokenizer = loading.load_tokenizer(model_dir, chat_template=config.chat_template)  # resolves and checks
    choice = config.chat_template
    if choice == "auto":
        choice = loading.TEMPLATE_FOR_MODEL_TYPE.get(loading.model_config(model_dir).get("model_type") or "", "model")
    template = None
    if choice.endswith(".jinja"):
        template = Path(choice).expanduser().resolve()
    elif choice != "model":
        template = loading.chat_template_path(choice)
    ends = loading.end_of_turn_ids(tokenizer)[:1]
    eos = _eos_ids(model_dir)
    if ends and eos and ends[0] not in eos:
        token = tokenizer.convert_ids_to_tokens(ends[0])
        notes.append(warning(f"the chat template ends a turn with {token} (id {ends[0]}), which is not among the "
                             f"model's eos_token_id {eos}: vLLM will not stop there and turns run on to max_tokens; "
                             f"add {ends[0]} to eos_token_id in {model_dir / 'generation_config.json'}"))
    return template


def _served_name(config: VLLMConfig) -> str:
    from rlm_train.models import loading

    name = config.served_model_name or loading.model_name(config.model or "")  # a Hub id serves under its id
    if not _NAME_RE.match(name):
        raise UserError(f"served model name {name!r}: use letters, digits and . _ : / - (pass --served-model-name)")
    return name


def plan_vllm(config: VLLMConfig, *, dry_run: bool = False, reserved_ports: tuple[tuple[str, int], ...] = (),
              window_need: WindowNeed | None = None) -> LaunchPlan:
    """Check everything about the launch before anything starts, and build the vLLM command
    (its window sized for `window_need` when vllm.args set none: `fit_window`).

    Raises UserError for: a model that does not exist, an adapter name or directory that is
    wrong, an adapter trained on another base, a chat template that does not fit, a port in
    use, a window longer than the model's positions, vLLM missing from the interpreter (on a
    dry run these become notes where they can)."""
    from rlm_train.models import loading

    if not config.model:
        raise UserError("no model: pass --model gemma3-270m, --model DIR (a Hugging Face model directory) "
                        "or --model ORG/NAME (a Hub id in the Hugging Face cache)")
    notes: list[Note] = []
    packaged = config.model == loading.GEMMA3_270M
    if dry_run and packaged and not (loading.cache_root() / "models" / "gemma3-270m-bf16" / "config.json").is_file():
        model_dir = loading.cache_root() / "models" / "gemma3-270m-bf16"
        notes += info(f"model {config.model}: converted from the packaged GGUF into {model_dir} on the first real run "
                      "(once); adapter and template checks wait for it")
        converted = False
    elif dry_run and not packaged and (why := loading.model_missing(config.model)):
        # A pipeline's dry run plans the server before the stage that writes the model ran.
        model_dir = Path(config.model).expanduser()
        notes.append(Note(NoteKind.MISSING_INPUT, f"model {config.model}: {why} (a real run stops here)", (config.model,)))
        converted = False
    else:
        model_dir = loading.resolve_model(config.model)  # converts (or updates) the packaged Gemma once
        converted = True
    served = _served_name(config)
    adapters: dict[str, Path] = {}
    ranks = []
    for name, adapter_dir in config.adapters.items():
        if not _NAME_RE.match(name):
            raise UserError(f"--adapter {name}={adapter_dir}: the name must be letters, digits and . _ : / -")
        if name == served:
            raise UserError(f"--adapter {name}={adapter_dir}: {name!r} is the base model's served name; "
                            "give the adapter another name")
        if dry_run and not Path(adapter_dir).expanduser().is_dir():
            # A pipeline's dry run plans the server before the stage that trains the adapter ran.
            notes.append(Note(NoteKind.MISSING_INPUT, f"adapter {name} {adapter_dir}: not found on this machine "
                              "(a real run stops here)", (str(adapter_dir),)))
            path, rank = Path(adapter_dir).expanduser(), 8
        elif converted:
            path, rank = check_adapter_fits(name, adapter_dir, config.model, model_dir)
        else:
            path, rank = Path(adapter_dir).expanduser(), 8
        adapters[name] = path.resolve()
        ranks.append(rank)
    for arg in config.args:
        flag = arg.split("=", 1)[0]
        if flag in _OWN_FLAGS:
            raise UserError(f"vLLM flag {flag} in --vllm-args is set by rlm-train serve; use its own option "
                            "(--model, --served-model-name, --host, --port, --chat-template, --adapter)")
    args, gateway_rlm = fit_window(config.args, model_dir if converted else None, config.env, window_need, notes)
    port = config.port or free_port(config.host)
    if (config.host, port) in reserved_ports or any(p == port for _, p in reserved_ports):
        raise UserError(f"--port {port}: the gateway is set to the same port; give them different ports")
    check_port_free(config.host, port, "--port")
    python = config.python or sys.executable
    build = vllm_build(python)
    env = dict(config.env)
    if build is None:
        message = f"vLLM is not installed in {python}: {VLLM_HOWTO}"
        if not dry_run:
            raise UserError(message)
        notes += info(message + " (a real run stops here)")
    elif build == "cpu" and converted:
        from rlm_train.serve.vllm_memory import cpu_memory_settings

        more_env, more_args = cpu_memory_settings(model_dir, max_model_len_arg(args, "--vllm-args"), args, env, notes)
        env.update(more_env)
        args = [*args, *more_args]
    template = _resolve_template(config, model_dir, notes) if converted else None  # loads the tokenizer: last
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served, "--host", config.host, "--port", str(port)]
    if template is not None:
        command += ["--chat-template", str(template)]
    if adapters:
        rank = next(r for r in _VLLM_LORA_RANKS if r >= max(ranks)) if max(ranks) <= _VLLM_LORA_RANKS[-1] else max(ranks)
        command += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank), "--lora-modules",
                    *(f"{name}={path}" for name, path in adapters.items())]
    command += args
    log_file = Path(config.log_file).expanduser() if config.log_file else \
        loading.cache_root() / "serve" / f"vllm-{port}.log"
    return LaunchPlan(command=command, env=env, model_dir=model_dir, served_name=served, adapters=adapters,
                      chat_template=template, host=config.host, port=port, log_file=log_file, notes=notes,
                      gateway_rlm=gateway_rlm)


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


# ---------------------------------------------------------------------------
# The process


class VLLMExited(UserError):
    """vLLM ended while starting or serving; the message has its last log lines."""


class VLLMProcess:
    """One vLLM server process (and its process group)."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.plan.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.plan.env}
        with self.plan.log_file.open("wb") as log:
            # A session of its own: Ctrl-C on the terminal reaches rlm-train only, and stop()
            # reaches vLLM's engine and workers through the group.
            self.proc = subprocess.Popen(self.plan.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def last_log_line(self, width: int = 160) -> str:
        return last_line(self.plan.log_file, width)

    def log_tail(self, lines: int = 25) -> str:
        try:
            with self.plan.log_file.open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 64 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(_ANSI_RE.sub("", line) for line in text.splitlines()[-lines:])

    def healthy(self) -> bool:
        url = self.plan.base_url.rsplit("/v1", 1)[0] + "/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

    def why_it_died(self) -> str:
        """The line of vLLM's log that names the cause, then the log's path and its end."""
        try:
            with self.plan.log_file.open("rb") as fh:
                cause = root_cause(fh.read(8 * 1024 * 1024).decode("utf-8", "replace"))
        except OSError:
            cause = None
        return (f"{cause or 'no error line in its log'}\nvLLM's log: {self.plan.log_file}; its end:\n"
                f"{self.log_tail(15)}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise VLLMExited(f"vLLM exited with status {self.proc.returncode}: {self.why_it_died()}")

    def wait_healthy(self, timeout_s: float, progress: Callable[[float, str], None] | None = None,
                     poll_s: float = 1.0) -> float:
        """Wait until /health answers 200; returns the seconds it took. `progress(elapsed, last
        log line)` is called every poll. Raises VLLMExited / UserError on exit or timeout."""
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            self.check_alive()
            if self.healthy():
                return elapsed
            if elapsed > timeout_s:
                raise UserError(f"vLLM did not answer {self.plan.base_url.rsplit('/v1', 1)[0]}/health within "
                                f"{timeout_s:g} s (raise vllm.start_timeout_s); last error line: "
                                f"{self.why_it_died()}")
            if progress is not None:
                progress(elapsed, self.last_log_line())
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after `timeout_s`; returns when
        no process of the group is left (vLLM's engine and workers included)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (self.proc.poll() is None or group_alive(pgid)):
            time.sleep(0.1)
        if self.proc.poll() is None or group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 10
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.proc.poll()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies of our own child aside)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def last_line(path: Path, width: int = 160) -> str:
    """The last non-empty line of a log file, without colour codes, cut to `width`."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            chunk = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(re.split(r"[\r\n]+", chunk)):
        line = _ANSI_RE.sub("", line).strip()
        if line:
            return line if len(line) <= width else line[: width - 3] + "..."
    return ""
