"""The seed ranges that keep evaluation honest: training and SFT reset their envs below
``HELD_OUT_SEED_BASE``; held-out evaluation uses seeds from it up, so it never replays a training
episode. Every layer that seeds an env reads these, so they live at the bottom of the package."""

from __future__ import annotations

# evaluation episode i of seed s uses HELD_OUT_SEED_BASE + s * HELD_OUT_STRIDE + i
HELD_OUT_SEED_BASE = 1_000_000_000
HELD_OUT_STRIDE = 1_000_000
# SFT demonstration episode i of seed s resets with s * DEMO_STRIDE + i (below the held-out range)
DEMO_STRIDE = 1_000_000


def held_out_seed(seed: int, episode: int) -> int:
    """The reset seed of held-out evaluation episode ``episode`` under evaluation seed ``seed``."""
    return HELD_OUT_SEED_BASE + seed * HELD_OUT_STRIDE + episode


def demo_seed(seed: int, episode: int) -> int:
    """The reset seed of SFT demonstration episode ``episode`` under seed ``seed``."""
    return seed * DEMO_STRIDE + episode


__all__ = ["DEMO_STRIDE", "HELD_OUT_SEED_BASE", "HELD_OUT_STRIDE", "demo_seed", "held_out_seed"]
