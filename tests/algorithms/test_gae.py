"""GAE against advantages worked out by hand (gamma = lam = 0.5 keeps the arithmetic exact)."""

import pytest
import torch

from vlmrl.algorithms import gae


def col(*xs):
    """A [T, 1] column: one env."""
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def flags(T, *steps):
    out = torch.zeros(T, 1, dtype=torch.bool)
    for t in steps:
        out[t] = True
    return out


def test_no_episode_end():
    # deltas: 1 + .5*1 - .5 = 1.0 ; 2 + .5*1.5 - 1 = 1.75 ; 3 + .5*2 - 1.5 = 2.5
    # A2 = 2.5, A1 = 1.75 + .25*2.5 = 2.375, A0 = 1 + .25*2.375 = 1.59375
    adv, ret = gae(col(1, 2, 3), col(0.5, 1, 1.5), flags(3), flags(3), torch.tensor([2.0]),
                   gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, col(1.59375, 2.375, 2.5))
    torch.testing.assert_close(ret, col(2.09375, 3.375, 4.0))


def test_termination_in_the_middle_does_not_bootstrap():
    # rewards 1, values 1 2 3 4, terminated at t=1, V(s_4) = 8
    # next values: 2, 0 (terminal), 4, 8 -> deltas 1, -1, 0, 1
    # A3 = 1, A2 = 0 + .25*1 = .25, A1 = -1 (episode ended), A0 = 1 + .25*-1 = .75
    adv, ret = gae(col(1, 1, 1, 1), col(1, 2, 3, 4), flags(4, 1), flags(4), torch.tensor([8.0]),
                   gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, col(0.75, -1.0, 0.25, 1.0))
    torch.testing.assert_close(ret, col(1.75, 1.0, 3.25, 5.0))


def test_truncation_in_the_middle_bootstraps_from_the_final_observation():
    # same rollout cut by a time limit at t=1 where V(final obs) = 10:
    # delta1 = 1 + .5*10 - 2 = 4 -> A1 = 4 (still no carry across the reset), A0 = 1 + .25*4 = 2
    final = col(0, 10, 0, 0)
    adv, _ = gae(col(1, 1, 1, 1), col(1, 2, 3, 4), flags(4), flags(4, 1), torch.tensor([8.0]), final,
                 gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, col(2.0, 4.0, 0.25, 1.0))


def test_two_envs_truncated_at_the_last_step_and_both_flags():
    # env 0: truncated at the last step, so V(final) = 4 is used, not last_value = 100 (the reset obs)
    #   gamma .5, lam 1: delta1 = 1 + .5*4 - 1 = 2; delta0 = 0 + .5*1 - 1 = -.5; A0 = -.5 + .5*2 = .5
    # env 1: terminated and truncated at t=0: termination wins, final value 9 is ignored
    #   delta0 = 2 - 1 = 1 (A0 = 1); delta1 = 0 + .5*2 - 3 = -2 (A1 = -2)
    rewards = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    values = torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    terminated = torch.tensor([[False, True], [False, False]])
    truncated = torch.tensor([[False, True], [True, False]])
    final = torch.tensor([[0.0, 9.0], [4.0, 0.0]])
    adv, ret = gae(rewards, values, terminated, truncated, torch.tensor([100.0, 2.0]), final,
                   gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 1.0], [2.0, -2.0]]))
    torch.testing.assert_close(ret, adv + values)


def test_lambda_one_gamma_one_is_monte_carlo_with_bootstrap():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    last = torch.randn(3, generator=g)
    no = torch.zeros(6, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, no, no, last, gamma=1.0, lam=1.0)
    to_go = rewards.flip(0).cumsum(0).flip(0) + last
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_lambda_zero_is_one_step_td():
    rewards, values = col(1, 2), col(3, 4)
    adv, _ = gae(rewards, values, flags(2), flags(2), torch.tensor([5.0]), gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, col(1 + 0.9 * 4 - 3, 2 + 0.9 * 5 - 4))


def test_truncation_without_final_values_is_refused():
    with pytest.raises(ValueError, match="final_values"):
        gae(col(1, 1), col(0, 0), flags(2), flags(2, 0), torch.tensor([0.0]), gamma=0.9, lam=0.95)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="last_value"):
        gae(col(1, 1), col(0, 0), flags(2), flags(2), torch.tensor([0.0, 1.0]), gamma=0.9, lam=0.95)
