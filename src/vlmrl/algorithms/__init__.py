"""The PPO maths: pure tensor functions with their shapes in the docstrings, no model, no env."""

from vlmrl.algorithms.gae import gae
from vlmrl.algorithms.ppo import (
    PPOLoss,
    entropy_from_logits,
    explained_variance,
    kl_k3,
    normalize_advantages,
    policy_loss,
    ppo_loss,
    value_loss,
)

__all__ = [
    "PPOLoss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_k3",
    "normalize_advantages",
    "policy_loss",
    "ppo_loss",
    "value_loss",
]
