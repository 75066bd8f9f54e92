"""NumberLine: the paper's rules, seeded determinism, big digits, and the task's text side."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import vlmrl.tasks  # noqa: F401  (registers the ids)
from vlmrl.errors import UserError
from vlmrl.tasks import get_task
from vlmrl.tasks.numberline import TASK, NumberLineEnv, render_numberline
from vlmrl.tasks.parsing import parse_action

MINUS, PLUS = 0, 1


def env_at(current: int, target: int, max_position: int = 5) -> NumberLineEnv:
    env = NumberLineEnv(max_position=max_position)
    env.reset(seed=0)
    env.current, env.target, env.steps = current, target, 0
    return env


def test_check_env():
    env = gym.make("vlmrl/NumberLine-v0", render_mode="rgb_array")
    check_env(env.unwrapped)
    assert env.action_space == gym.spaces.Discrete(2)
    assert env.observation_space.shape == (300, 300, 3) and env.observation_space.dtype == np.uint8






def test_reset_start_differs_from_target_and_covers_all_pairs():
    env = NumberLineEnv()
    pairs = set()
    for seed in range(400):
        _, info = env.reset(seed=seed)
        assert info["current"] != info["target"]
        assert info["max_position"] == 5
        pairs.add((info["current"], info["target"]))
    assert pairs == {(c, t) for c in range(6) for t in range(6) if c != t}


@pytest.mark.parametrize(
    "current, target, action, reward, after",
    [
        (2, 4, PLUS, 0.0, 3),  # closer
        (2, 4, MINUS, -1.0, 1),  # farther
        (3, 4, PLUS, 1.0, 4),  # reached
        (5, 4, MINUS, 1.0, 4),  # reached from above
        (0, 3, MINUS, -1.0, 0),  # clamped at 0: not closer
        (5, 2, PLUS, -1.0, 5),  # clamped at max: not closer
        (4, 1, MINUS, 0.0, 3),
    ],
)
def test_reward_rules(current, target, action, reward, after):
    env = env_at(current, target)
    _, r, term, trunc, info = env.step(action)
    assert r == reward
    assert info["current"] == after and info["target"] == target
    assert term == (after == target)
    assert not trunc


@pytest.mark.parametrize("max_position", [3, 5])
def test_truncated_after_twice_max_steps(max_position):
    env = env_at(0, max_position, max_position)
    for step in range(1, 2 * max_position + 1):
        _, r, term, trunc, _ = env.step(MINUS)  # pushes against the wall forever
        assert r == -1.0 and not term
        assert trunc == (step == 2 * max_position)


def test_reaching_on_the_last_step_terminates_not_truncates():
    env = env_at(0, 5)
    for _ in range(5):
        env.step(MINUS)
    results = [env.step(PLUS) for _ in range(5)]
    _, r, term, trunc, _ = results[-1]
    assert r == 1.0 and term and not trunc


def test_digits_are_drawn_large():
    img = render_numberline(target=3, current=7)
    dark = img.sum(-1) < 200
    for top in (0, 150):  # the target row, then the current row
        rows = np.where(dark[top : top + 150, 150:].any(1))[0]
        assert rows.max() - rows.min() + 1 >= 95  # a digit glyph ~100 px tall on the 300 px image
    assert not np.array_equal(img, render_numberline(target=7, current=3))


def test_two_digit_numbers_fit_beside_the_labels():
    img = render_numberline(target=12, current=10)
    dark = img.sum(-1) < 200
    dark[145:156] = False  # the rule between the rows
    assert not dark[:, -4:].any()  # nothing runs off the right edge
    for top in (0, 150):
        cols = np.where(dark[top : top + 150].any(0))[0]
        gaps = np.diff(cols)
        assert gaps.max() >= 8  # a clear gap between the label and the number


def test_render_mode_returns_the_observation():
    env = NumberLineEnv(render_mode="rgb_array")
    obs, _ = env.reset(seed=3)
    assert np.array_equal(env.render(), obs)
    assert NumberLineEnv().render() is None


@pytest.mark.parametrize("bad", [0, -2, 2.5, "5", True])
def test_bad_max_position_raises_user_error(bad):
    with pytest.raises(UserError, match="max_position"):
        NumberLineEnv(max_position=bad)


def test_expert_always_wins():
    env = gym.make("vlmrl/NumberLine-v0")
    for seed in range(200):
        _, info = env.reset(seed=seed)
        start_distance = abs(info["current"] - info["target"])
        rewards = []
        while True:
            _, r, term, trunc, info = env.step(TASK.expert_action(info))
            rewards.append(r)
            if term or trunc:
                break
        assert term and not trunc
        assert rewards == [0.0] * (start_distance - 1) + [1.0]


def test_task_text_side():
    assert get_task("NumberLine") is TASK and get_task("vlmrl/NumberLine-v0") is TASK
    # a stored info: the words come with it, as the env publishes them
    info = {"current": 2, "target": 4, "max_position": 5, "action_words": ("-", "+")}
    assert TASK.read_state(info) == ("2", "4")
    assert TASK.expert_action(info) == PLUS
    assert TASK.expert_action({"current": 5, "target": 1, "max_position": 5, "action_words": ("-", "+")}) == MINUS
    assert TASK.legal_actions(NumberLineEnv().reset(seed=0)[1]) == ("-", "+")
    assert TASK.thoughts(info, PLUS) == "2 is less than 4, so move +."
    assert TASK.thoughts(info, MINUS) == "2 is less than 4; trying -."
    prompt = TASK.prompt(info)
    assert '"current number"' in prompt and '"target number"' in prompt and TASK.description in prompt


def test_responses_parse_back_and_thoughts_are_short():
    rng = np.random.default_rng(0)
    for c in range(6):
        for t in range(6):
            info = {"current": c, "target": t, "max_position": 5, "action_words": ("-", "+")}
            for action in (MINUS, PLUS):
                assert len(TASK.thoughts(info, action).split()) <= 12
                for cot in (True, False):
                    parsed = parse_action(TASK.response(info, action, cot), TASK.legal_actions(info), rng)
                    assert parsed == (action, True, parsed.thought)
