"""PPO loss terms as pure tensor functions (Schulman et al., 2017), shapes in the docstrings.

One sample is one environment step: its log-prob is the (CoT-weighted) sum over the response tokens,
computed by the policy, so every tensor here is [B], one entry per sample in the minibatch.

KL estimates use the low-variance "k3" estimator (Schulman, "Approximating KL divergence", 2020):
with samples x ~ p and r = q(x) / p(x), KL(p || q) ~= mean((r - 1) - log r), which is unbiased
and never negative per sample.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PPOLoss(NamedTuple):
    """What ``ppo_loss`` returns. ``loss`` carries the gradient; every other field is detached."""

    loss: Tensor  # [] policy_loss + value_coef * value_loss - ent_coef * entropy + kl_coef * kl_ref
    policy_loss: Tensor  # [] clipped surrogate, to minimise
    value_loss: Tensor  # [] 0.5 * (clipped) squared error
    entropy: Tensor  # [] mean entropy (0 when not given)
    kl_ref: Tensor  # [] k3 KL(new || reference) (0 when no reference is given)
    approx_kl: Tensor  # [] k3 KL(old || new), the usual PPO health metric
    clipfrac: Tensor  # [] fraction of samples whose ratio left [1 - clip, 1 + clip]


def kl_k3(logprob: Tensor, other_logprob: Tensor) -> Tensor:
    """Per-sample k3 estimate of KL(p || q) from samples drawn from p.

    Args:
        logprob: [B] log p(x) of samples x ~ p.
        other_logprob: [B] log q(x) of the same samples.
    Returns:
        [B] (r - 1) - log r with r = q(x) / p(x); >= 0, differentiable in both inputs.
    """
    log_r = other_logprob - logprob
    return torch.expm1(log_r) - log_r


def policy_loss(
    new_logprob: Tensor, old_logprob: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate objective, negated so that it is minimised.

    Args:
        new_logprob: [B] log pi_theta(a|s) under the current parameters (carries the gradient).
        old_logprob: [B] log pi_old(a|s) stored at rollout time.
        advantages: [B] (usually normalised) advantages.
        clip: epsilon, the ratio is clipped to [1 - clip, 1 + clip].
    Returns:
        (loss [], clipfrac [] detached, approx_kl [] detached: k3 KL(old || new)).
    """
    log_ratio = new_logprob - old_logprob
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
        approx_kl = kl_k3(old_logprob, new_logprob).mean()
    return loss, clipfrac, approx_kl


def value_loss(new_value: Tensor, old_value: Tensor, returns: Tensor, value_clip: float | None) -> Tensor:
    """0.5 * squared error to the returns, pessimistically clipped around the rollout's value.

    Args:
        new_value: [B] V_theta(s) (carries the gradient).
        old_value: [B] V(s) stored at rollout time.
        returns: [B] GAE returns (advantages + old values).
        value_clip: the new value may move at most this far from ``old_value`` before its error
            stops helping; None for the plain squared error.
    Returns:
        [] loss.
    """
    err = (new_value - returns).pow(2)
    if value_clip is not None:
        clipped = old_value + torch.clamp(new_value - old_value, -value_clip, value_clip)
        err = torch.maximum(err, (clipped - returns).pow(2))
    return 0.5 * err.mean()


def ppo_loss(
    new_logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    new_value: Tensor,
    old_value: Tensor,
    returns: Tensor,
    *,
    clip: float,
    value_clip: float | None,
    value_coef: float = 0.5,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
) -> PPOLoss:
    """The full PPO objective for one minibatch.

    Args:
        new_logprob, old_logprob, advantages: [B], see ``policy_loss``.
        new_value, old_value, returns: [B], see ``value_loss``.
        clip: policy ratio clip epsilon (paper: 0.1).
        value_clip: value clip range or None (the paper's code uses the policy clip, 0.1).
        value_coef: weight of the value loss (paper: 0.5).
        entropy: [B] per-sample entropy of the policy (carries the gradient), or None.
        ent_coef: weight of the entropy bonus (subtracted from the loss).
        ref_logprob: [B] log-prob of the same responses under a frozen reference policy, or None.
        kl_coef: weight of the k3 KL(new || reference) penalty.
    Returns:
        PPOLoss; only ``loss`` carries the gradient.
    """
    pg, clipfrac, approx_kl = policy_loss(new_logprob, old_logprob, advantages, clip)
    vf = value_loss(new_value, old_value, returns, value_clip)
    loss = pg + value_coef * vf
    zero = torch.zeros((), dtype=pg.dtype, device=pg.device)
    ent = zero
    if entropy is not None:
        ent = entropy.mean()
        loss = loss - ent_coef * ent
    kl_ref = zero
    if ref_logprob is not None:
        kl_ref = kl_k3(new_logprob, ref_logprob).mean()
        loss = loss + kl_coef * kl_ref
    return PPOLoss(
        loss=loss,
        policy_loss=pg.detach(),
        value_loss=vf.detach(),
        entropy=ent.detach(),
        kl_ref=kl_ref.detach(),
        approx_kl=approx_kl,
        clipfrac=clipfrac,
    )


def normalize_advantages(advantages: Tensor, eps: float = 1e-5) -> Tensor:
    """(A - mean) / (std + eps) over all elements, any shape; the paper's code uses eps 1e-5.

    std is the unbiased one; with a single element only the mean is removed (std is undefined).
    """
    centred = advantages - advantages.mean()
    if advantages.numel() < 2:
        return centred
    return centred / (advantages.std() + eps)


def explained_variance(values: Tensor, returns: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over all elements; nan when the returns are constant.

    1 is a perfect value function, 0 is no better than predicting the mean, negative is worse.
    """
    values = values.detach().double().flatten()
    returns = returns.detach().double().flatten()
    if returns.numel() == 0:
        return float("nan")
    var = returns.var(unbiased=False)
    if var.item() == 0.0:
        return float("nan")
    return float(1.0 - (returns - values).var(unbiased=False) / var)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution over the last dimension.

    Args:
        logits: [..., V] unnormalised scores.
    Returns:
        [...] entropy in nats (the policy averages it over response tokens to get one per sample).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Clamp so masked (-inf) logits give 0 * finite = 0 instead of 0 * -inf = nan.
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def lr_factors(update: int, total: int, *, schedule: str = "cosine", end_ratio: float = 0.0,
               warmup: int = 0) -> tuple[float, float]:
    """Multipliers of the base learning rates at ``update`` (0-based): (policy, value head).

    The value head follows the schedule ("cosine" from 1 to ``end_ratio`` over ``total`` updates, or
    "constant" 1) from the first update; the policy also rises linearly over the first ``warmup``
    updates, ``(update + 1) / warmup``, so the freshly initialised value head fits the returns before
    its advantages steer the policy (with a critic that explains nothing, every step of a winning
    episode gets a positive advantage, a malformed response included).

    Args:
        update: updates done so far (>= 0).
        total: updates the cosine spans (then it stays at ``end_ratio``).
        schedule: "cosine" or "constant".
        end_ratio: end lr / base lr of the cosine, in [0, 1].
        warmup: policy warm-up updates (0: none).
    Returns:
        (policy multiplier, value-head multiplier), each in (0, 1].
    """
    from vlmrl.algorithms.schedule import cosine_schedule

    if schedule == "constant":
        value = 1.0
    elif schedule == "cosine":
        value = cosine_schedule(update, total, end_ratio=end_ratio)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    ramp = min(1.0, (update + 1) / warmup) if warmup > 0 else 1.0
    return ramp * value, value
