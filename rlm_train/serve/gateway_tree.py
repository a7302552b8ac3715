"""How big a call tree one gateway request may grow: its share of what all requests use.

Admission bounds the episodes (`max_concurrent`), but an episode's child RLMs each hold a
sandbox and its sub-calls each hold an upstream connection. So every request gets an even
share of the gateway's sandboxes (`max_sandboxes`) and of the upstream's connections
(`client.max_concurrency`), whatever the others do: a request that fans out waits on its own
share (rlm/budget.py's SandboxSlots, rlm/loop.py's sub-call bound), never on anyone else's.
"""

from __future__ import annotations

from rlm_train.errors import UserError
from rlm_train.rlm import RLMConfig
from rlm_train.serve.config import GatewayConfig


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
