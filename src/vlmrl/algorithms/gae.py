"""Generalized advantage estimation over a [T, N] rollout (num_steps x num_envs).

Episode ends are of two kinds, and they are treated differently (Pardo et al., 2018):
- ``terminated``: the MDP really ended, so the value after the step is 0;
- ``truncated`` (a time limit): the episode was cut, the state still has value, so the step
  bootstraps from the value of the final observation of that episode (``final_values``), which the
  rollout must store because the env has already reset to a new episode.
Either kind stops the advantage recursion, so nothing leaks from one episode into the next.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    rewards: Tensor,
    values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    last_value: Tensor,
    final_values: Tensor | None = None,
    *,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns (advantages + values).

    Args:
        rewards: [T, N] reward received after step t.
        values: [T, N] V(s_t), the value of the observation the action at step t was chosen in.
        terminated: [T, N] bool, the episode ended for good at step t (no bootstrap).
        truncated: [T, N] bool, the episode was cut at step t (bootstrap from ``final_values``).
            If both flags are set, termination wins.
        last_value: [N] V(s_T), the value of the observation after the last stored step.
        final_values: [T, N] V of the final observation of the episode cut at step t; read only
            where ``truncated & ~terminated``. Required when any such step exists.
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (advantages [T, N], returns [T, N]) in the dtype of ``values``.
    """
    values = torch.as_tensor(values)
    dtype, device = values.dtype, values.device
    rewards = torch.as_tensor(rewards, dtype=dtype, device=device)
    terminated = torch.as_tensor(terminated, device=device).bool()
    truncated = torch.as_tensor(truncated, device=device).bool()
    last_value = torch.as_tensor(last_value, dtype=dtype, device=device)
    if values.dim() != 2:
        raise ValueError(f"values must be [T, N], got shape {tuple(values.shape)}")
    T, N = values.shape
    for name, t in (("rewards", rewards), ("terminated", terminated), ("truncated", truncated)):
        if t.shape != values.shape:
            raise ValueError(f"{name} must have shape {(T, N)}, got {tuple(t.shape)}")
    if last_value.shape != (N,):
        raise ValueError(f"last_value must have shape {(N,)}, got {tuple(last_value.shape)}")

    cut = truncated & ~terminated
    if final_values is None:
        if bool(cut.any()):
            raise ValueError("final_values is required when a step is truncated (time limit)")
        final_values = torch.zeros_like(values)
    final_values = torch.as_tensor(final_values, dtype=dtype, device=device)
    if final_values.shape != values.shape:
        raise ValueError(f"final_values must have shape {(T, N)}, got {tuple(final_values.shape)}")

    # Value of the state reached after step t: the next stored value while the episode goes on,
    # the stored final observation's value on truncation, 0 on termination.
    next_values = torch.cat([values[1:], last_value[None]], dim=0)
    next_values = torch.where(cut, final_values, next_values)
    next_values = torch.where(terminated, torch.zeros_like(next_values), next_values)
    deltas = rewards + gamma * next_values - values
    carry = (~(terminated | truncated)).to(dtype)  # 0 at an episode end: the recursion restarts

    advantages = torch.zeros_like(values)
    running = torch.zeros(N, dtype=dtype, device=device)
    for t in range(T - 1, -1, -1):
        running = deltas[t] + gamma * lam * carry[t] * running
        advantages[t] = running
    return advantages, advantages + values
