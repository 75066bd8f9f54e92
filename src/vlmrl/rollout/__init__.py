"""Rollouts: the buffer of VLM transitions and its shuffled minibatches."""

from vlmrl.rollout.buffer import RolloutBatch, RolloutBuffer

__all__ = ["RolloutBatch", "RolloutBuffer"]
