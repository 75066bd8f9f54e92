"""The Gymnasium adapter on plain Gymnasium envs: CliffWalking as an image (render and image
observations), Taxi as text, and one clear UserError for each kind of bad input."""

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from vlmrl.errors import UserError
from vlmrl.tasks.gym_adapter import GymTask, TaskWrapper

CLIFF_WORDS = ("up", "right", "down", "left")  # CliffWalking's actions 0..3
TAXI_WORDS = ("south", "north", "east", "west", "pickup", "dropoff")
TAXI_PLACES = ("red", "green", "yellow", "blue", "in the taxi")


def cliff_task(**kw) -> GymTask:
    return GymTask("Cliff", "CliffWalking-v1", CLIFF_WORDS, "Walk to the bottom right without falling off the cliff.", **kw)


def taxi_text(obs, info) -> str:
    # Taxi's documented encoding: ((row * 5 + col) * 5 + passenger) * 4 + destination
    rest, dest = divmod(int(obs), 4)
    rest, passenger = divmod(rest, 5)
    row, col = divmod(rest, 5)
    return f"Taxi at row {row}, column {col}; passenger {TAXI_PLACES[passenger]}; destination {TAXI_PLACES[dest]}."


def taxi_task(**kw) -> GymTask:
    return GymTask("Taxi", "Taxi-v4", TAXI_WORDS, "Pick the passenger up and drop them at the destination.",
                   image=None, obs_text=taxi_text, **kw)


