"""Envs pickled for checkpoints (``rollout.pool.dumps_env``): constant arrays written by value, the
env read back the same."""

import pickle

import gymnasium as gym
import numpy as np

from vlmrl.rollout.pool import dumps_env
from vlmrl.tasks import get_task


def test_an_image_env_reads_back_the_same_and_is_a_fifth_of_the_size():
    env = get_task("NumberLine").make_env()
    env.reset(seed=3)
    env.step(1)
    plain, compact = pickle.dumps(env), dumps_env(env)
    assert len(compact) < len(plain) / 4  # the Box's low/high/bounded arrays were most of it
    back = pickle.loads(compact)
    assert back.observation_space == env.observation_space
    for name in ("low", "high", "bounded_below", "bounded_above"):
        a, b = getattr(env.observation_space, name), getattr(back.observation_space, name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    for action in (0, 1, 1, 0):
        x, y = env.step(action), back.step(action)
        assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]


def test_constant_arrays_keep_their_exact_bytes():
    values = {
        "nan": np.full((9, 9), np.nan, np.float32),
        "negative_zero": np.full(100, -0.0),
        "mixed_zeros": np.array([0.0] * 50 + [-0.0] * 50),  # equal as numbers, not as bytes
        "ints": np.full((4, 50), 7, np.int16),
        "varied": np.arange(200.0),
        "small": np.zeros(3),
        "fortran": np.asfortranarray(np.ones((20, 20))),
    }
    back = pickle.loads(dumps_env(values))
    for name, a in values.items():
        b = back[name]
        assert b.dtype == a.dtype and b.shape == a.shape and a.tobytes() == b.tobytes(), name


def test_a_plain_gym_env_round_trips():
    env = gym.make("FrozenLake-v1", is_slippery=True)
    env.reset(seed=5)
    back = pickle.loads(dumps_env(env))
    for action in (1, 2, 2, 1):
        assert env.step(action)[:4] == back.step(action)[:4]
