"""The maths: pure functions (tensor shapes in the docstrings), no model, no env."""

from vlmrl.algorithms.gae import gae
from vlmrl.algorithms.ppo import (
    PPOLoss,
    entropy_from_logits,
    explained_variance,
    kl_k3,
    lr_factors,
    normalize_advantages,
    policy_loss,
    ppo_loss,
    value_loss,
)
from vlmrl.algorithms.schedule import cosine_schedule

__all__ = [
    "PPOLoss",
    "cosine_schedule",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_k3",
    "lr_factors",
    "normalize_advantages",
    "policy_loss",
    "ppo_loss",
    "value_loss",
]
