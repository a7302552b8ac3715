"""Running the gateway: uvicorn in a thread of this process (tests, `rlm-train serve`), and
the model names an upstream OpenAI-compatible server lists."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from fastapi import FastAPI

from rlm_train.errors import UserError
from rlm_train.serve.gateway_http import asgi_app, generate_token, guarded_protocol, log, remove_token_file


# ---------------------------------------------------------------------------
# Running it


class GatewayThread:
    """uvicorn serving the gateway in a background thread, on a socket bound before it starts
    (so a port in use is a UserError here, and port 0 is known at once). Its connections are
    guarded (`gateway_http.GuardedH11Protocol`), its refusals logged to stderr; bound to an
    address other machines reach without a token, it makes one (`token_file`)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        from rlm_train.serve.launcher import check_port_free

        self.host = host
        if port:
            check_port_free(host, port, "--gateway-port")
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        gateway = app.state.gateway
        self.token_file = generate_token(gateway, host, self.port)
        if self.token_file is not None:
            print(f"rlm-train serve: the gateway listens on {host} and no --token-env was given: every request "
                  f"but /health must send 'Authorization: Bearer TOKEN', with the token this start made in "
                  f"{self.token_file} (mode 600)", file=sys.stderr, flush=True)
        if not log.handlers:  # the operator's console: one line per refused request
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s rlm-train gateway: %(message)s"))
            log.addHandler(handler)
        config = uvicorn.Config(asgi_app(app), log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                                access_log=False, backlog=2048, ws="none",
                                http=guarded_protocol(gateway.config, gateway.metrics.rejected))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="rlm-gateway", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else (f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{host}:{self.port}"

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> "GatewayThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the RLM gateway did not start on {self.url}: {self.error or 'see the log above'}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(15)
        try:
            self.sock.close()
        except OSError:
            pass
        remove_token_file(self.token_file)

    def __enter__(self) -> "GatewayThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def list_upstream_models(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model ids an OpenAI-compatible server lists at /models (a UserError when it cannot)."""
    import urllib.request

    url = base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key or 'EMPTY'}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            data = json.loads(resp.read())
        return [str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot list the models at {url} ({exc}); is the server up? Or name them with "
                        "--gateway-model NAME") from None
