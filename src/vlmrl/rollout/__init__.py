"""Rollouts: the buffer of VLM transitions and its shuffled minibatches; the env pools.

The buffer (and torch with it) loads on first use: an env worker process imports this package to
reach ``vlmrl.rollout.pool`` and must not pay for torch.
"""

from typing import Any

__all__ = ["RolloutBatch", "RolloutBuffer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlmrl.rollout import buffer

        return getattr(buffer, name)
    raise AttributeError(f"module 'vlmrl.rollout' has no attribute {name!r}")
