"""How big a call tree one gateway request may grow: its share of what all requests use.

Admission bounds the episodes (`max_concurrent`), but an episode's child RLMs each hold a
sandbox and its sub-calls each hold an upstream connection. So every request gets an even
share of the gateway's sandboxes (`max_sandboxes`) and of the upstream's connections
(`client.max_concurrency`), whatever the others do: a request that fans out waits on its own
share (rlm/budget.py's SandboxSlots, rlm/loop.py's sub-call bound), never on anyone else's.
A client that leaves takes its call tree with it (`unless_client_leaves`, and the streams'
generators), so what it started stops using the shares at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from starlette.requests import Request

from rlm_train.errors import UserError
from rlm_train.rlm import RLMConfig
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway_api import GatewayError
from rlm_train.serve.gateway_http import CLIENT_GONE

T = TypeVar("T")


def fair_share(config: GatewayConfig) -> RLMConfig:
    """The server's RLMConfig with child RLMs and sub-call fan-out lowered to one request's share."""
    children = config.max_sandboxes // config.max_concurrent - 1  # one sandbox is the episode's own
    if children < 1:
        raise UserError(f"gateway.max_sandboxes={config.max_sandboxes} leaves no sandbox for child RLMs: each of the "
                        f"max_concurrent={config.max_concurrent} running requests needs one for its episode and one "
                        f"for rlm_query; set max_sandboxes to at least {2 * config.max_concurrent} or lower max_concurrent")
    # Each request's sub-calls, plus its root's own turn, fit the upstream client's connections.
    fan_out = max(1, config.client.max_concurrency // config.max_concurrent - 1)
    rlm = config.rlm
    return rlm.model_copy(update={"child_concurrency": min(rlm.child_concurrency, children),
                                  "subcall_concurrency": min(rlm.subcall_concurrency, fan_out)})


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work` (an episode whose answer is not streamed), cancelled with its whole call tree when
    the client disconnects first; then GatewayError(CLIENT_GONE), sent to no one. (A stream
    notices a client that left by itself: its generator is closed.)"""
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        left.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # returns once the tree's sandboxes are gone (run_episode)
        raise GatewayError(CLIENT_GONE, "the client left before its answer", "invalid_request_error")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
