"""FrozenLake: Gymnasium's FrozenLake-v1 through the adapter, a new seeded map every episode, a BFS expert."""

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map
from gymnasium.utils.env_checker import check_env

from vlmrl.errors import UserError
from vlmrl.tasks import get_task
from vlmrl.tasks.frozenlake import ACTION_WORDS, goal_distances, lake_info, make_base_env, safe_moves, shortest_moves
from vlmrl.tasks.gym_adapter import TaskWrapper

TASK = get_task("FrozenLake")
OPEN = ["SFFF", "FFFF", "FFFF", "FFFG"]
LAKE = ["SFHF", "FFFH", "HFFF", "HFFG"]


def test_registered_env_is_gymnasiums_frozenlake_and_passes_check_env():
    env = gym.make("vlmrl/FrozenLake-v0")
    assert type(env.unwrapped) is FrozenLakeEnv and env.get_wrapper_attr("action_words") == ACTION_WORDS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    assert all("different from the unwrapped version" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_observation_is_frozenlakes_own_render():
    env = TASK.make_env()
    obs, info = env.reset(seed=0)
    assert obs.shape == (256, 256, 3) and obs.dtype == np.uint8 and np.array_equal(obs, env.unwrapped.render())
    moved, *_ = env.step(safe_moves(info)[0])
    assert not np.array_equal(obs, moved)  # the figure is drawn where it stands


def test_same_reset_seed_same_map_and_episode():
    def episode(seed):
        env = TASK.make_env()
        obs, info = env.reset(seed=seed)
        trace = [(obs, info)]
        for a in np.random.default_rng(seed).integers(4, size=25):
            obs, reward, terminated, truncated, info = env.step(int(a))
            trace.append((obs, info, reward))
            if terminated or truncated:
                obs, info = env.reset()  # unseeded: the next map continues the seeded stream
                trace.append((obs, info))
        return trace

    a, b = episode(7), episode(7)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]
    maps = {tuple(TASK.make_env().reset(seed=s)[1]["map"]) for s in range(40)}
    assert len(maps) > 20  # seeds give different maps
    # the held-out range gives maps too (seeds up to 2**32 and beyond)
    assert TASK.make_env().reset(seed=10**9 + 3)[1]["map"] == TASK.make_env().reset(seed=10**9 + 3)[1]["map"]


def play_expert(env, seed, options=None) -> tuple[float, int, list[str]]:
    _, info = env.reset(seed=seed, options=options)
    ret, steps, done = 0.0, 0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(TASK.expert_action(info))
        ret, steps, done = ret + reward, steps + 1, terminated or truncated
    return ret, steps, info["map"]


def test_bfs_expert_wins_every_generated_non_slippery_map():
    # Gymnasium's FrozenLake and RandomMaps without rendering (the expert reads only info), many maps
    lake = TaskWrapper(make_base_env(render_mode=None), ACTION_WORDS, image=None, extra_info=lake_info)
    for seed in [*range(400), *range(10**9, 10**9 + 100)]:
        ret, steps, desc = play_expert(lake, seed)
        assert ret == 1.0 and steps == goal_distances(desc)[(0, 0)], (seed, desc)
    # bigger maps, where shortest paths detour, drawn by Gymnasium's own generator
    big = TaskWrapper(make_base_env(size=8, render_mode=None), ACTION_WORDS, image=None, extra_info=lake_info)
    for seed in range(100):
        ret, steps, desc = play_expert(big, seed, {"desc": generate_random_map(8, 0.8, seed=seed)})
        assert ret == 1.0 and steps == goal_distances(desc)[(0, 0)], (seed, desc)
    # and through the task's own (rendering) env
    env = TASK.make_env()
    assert all(play_expert(env, seed)[0] == 1.0 for seed in range(20))


