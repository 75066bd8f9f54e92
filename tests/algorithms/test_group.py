"""Group-relative advantages against hand computations (GRPO, RLOO, GiGPO)."""

import math

import pytest
import torch

from vlmrl.algorithms.group import episode_returns, gigpo_advantages, grpo_advantages, returns_to_go, rloo_advantages

t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
i = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731


def test_grpo_by_hand():
    # group 0: returns 1, 3 (mean 2, std 1); group 1: 5, 5, 8 (mean 6, std sqrt(2)); group 2 alone
    adv = grpo_advantages(t(1, 3, 5, 5, 8, 4), i(0, 0, 1, 1, 1, 2), eps=0.0)
    s = math.sqrt(2)
    assert adv.tolist() == pytest.approx([-1, 1, -1 / s, -1 / s, 2 / s, 0])
    plain = grpo_advantages(t(1, 3, 5, 5, 8, 4), i(0, 0, 1, 1, 1, 2), normalize_std=False)
    assert plain.tolist() == pytest.approx([-1, 1, -1, -1, 2, 0])
    assert grpo_advantages(t(2, 2), i(0, 0)).tolist() == [0, 0]  # all equal: nothing to prefer


def test_rloo_by_hand():
    # group 1: 5 - (5+8)/2 = -1.5, 5 - 6.5 = -1.5, 8 - 5 = 3
    adv = rloo_advantages(t(1, 3, 5, 5, 8, 4), i(0, 0, 1, 1, 1, 2))
    assert adv.tolist() == pytest.approx([-2, 2, -1.5, -1.5, 3, 0])


def test_returns_and_returns_to_go_across_episodes_of_different_lengths():
    # episode 0: rewards 0, 0, 1 (three steps); episode 1: rewards 2 (one step); laid out shuffled
    rewards, episode, step = t(1, 2, 0, 0), i(0, 1, 0, 0), i(2, 0, 0, 1)
    assert episode_returns(rewards, episode, 2).tolist() == [1, 2]
    assert returns_to_go(rewards, episode, step, gamma=0.5).tolist() == pytest.approx([1, 2, 0.25, 0.5])


def test_gigpo_groups_identical_states_across_episodes_of_different_lengths():
    # one group of two episodes that both start in state A (key 7):
    #   episode 0: A -r0-> B -r0-> end with reward 1 at B: steps (A, 0), (B, 1)
    #   episode 1: A -> end with reward 0 (one step)
    # gamma 0.5: returns-to-go: e0: A 0 + 0.5*1 = 0.5, B 1; e1: A 0
    rewards, episode, step = t(0, 1, 0), i(0, 0, 1), i(0, 1, 0)
    group, key = i(0, 0), i(7, 8, 7)
    adv = gigpo_advantages(rewards, episode, step, group, key, gamma=0.5, step_weight=1.0, eps=0.0)
    # episode level: returns 1 and 0 -> +1, -1; step level: anchor A has 0.5 and 0 -> +1, -1; B alone -> 0
    assert adv.tolist() == pytest.approx([1 + 1, 1 + 0, -1 - 1])
    half = gigpo_advantages(rewards, episode, step, group, key, gamma=0.5, step_weight=0.5, eps=0.0)
    assert half.tolist() == pytest.approx([1.5, 1, -1.5])


def test_gigpo_compares_states_only_within_a_group():
    # the same key in two groups is two anchor states, each alone: no step advantage
    adv = gigpo_advantages(t(1, 0), i(0, 1), i(0, 0), i(0, 1), i(3, 3), gamma=0.9, eps=0.0)
    assert adv.tolist() == [0, 0]


def test_truncated_episodes_count_what_they_collected():
    # no bootstrap value: a time-limit episode of two steps returns 0.5 + 0.5 = 1, like a finished one
    rewards, episode = t(0.5, 0.5, 1.0), i(0, 0, 1)
    assert episode_returns(rewards, episode, 2).tolist() == [1, 1]
    assert grpo_advantages(episode_returns(rewards, episode, 2), i(0, 0)).tolist() == [0, 0]
