"""Group-relative advantages (GRPO, RLOO, GiGPO): credit without a value function.

Every estimator works on whole episodes laid out flat, in any order, so it does not care how a rollout
was stored. A *group* is a set of episodes that started from the same state (the envs of a group reset
with the same seed); an episode is compared only with the others of its group.

Shapes: N transitions, E episodes, ``episode[n]`` in ``0..E-1`` names the episode of transition n and
``step[n]`` its position in that episode (0 first); ``group[e]`` names the group of episode e.

- GRPO (Shao et al., 2024): ``(R_e - mean_group) / (std_group + eps)``; every step of episode e gets it.
- RLOO (Ahmadian et al., 2024): ``R_e`` minus the mean of the *other* episodes of its group.
- GiGPO (Feng et al., 2025, arXiv 2505.10978): the GRPO episode advantage plus ``step_weight`` times a
  step advantage. Steps of one group whose states are identical ("anchor states", ``state_key``) form a
  step group; each is scored by its discounted return from that step on, normalised within the step
  group. A state reached once in the group has no one to be compared with: its step advantage is 0.

A time-limit truncation needs no special case here: these estimators use no bootstrap value, so an
episode's return is the reward it collected, truncated or not (the envs of one group share the limit).
"""

from __future__ import annotations

import torch


def episode_returns(rewards: torch.Tensor, episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """Undiscounted return of each episode.

    Args:
        rewards: (N,) float, reward of each transition.
        episode: (N,) long, the episode of each transition.
        num_episodes: E.
    Returns:
        (E,) float.
    """
    return torch.zeros(num_episodes, dtype=rewards.dtype).index_add_(0, episode, rewards)


def returns_to_go(rewards: torch.Tensor, episode: torch.Tensor, step: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return from each transition to the end of its episode.

    Args:
        rewards: (N,) float.
        episode: (N,) long.
        step: (N,) long, position within the episode (each episode's steps are 0..len-1).
        gamma: discount in [0, 1].
    Returns:
        (N,) float: ``sum_{k >= t} gamma^(k-t) r_k`` over the transition's own episode.
    """
    out = torch.zeros_like(rewards)
    # walk each episode backwards: sort by (episode, step) descending, carry the running sum
    order = torch.argsort(episode * (int(step.max()) + 1 if len(step) else 1) + step, descending=True)
    running, current = 0.0, None
    for n in order.tolist():
        if episode[n].item() != current:
            running, current = 0.0, episode[n].item()
        running = float(rewards[n]) + gamma * running
        out[n] = running
    return out


def _group_stats(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group count, mean and (population) std of ``values`` (K,) by ``group`` (K,) -> each (num_groups,)."""
    count = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group, torch.ones_like(values))
    total = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group, values)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group, (values - mean[group]) ** 2)
    return count, mean, (sq / count.clamp(min=1)).sqrt()


def grpo_advantages(returns: torch.Tensor, group: torch.Tensor, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO episode advantages.

    Args:
        returns: (E,) float, one return per episode.
        group: (E,) long, the group of each episode (groups numbered 0..G-1).
        normalize_std: divide by the group's std (Dr. GRPO leaves it out: False).
    Returns:
        (E,) float; 0 for an episode alone in its group, and for a group whose returns are all equal.
    """
    count, mean, std = _group_stats(returns, group, int(group.max()) + 1)
    adv = returns - mean[group]
    if normalize_std:
        adv = adv / (std[group] + eps)
    return torch.where(count[group] > 1, adv, torch.zeros_like(adv))


def rloo_advantages(returns: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO episode advantages: each return minus the mean of the others in its group.

    Args:
        returns: (E,) float.
        group: (E,) long.
    Returns:
        (E,) float; 0 for an episode alone in its group.
    """
    count, mean, _ = _group_stats(returns, group, int(group.max()) + 1)
    n = count[group]
    others = (mean[group] * n - returns) / (n - 1).clamp(min=1)
    return torch.where(n > 1, returns - others, torch.zeros_like(returns))


def gigpo_advantages(rewards: torch.Tensor, episode: torch.Tensor, step: torch.Tensor, group: torch.Tensor,
                     state_key: torch.Tensor, gamma: float, step_weight: float = 1.0,
                     normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GiGPO advantages of every transition: episode-level GRPO plus ``step_weight`` x step-level.

    Args:
        rewards: (N,) float.
        episode: (N,) long, 0..E-1.
        step: (N,) long, position within the episode.
        group: (E,) long, the group of each episode.
        state_key: (N,) long, equal for identical states (a hash id of the task's state key); only
            states within one group are compared.
        gamma: discount of the step-level returns.
    Returns:
        (N,) float.
    """
    num_episodes = len(group)
    episode_adv = grpo_advantages(episode_returns(rewards, episode, num_episodes), group, normalize_std, eps)
    to_go = returns_to_go(rewards, episode, step, gamma)
    # step groups: (group of the episode, state key) pairs, numbered 0..S-1
    pairs = torch.stack([group[episode], state_key], dim=1)
    _, anchor = torch.unique(pairs, dim=0, return_inverse=True)
    count, mean, std = _group_stats(to_go, anchor, int(anchor.max()) + 1 if len(anchor) else 0)
    step_adv = to_go - mean[anchor]
    if normalize_std:
        step_adv = step_adv / (std[anchor] + eps)
    step_adv = torch.where(count[anchor] > 1, step_adv, torch.zeros_like(step_adv))
    return episode_adv[episode] + step_weight * step_adv


__all__ = ["episode_returns", "gigpo_advantages", "grpo_advantages", "returns_to_go", "rloo_advantages"]
