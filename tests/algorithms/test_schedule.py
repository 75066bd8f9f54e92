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
