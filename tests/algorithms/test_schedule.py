"""The learning-rate schedule against values worked out by hand (PPO: cosine per update; SFT: warmup first)."""

import math

import pytest
import torch

from vlmrl.algorithms import cosine_schedule


def test_cosine_from_one_to_the_end_ratio_then_flat():
    # PPO's use: lr 1e-3 to end_lr 1e-4 over 4 updates, end_ratio 0.1; f = 0.1 + 0.9 * (1 + cos(pi * u / 4)) / 2
    f = [cosine_schedule(u, 4, end_ratio=0.1) for u in range(7)]
    assert f[0] == 1.0
    assert f[1] == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # 0.86820
    assert f[2] == pytest.approx(0.55)
    assert f[3] == pytest.approx(0.1 + 0.45 * (1 - math.sqrt(0.5)))  # 0.23180
    assert f[4] == f[5] == f[6] == pytest.approx(0.1)  # past the span it stays at the end


def test_linear_warmup_then_cosine():
    # warmup 4 of 10 steps: (s + 1) / 4, then the cosine over the remaining 6 to 0
    f = [cosine_schedule(s, 10, warmup=4) for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[7] == pytest.approx(0.5) and f[10] == f[11] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_sft_schedule_warms_up_then_decays_to_the_floor():
    f = [cosine_schedule(s, 100, warmup=10, end_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_end_ratio_one_is_constant_and_lambda_lr_applies_it():
    assert {cosine_schedule(s, 5, end_ratio=1.0) for s in range(8)} == {1.0}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: cosine_schedule(u, 2, end_ratio=0.01))
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 0.505e-3, 1e-5])


def test_value_head_lr_is_its_own_group_and_the_policy_warms_up(tiny_model):
    """make_optimizer puts the value head at ppo.value_lr; the trainer's schedule ramps only the policy."""
    import functools

    from vlmrl.algorithms import lr_factors
    from vlmrl.config import PolicyConfig, PPOConfig
    from vlmrl.errors import UserError
    from vlmrl.policy.model import VLMPolicy
    from vlmrl.trainer import make_optimizer

    policy = VLMPolicy.load(tiny_model, PolicyConfig(finetune="full", train_vision=False))
    head = {id(p) for p in policy.value_head.parameters()}
    one = make_optimizer(policy, PPOConfig(lr=1e-4))
    assert len(one.param_groups) == 1
    two = make_optimizer(policy, PPOConfig(lr=1e-4, end_lr=1e-5, value_lr=3e-3, lr_warmup_updates=3))
    rest, value = two.param_groups
    assert {id(p) for p in value["params"]} == head and not head & {id(p) for p in rest["params"]}
    assert len(rest["params"]) + len(value["params"]) == len(one.param_groups[0]["params"])
    sched = torch.optim.lr_scheduler.LambdaLR(two, [functools.partial(
        lambda u, part: lr_factors(u, 10, end_ratio=0.1, warmup=3)[part], part=i) for i in (0, 1)])
    lrs = []
    for _ in range(4):
        lrs.append((rest["lr"], value["lr"]))
        two.step()
        sched.step()
    assert lrs[0] == (pytest.approx(1e-4 / 3), pytest.approx(3e-3))
    assert lrs[3][0] / lrs[3][1] == pytest.approx(1e-4 / 3e-3)  # after the warm-up: the same cosine
    with pytest.raises(UserError, match="value_lr must be > 0"):
        PPOConfig(value_lr=0.0)
    with pytest.raises(UserError, match="lr_warmup_updates must be >= 0"):
        PPOConfig(lr_warmup_updates=-1)
