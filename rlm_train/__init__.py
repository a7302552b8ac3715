"""rlm-train: post-training pipeline that turns small open models into Recursive Language Models.

The Python API (`rlm_train.api`, documented there and in README.md, "Python API") is importable
from here: `rlm_train.run_episode_sync(task, policy="scripted")`, `rlm_train.build_policies`,
`rlm_train.run_eval`, `rlm_train.RLMConfig`, ... Names load on first use, so `import rlm_train`
stays light (the REPL worker and `rlm-train --help` import this package).
"""

from typing import Any

from rlm_train.version import __version__

__all__ = ["__version__"]

_API = ("ClientOptions", "EvalConfig", "GenerateConfig", "RLMConfig", "build_policies", "build_policy",
        "run_episode", "run_episode_sync", "run_eval", "run_generate")


def __getattr__(name: str) -> Any:
    if name in _API:
        from rlm_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlm_train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
