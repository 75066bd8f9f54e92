"""What every registered card environment promises: Gymnasium's checker, and seeded episodes."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

CARD_IDS = ["vlmrl/NumberLine-v0", "vlmrl/EZPoints-v0", "vlmrl/Points24-v0", "vlmrl/Blackjack-v0"]


def rollout(env_id: str, seed: int, steps: int = 50):
    """50 random steps from reset(seed); later episodes continue the env's own np_random (no reseed)."""
    env = gym.make(env_id)
    actions = np.random.default_rng(seed).integers(env.action_space.n, size=steps)
    obs, info = env.reset(seed=seed)
    trace = [(obs, None, info)]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(int(a))
        trace.append((obs, reward, info))
        if terminated or truncated:
            obs, info = env.reset()
            trace.append((obs, None, info))
    env.close()
    return trace


@pytest.mark.parametrize("env_id", CARD_IDS)
def test_check_env_passes(env_id):
    check_env(gym.make(env_id).unwrapped, skip_render_check=False)


@pytest.mark.parametrize("env_id", CARD_IDS)
def test_same_seed_same_50_step_rollout_across_resets(env_id):
    a, b, c = rollout(env_id, 3), rollout(env_id, 3), rollout(env_id, 4)
    assert sum(r is None for _, r, _ in a) >= 2  # several episodes, so resets are covered too
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b, strict=True):
        assert np.array_equal(oa, ob) and ra == rb and ia == ib
    assert len(a) != len(c) or any(ia != ic for (_, _, ia), (_, _, ic) in zip(a, c))
