"""PPO loss terms against hand computations."""

import math

import pytest
import torch

from vlmrl.algorithms import (
    entropy_from_logits,
    explained_variance,
    kl_k3,
    normalize_advantages,
    policy_loss,
    ppo_loss,
    value_loss,
)

RATIOS = [1.5, 0.5, 1.05, 0.5]
ADV = [1.0, 1.0, -2.0, -1.0]


def ratio_inputs():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    new = (old + torch.log(torch.tensor(RATIOS))).requires_grad_()
    return new, old, torch.tensor(ADV)


def test_policy_loss_clips_by_hand():
    # clip 0.2: min(r*A, clip(r)*A) per sample:
    #   r 1.5,  A  1 -> min(1.5, 1.2)   =  1.2  (clipped, no gradient)
    #   r 0.5,  A  1 -> min(0.5, 0.8)   =  0.5  (pessimistic side: keeps the gradient)
    #   r 1.05, A -2 -> min(-2.1, -2.1) = -2.1
    #   r 0.5,  A -1 -> min(-0.5, -0.8) = -0.8  (clipped, no gradient)
    new, old, adv = ratio_inputs()
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.1 - 0.8) / 4)
    assert clipfrac.item() == pytest.approx(3 / 4)
    # k3 KL(old || new) = (r - 1) - log r averaged
    expected_kl = sum((r - 1) - math.log(r) for r in RATIOS) / 4
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-6)
    loss.backward()
    # d(-r*A/4)/d logp = -r*A/4 where unclipped, 0 where the clipped term is the minimum
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.5 / 4, 1.05 * 2 / 4, 0.0]))


def test_value_loss_clipped_by_hand():
    new = torch.tensor([1.0, 3.0])
    old = torch.tensor([0.0, 2.9])
    returns = torch.tensor([2.0, 2.0])
    # sample 0: (1-2)^2 = 1, clipped value 0 + 0.2 -> (0.2-2)^2 = 3.24 -> max 3.24
    # sample 1: (3-2)^2 = 1, clipped value 2.9 + 0.1 = 3.0 -> 1 -> max 1
    assert value_loss(new, old, returns, 0.2).item() == pytest.approx(0.5 * (3.24 + 1) / 2)
    assert value_loss(new, old, returns, None).item() == pytest.approx(0.5 * (1 + 1) / 2)


def test_kl_k3_by_hand_and_unbiased():
    # p(x) = 0.5, q(x) = 0.25: r = 0.5, k3 = (0.5 - 1) - log 0.5
    k = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert k.item() == pytest.approx(-0.5 + math.log(2))
    # the mean over samples from p approaches the exact KL(p || q)
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_k3(p.log()[x], q.log()[x])
    assert (estimate >= 0).all()
    assert estimate.mean().item() == pytest.approx(exact, abs=3e-3)


def test_ppo_loss_combines_the_terms():
    new, old, adv = ratio_inputs()
    new_v = torch.tensor([1.0, 3.0, 0.0, 0.0], requires_grad=True)
    old_v = torch.tensor([0.0, 2.9, 0.0, 0.0])
    returns = torch.tensor([2.0, 2.0, 0.0, 0.0])
    entropy = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = new.detach() - 0.1  # r = ref / new = exp(-0.1) everywhere
    out = ppo_loss(new, old, adv, new_v, old_v, returns, clip=0.2, value_clip=0.2, value_coef=0.5,
                   entropy=entropy, ent_coef=0.01, ref_logprob=ref, kl_coef=0.3)
    pg = -(1.2 + 0.5 - 2.1 - 0.8) / 4
    vf = 0.5 * (3.24 + 1 + 0 + 0) / 4
    kl = math.exp(-0.1) - 1 + 0.1
    assert out.policy_loss.item() == pytest.approx(pg)
    assert out.value_loss.item() == pytest.approx(vf)
    assert out.entropy.item() == pytest.approx(2.5)
    assert out.kl_ref.item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(pg + 0.5 * vf - 0.01 * 2.5 + 0.3 * kl, rel=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.75)
    assert not out.policy_loss.requires_grad and out.loss.requires_grad
    out.loss.backward()
    assert new.grad is not None and new_v.grad is not None


def test_ppo_loss_without_optional_terms():
    new, old, adv = ratio_inputs()
    v = torch.zeros(4)
    out = ppo_loss(new, old, adv, v, v, v, clip=0.2, value_clip=None)
    assert out.entropy.item() == 0 and out.kl_ref.item() == 0
    assert out.loss.item() == pytest.approx(out.policy_loss.item())


def test_normalize_advantages_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5 / 3)  # unbiased std of 1..4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-5)
    torch.testing.assert_close(normalize_advantages(a), expected)
    assert normalize_advantages(torch.tensor([3.0])).item() == 0.0


def test_explained_variance_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # residual 0,0,0,-1: variance 0.1875; Var(returns) 1.25 -> 1 - 0.15
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0, 5.0]), returns) == pytest.approx(0.85)
    assert explained_variance(returns, returns) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), returns) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones(4)))


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(4), math.log(2)]))


def test_lr_factors_warm_the_policy_up_and_not_the_value_head():
    from vlmrl.algorithms import cosine_schedule, lr_factors

    # 4 warm-up updates of a 10-update cosine to 0.1: the policy ramps 1/4, 2/4, 3/4, then both follow
    # the same cosine (which started at update 0: the warm-up does not shift it)
    for u in range(12):
        pol, val = lr_factors(u, 10, end_ratio=0.1, warmup=4)
        assert val == pytest.approx(cosine_schedule(u, 10, end_ratio=0.1))
        assert pol == pytest.approx(min(1.0, (u + 1) / 4) * val)
    assert lr_factors(0, 10, end_ratio=0.1, warmup=4) == (pytest.approx(0.25), 1.0)
    assert lr_factors(9, 10, end_ratio=0.1)[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factors(30, 10, end_ratio=0.1) == (pytest.approx(0.1), pytest.approx(0.1))  # the floor after
    # constant: 1 but for the warm-up; no warm-up: both equal
    assert [lr_factors(u, 10, schedule="constant", warmup=2)[0] for u in range(3)] == [0.5, 1.0, 1.0]
    assert all(lr_factors(u, 10, end_ratio=0.2)[0] == lr_factors(u, 10, end_ratio=0.2)[1] for u in range(10))
    with pytest.raises(ValueError, match="schedule"):
        lr_factors(0, 10, schedule="linear")