def checked(env: gym.Env, **kw) -> None:
    """check_env on the wrapped env, which warns only that it is wrapped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, **kw)
    messages = [str(w.message) for w in caught]
    assert all("different from the unwrapped version" in m for m in messages), messages


def test_render_task_observation_is_the_rendered_frame_and_passes_check_env():
    task = cliff_task()
    env = task.make_env()
    assert isinstance(env, TaskWrapper) and env.action_words == CLIFF_WORDS
    obs, info = env.reset(seed=0)
    assert env.observation_space.shape == obs.shape == env.unwrapped.render().shape and obs.dtype == np.uint8
    assert np.array_equal(obs, env.render())
    assert info["obs"] == 36 and tuple(info["action_words"]) == CLIFF_WORDS  # start: row 3, column 0
    assert not task.text_only and task.has_expert is False
    checked(env)


def test_cliff_words_play_their_moves():
    env = cliff_task().make_env()
    obs0, _ = env.reset(seed=0)
    obs, _, _, _, info = env.step(CLIFF_WORDS.index("up"))
    assert info["obs"] == 24 and not np.array_equal(obs, obs0)  # row 2, column 0: the figure moved
    _, _, _, _, info = env.step(CLIFF_WORDS.index("right"))
    assert info["obs"] == 25
    _, reward, _, _, info = env.step(CLIFF_WORDS.index("down"))
    assert info["obs"] == 36 and reward == -100  # stepped on the cliff: back to the start
    _, _, _, _, info = env.step(CLIFF_WORDS.index("left"))
    assert info["obs"] == 36  # the edge


def test_image_observation_env_through_a_factory():
    # Gymnasium's own AddRenderObservation makes the frame the observation
    def factory(**kw):
        return gym.wrappers.AddRenderObservation(gym.make("CliffWalking-v1", render_mode="rgb_array", **kw))

    task = GymTask("CliffPixels", factory, CLIFF_WORDS, "Reach the goal.", image="observation")
    env = task.make_env()
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape and obs.ndim == 3 and "obs" not in info
    # AddRenderObservation itself fails check_env's render-mode loop (it refuses render_mode="human")
    with pytest.raises(ValueError, match="human"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # that it is wrapped
        check_env(env.env)
    checked(env, skip_render_check=True)


def test_text_task_prompts_from_the_observation_and_passes_check_env():
    task = taxi_task(expert=lambda info: 0, thoughts=lambda info, a: "Head south.")
    env = task.make_env()
    obs, info = env.reset(seed=0)
    assert task.text_only and env.observation_space == gym.make("Taxi-v4").observation_space and obs == info["obs"]
    prompt = task.prompt(info)
    assert taxi_text(obs, info) in prompt and "<one of: south | north | east | west | pickup | dropoff>" in prompt
    assert json.loads(task.expert_response(info)) == {"thoughts": "Head south.", "action": "south"}
    _, _, _, _, after = env.step(TAXI_WORDS.index("north"))
    assert taxi_text(after["obs"], after).split(";")[0] != taxi_text(obs, info).split(";")[0] or obs // 100 == 0
    checked(env)


def test_same_seed_same_episode_and_stored_info_gives_the_same_prompt():
    task = taxi_task()

    def episode(seed):
        env = task.make_env()
        _, info = env.reset(seed=seed)
        trace = [task.prompt(info)]
        for a in np.random.default_rng(seed).integers(6, size=30):
            _, reward, terminated, truncated, info = env.step(int(a))
            trace.append((task.prompt(info), reward))
        return trace, info

    (a, last), (b, _), (c, _) = episode(3), episode(3), episode(4)
    assert a == b and a != c
    stored = json.loads(json.dumps({k: v for k, v in last.items() if k != "action_mask"}))  # Taxi's own numpy mask
    assert task.prompt(stored) == a[-1][0]


def test_state_fields_expert_and_random_actions_reach_the_answer():
    task = cliff_task(state_fields=(("cell", "<the cell index>"),), state_text=lambda info: (info["obs"],),
                      expert=lambda info: CLIFF_WORDS.index("up"), random_actions=lambda info: [1, 3])
    env = task.make_env()
    _, info = env.reset(seed=0)
    assert task.has_expert and json.loads(task.expert_response(info)) == {"cell": "36", "thoughts": "", "action": "up"}
    assert '"cell": "<the cell index>"' in task.prompt(info) and list(task.random_actions(info)) == [1, 3]


def test_no_expert_is_one_user_error():
    task = taxi_task()
    _, info = task.make_env().reset(seed=0)
    assert not task.has_expert
    with pytest.raises(UserError, match="needs an expert"):
        task.expert_action(info)


@pytest.mark.parametrize("make, match", [
    (lambda: GymTask("X", "CliffWalking-v1", ("up", "right", "down"), "d").make_env(), r"3 action words .* 4 actions"),
    (lambda: GymTask("X", "Taxi-v4", CLIFF_WORDS, "d", image=None, obs_text=str).make_env(), r"4 action words .* 6 actions"),
    (lambda: GymTask("X", "MountainCarContinuous-v0", ("push",), "d").make_env(), r"Discrete\(n\)"),
    (lambda: GymTask("X", "CliffWalking-v1", ("up", "up", "down", "left"), "d"), r"more than once"),
    (lambda: GymTask("X", "CliffWalking-v1", "udlr", "d"), r"sequence of words"),
    (lambda: GymTask("X", "Taxi-v4", TAXI_WORDS, "d", image=None), r"obs_text"),
    (lambda: GymTask("X", "CliffWalking-v1", CLIFF_WORDS, "d", image="pixels"), r"image must be"),
    (lambda: GymTask("X", "Taxi-v4", TAXI_WORDS, "d", image="observation").make_env(), r"uint8 Box observations"),
    (lambda: GymTask("X", "CliffWalking-v1", CLIFF_WORDS, "d", state_fields=(("a", "b"),)), r"together"),
    (lambda: GymTask("X", "NoSuchEnv-v0", CLIFF_WORDS, "d").make_env(), r"cannot make env 'NoSuchEnv-v0'"),
    (lambda: GymTask("X", lambda **kw: gym.make("CliffWalking-v1", **kw), CLIFF_WORDS, "d").make_env(), r"render_mode='rgb_array'"),
    (lambda: GymTask("X", lambda **kw: "not an env", CLIFF_WORDS, "d").make_env(), r"not a gymnasium.Env"),
])
def test_bad_adapter_input_is_one_user_error(make, match):
    with pytest.raises(UserError, match=match):
        make()


def test_wrapper_refuses_mismatched_words_at_construction():
    with pytest.raises(UserError, match=r"5 action words .* 4 actions"):
        TaskWrapper(gym.make("CliffWalking-v1", render_mode="rgb_array"), CLIFF_WORDS + ("wait",))