def test_slippery_option_reaches_the_env():
    slippery, firm = TASK.make_env(is_slippery=True), TASK.make_env()
    _, info = slippery.reset(seed=0, options={"desc": OPEN})
    firm.reset(seed=0, options={"desc": OPEN})
    assert len(slippery.unwrapped.P[5][2]) == 3 and len(firm.unwrapped.P[5][2]) == 1
    assert info["slippery"] and "slippery" in TASK.prompt(info) and "slippery" not in TASK.prompt(firm.reset(seed=0)[1])
    # 1/3 of moves go where intended: right from the start often slides down (or stays)
    cells = set()
    for seed in range(30):
        slippery.reset(seed=seed, options={"desc": OPEN})
        cells.add(slippery.step(ACTION_WORDS.index("right"))[4]["obs"])
    assert cells == {0, 1, 4}


def test_action_words_play_their_moves():
    env = TASK.make_env()
    _, info = env.reset(seed=0, options={"desc": OPEN})
    assert tuple(TASK.legal_actions(info)) == ACTION_WORDS
    for word, cell in (("left", 0), ("up", 0), ("right", 1), ("down", 5), ("left", 4), ("up", 0)):
        _, _, _, _, info = env.step(ACTION_WORDS.index(word))
        assert info["obs"] == cell, word
    _, info = env.reset(seed=0, options={"desc": LAKE})
    env.step(ACTION_WORDS.index("right"))
    _, reward, terminated, _, info = env.step(ACTION_WORDS.index("right"))
    assert info["obs"] == 2 and terminated and reward == 0  # the hole


def test_cot_answer_reads_position_safe_moves_and_the_plan():
    env = TASK.make_env()
    _, info = env.reset(seed=0, options={"desc": LAKE})
    _, _, _, _, info = env.step(ACTION_WORDS.index("right"))  # row 0, column 1: right is a hole
    assert [ACTION_WORDS[a] for a in safe_moves(info)] == ["left", "down"]
    assert [ACTION_WORDS[a] for a in shortest_moves(info)] == ["down"]
    assert json.loads(TASK.expert_response(info)) == {
        "position": "row 0, column 1", "safe moves": "left, down",
        "thoughts": "Shortest safe path: down.", "action": "down"}
    # the imperfect demonstrator picks among safe moves only, and writes the same plan
    assert list(TASK.random_actions(info)) == safe_moves(info)
    assert json.loads(TASK.response(info, 0))["thoughts"] == "Shortest safe path: down."
    stored = json.loads(json.dumps(info))
    assert TASK.prompt(stored) == TASK.prompt(info) and TASK.expert_response(stored) == TASK.expert_response(info)


def test_episodes_are_truncated_after_five_steps_a_row():
    env = TASK.make_env()
    env.reset(seed=0)
    for step in range(1, 21):
        _, _, terminated, truncated, _ = env.step(ACTION_WORDS.index("up"))  # into the edge, every step
        assert not terminated and truncated == (step == 20)


@pytest.mark.parametrize("kw, options, match", [
    ({"size": 1}, None, "size"),
    ({"p": 0.2}, None, "p "),
    ({"render_mode": "ansi"}, None, "rgb_array"),
    ({}, {"desc": ["SFF", "FFF", "FFG"]}, "4 rows of 4"),
    ({}, {"desc": ["SFFF", "FSFF", "FFFF", "FFFG"]}, "with one S"),
    ({}, {"desc": "SFFFFFFFFFFFFFFG"}, "a list of 4 rows"),
])
def test_bad_options_are_one_user_error(kw, options, match):
    with pytest.raises(UserError, match=match):
        TASK.make_env(**kw).reset(seed=0, options=options)


def test_the_recipe_file_loads_with_every_table_checked():
    from vlmrl import demo

    rec = demo.load_recipe(demo.recipe_file("FrozenLake"))
    assert rec["sft"]["random_action_fraction"] == 1.0 and rec["sft"]["image_size"] == 112
    assert rec["policy"].finetune == "full" and rec["eval"].episodes == 500 and rec["eval"].temperature == 0.2
