"""Learning-rate schedules as pure functions of the step: a multiplier of the base rate, the form
``torch.optim.lr_scheduler.LambdaLR`` takes. PPO steps it once per update, SFT once per batch."""

from __future__ import annotations

import math


def cosine_schedule(step: int, total: int, warmup: int = 0, end_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear warmup over the first ``warmup`` steps, ``(step + 1) / warmup`` (the first step already
    learns), then half a cosine from 1 down to ``end_ratio`` over the remaining ``total - warmup``
    steps; ``end_ratio`` from then on.

    Args:
        step: steps taken so far (>= 0).
        total: steps the warmup and the cosine span together.
        warmup: steps of linear warmup (0: none, the cosine starts at 1).
        end_ratio: the floor, end lr / base lr, in [0, 1].
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
