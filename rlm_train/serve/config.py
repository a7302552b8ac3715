"""Typed configs of `rlm-train serve`: the vLLM launcher and the RLM gateway.

    rlm-train serve --model gemma3-270m --adapter mine=runs/sft/adapter --gateway \
        gateway.rlm.max_iterations=6 gateway.max_concurrent=4
"""

from __future__ import annotations

from pydantic import Field

from rlm_train.config import StrictModel, bounded
from rlm_train.policies.spec import ClientOptions
from rlm_train.rlm import RLMConfig


class VLLMConfig(StrictModel):
    """vLLM's OpenAI-compatible server, started and stopped by `rlm-train serve --model`."""

    model: str | None = None
    """Model spec: `gemma3-270m` (the packaged weights), a Hugging Face model directory, or a Hub id
    in the Hugging Face cache (`Qwen/Qwen3-8B`; vLLM gets its snapshot directory)."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters served beside the base: name -> adapter directory (the `model` a request names)."""
    served_model_name: str | None = None
    """The base model's name in requests (default: the spec for gemma3-270m or a Hub id, else the directory's name)."""
    host: str = "127.0.0.1"
    """Interface vLLM binds (127.0.0.1: this machine only)."""
    port: int = Field(8000, ge=0, le=65535)
    """vLLM's port; 0 picks a free one."""
    chat_template: str = "auto"
    """auto (ours for known model types, else the tokenizer's) | model | qwen3 | gemma3 | a .jinja file."""
    python: str | None = None
    """The Python interpreter that has vLLM installed (default: the one running rlm-train)."""
    args: list[str] = Field(default_factory=list)
    """Extra vLLM flags, e.g. ["--max-model-len", "4096", "--dtype", "bfloat16"]."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for vLLM only, e.g. {VLLM_CPU_KVCACHE_SPACE: "2"} (GiB of KV cache on CPU)."""
    start_timeout_s: float = bounded(900.0, gt=0, le=86_400, why="a day for vLLM to load and answer /health")
    """Seconds to wait for vLLM's /health before giving up (the CPU build takes minutes)."""
    stop_timeout_s: float = bounded(30.0, gt=0, le=3600, why="an hour between SIGTERM and SIGKILL")
    """Seconds between SIGTERM and SIGKILL to vLLM's process group on stop."""
    log_file: str | None = None
    """vLLM's output (default: $RLM_TRAIN_CACHE/serve/vllm-PORT.log)."""


