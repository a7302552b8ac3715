"""This job's token in front of a vLLM server that other nodes reach (GRPO with slurm.vllm_nodes=1).

TRL's server mode needs VLLM_SERVER_DEV_MODE=1, which adds routes that replace the served
weights (/init_weight_transfer_engine, /update_weights), run methods on vLLM's workers
(/collective_rpc) and more. vLLM's own `--api-key` guards only paths under /v1 (/v2,
/inference, /cohere: a path-prefix check, through 0.30 at least), so it cannot close those. `RequireToken` is an ASGI
middleware vLLM loads itself (`--middleware rlm_train.serve.vllm_auth.RequireToken`): every
request but GET /health must carry the job's token, either as `Authorization: Bearer TOKEN`
or as HTTP basic auth with the token as password, which is what TRL's client (a
`requests.Session`) sends for a host listed in the netrc file that $NETRC names.

    python -m rlm_train.serve.vllm_auth HOST   # new token: $RLM_TRAIN_VLLM_TOKEN_FILE and $NETRC, mode 600
    vllm serve MODEL --host 0.0.0.0 --middleware rlm_train.serve.vllm_auth.RequireToken   # reads the first
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

TOKEN_FILE_ENV = "RLM_TRAIN_VLLM_TOKEN_FILE"
MIDDLEWARE = "rlm_train.serve.vllm_auth.RequireToken"
PUBLIC_PATHS = ("/health",)  # the job's health wait (and nothing else) needs no token
NETRC_LOGIN = "rlm-train"


class TokenError(RuntimeError):
    """The token file is missing, empty, or readable by other users."""


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by its owner only (also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_job_token(host: str, token_file: Path, netrc_file: Path) -> None:
    """A new random token in `token_file` (for the server) and a netrc entry for `host` with it
    (for the trainer's HTTP client), both mode 600."""
    token = secrets.token_hex(32)
    write_private(token_file, token + "\n")
    write_private(netrc_file, f"machine {host} login {NETRC_LOGIN} password {token}\n")


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in a file only its owner can read."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
        token = file.read_text().strip()
    except OSError as exc:
        raise TokenError(f"{TOKEN_FILE_ENV}={file}: cannot read it ({exc.strerror or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{TOKEN_FILE_ENV}={file}: other users can read it (mode {stat.S_IMODE(mode):o}); "
                         f"chmod 600 {file}")
    if not token:
        raise TokenError(f"{TOKEN_FILE_ENV}={file}: the file is empty")
    return token


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def presented_token(authorization: str) -> str | None:
    """The token an Authorization header carries: a bearer token, or basic auth's password."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class RequireToken:
    """ASGI middleware: requests without the token in $RLM_TRAIN_VLLM_TOKEN_FILE get 401 (see
    the module docstring). Without a readable private token file it refuses to start."""

    def __init__(self, app: Any) -> None:
        path = os.environ.get(TOKEN_FILE_ENV)
        if not path:
            raise TokenError(f"{MIDDLEWARE}: {TOKEN_FILE_ENV} is not set; point it at a file holding this job's "
                             "token (python -m rlm_train.serve.vllm_auth HOST makes one; slurm/grpo.sbatch does)")
        self.app = app
        self._digest = _digest(read_token(path))

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name.lower() == b"authorization":
                token = presented_token(value.decode("latin-1"))
                return token is not None and secrets.compare_digest(_digest(token), self._digest)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in PUBLIC_PATHS \
                or self.authorized(scope.get("headers") or []):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = b'{"error": "unauthorized: this server answers only its job\'s token"}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def main(argv: list[str]) -> int:
    """`python -m rlm_train.serve.vllm_auth HOST`: a new token in $RLM_TRAIN_VLLM_TOKEN_FILE and a
    netrc entry for HOST in $NETRC (both must be set)."""
    missing = [name for name in (TOKEN_FILE_ENV, "NETRC") if not os.environ.get(name)]
    if len(argv) != 1 or missing:
        print(f"usage: {TOKEN_FILE_ENV}=FILE NETRC=FILE python -m rlm_train.serve.vllm_auth HOST"
              + (f" ({', '.join(missing)} not set)" if missing else ""), file=sys.stderr)
        return 2
    write_job_token(argv[0], Path(os.environ[TOKEN_FILE_ENV]), Path(os.environ["NETRC"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