class GatewayConfig(StrictModel):
    """The RLM gateway: RLM episodes behind an HTTP API, in front of OpenAI-compatible servers."""

    enabled: bool = False
    """Run the gateway (`--gateway`; implied by `--base-url` without `--model`)."""
    host: str = "127.0.0.1"
    """Interface the gateway binds (127.0.0.1: this machine only; any other address requires a token)."""
    port: int = Field(8100, ge=0, le=65535)
    """The gateway's port; 0 picks a free one."""
    base_urls: list[str] = Field(default_factory=list)
    """The upstream OpenAI-compatible server(s), http://HOST:PORT/v1 (default: the vLLM it started)."""
    models: list[str] = Field(default_factory=list)
    """Upstream model names a request may ask for; the first is the default (empty: the served ones,
    or what the upstream's /v1/models lists)."""
    sub_model: str | None = None
    """Upstream model for llm_query sub-calls (default: the request's root model)."""
    tokenizer: str | None = None
    """Model directory (or spec) whose tokenizer counts a chat request's `max_tokens` of answer
    (default: the model `serve --model` starts; unset in front of `--base-url`: `max_tokens` is
    refused with 400)."""
    token_env: str | None = None
    """Environment variable holding the bearer token every request must send (unset: none on a
    loopback address; on any other address a new token each start, in
    $RLM_TRAIN_CACHE/serve/gateway-PORT.token, mode 600)."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host names clients may reach the gateway by, besides loopback names, IP addresses and this
    machine's name; others get 403 (DNS rebinding). `.example.org` allows its subdomains, `*` any name."""
    context_dirs: list[str] = Field(default_factory=list)
    """Directories a request's `context_path` may name files in (empty: context files are refused)."""
    max_concurrent: int = bounded(8, ge=1, le=200,
                                  why="each running episode holds a REPL sandbox, and max_sandboxes is at most "
                                      "200")
    """Episodes running at once."""
    max_queue: int = bounded(32, ge=0, le=100_000,
                             why="each waiting request holds its decoded body in memory")
    """Episodes waiting for a slot; beyond it requests get 429 with Retry-After (decided once the
    request's body is read: a body that trickles in holds no place)."""
    max_sandboxes: int = Field(64, ge=2, le=200)
    """REPL sandboxes all requests hold at once: each running episode's and its child RLMs'. Every
    request gets an even share, max_sandboxes // max_concurrent (its episode's and
    `rlm.child_concurrency` lowered to the rest), so no request takes another's; at most 200 (a
    process holds 256 sandboxes, the fork-server's spares included)."""
    max_body_bytes: int = bounded(32 * 1024 * 1024, ge=1024, le=4 << 30,
                                  why="a body is read whole into memory; 4 GiB")
    """Largest request body (inline context included); larger ones get 413."""
    max_reading_bytes: int = bounded(256 * 1024 * 1024, ge=1024, le=64 << 30,
                                     why="bodies being read are held in memory together; 64 GiB")
    """Bytes of request bodies read at once, before their requests compete for an admission place:
    each body reserves its Content-Length (without one, max_body_bytes) until it is decoded. A body
    that does not fit takes the room of bodies behind the pace of their deadline (they get 408), or
    gets 503 before a byte of it is read."""
    max_client_reading_bytes: int = bounded(64 * 1024 * 1024, ge=1024, le=64 << 30,
                                            why="bodies being read are held in memory together; 64 GiB")
    """The same for one client address (at least max_body_bytes, at most max_reading_bytes): past
    it a body takes the room of that address's bodies behind their pace, or gets 429."""
    max_context_file_bytes: int = bounded(512 * 1024 * 1024, ge=1, le=64 << 30,
                                          why="a context file is read into memory for its episode; 64 GiB")
    """Largest context file a request may name; larger ones get 413."""
    max_body_items: int = bounded(1_000_000, ge=1, le=1_000_000_000,
                                  why="each decoded item costs the gateway ~100 bytes of memory")
    """Most JSON items (array elements, object members) in a request body, counted before it is
    decoded; more get 413 (they would cost the gateway ~100 bytes each, decoded)."""
    max_query_chars: int = bounded(20_000, ge=1, le=10_000_000,
                                   why="the query goes into every root turn's prompt")
    """Longest query; longer ones get 422."""
    header_timeout_s: float = bounded(10.0, gt=0, le=3600,
                                      why="a connection holds its place this long before sending a header")
    """Seconds a connection has to send a request's headers (from connecting, or from its previous
    response); then 408 and the connection is closed (a silent one is just closed)."""
    body_timeout_s: float = bounded(30.0, gt=0, le=3600, why="a body holds its reading room this long")
    """Seconds a request has to send its whole body once its headers are in; then 408 and closed.
    Also the pace a body must keep to hold its room in the reading budget when others need it."""
    max_connections: int = bounded(1000, ge=1, le=1_000_000, why="each open connection is a file descriptor")
    """Open connections (at most half the process's descriptor limit); a new one past the cap evicts
    the connection that has waited longest for its request, or gets 503 if every one is being answered."""
    retry_after_s: int = bounded(2, ge=1, le=3600, why="an hour; clients wait this long before retrying")
    """The Retry-After a 429 sends."""
    keepalive_s: float = bounded(10.0, gt=0, le=3600, why="proxies close a stream silent for long")
    """Streams send a keep-alive (NDJSON ping / SSE comment) after this many quiet seconds."""
    client: ClientOptions = Field(default_factory=ClientOptions)
    """How the gateway talks to the upstream (timeouts, retries, concurrency)."""
    rlm: RLMConfig = Field(default_factory=RLMConfig)
    """Each episode's settings, and the caps of a request's `budget` (a request may lower a budget,
    never raise it above these)."""


class ServeConfig(StrictModel):
    """`rlm-train serve`: vLLM (with --model), the RLM gateway (with --gateway or --base-url), or both."""

    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    """The vLLM server (started only when vllm.model is set)."""
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """The RLM gateway."""
