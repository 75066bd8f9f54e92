import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from vlmrl.errors import UserError
from vlmrl.tasks import get_task
from vlmrl.tasks.parsing import parse_action

TASK = get_task("EZPoints")
WORDS = TASK.make_env().unwrapped.action_words  # the env's words, the task's only source


def make(**kw):
    return gym.make("vlmrl/EZPoints-v0", **kw)


def play(words, ranks, seed=0):
    env = make()
    env.reset(seed=seed, options={"ranks": ranks})
    return [env.step(WORDS.index(w)) for w in words]


def test_check_env_and_spaces():
    env = make(render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    assert env.action_space.n == 13
    assert WORDS == tuple(str(i) for i in range(1, 11)) + ("+", "*", "=")
    assert env.unwrapped.action_words == WORDS
    obs, info = env.reset(seed=0)
    assert obs.shape == (300, 300, 3) and obs.dtype == np.uint8 and np.array_equal(env.render(), obs)






def test_deals_follow_the_paper():
    env = make()
    for seed in range(50):  # the env's own deals
        _, info = env.reset(seed=seed)
        a, b = info["values"]
        assert (a + b == 12 or a * b == 12) and info["solvable"], info
    # many deals from the same draw function, without drawing the image each time
    env.reset(seed=0)
    deal = env.unwrapped._draw_ranks
    plus = first_face = 0
    orders = set()
    n = 4000
    for _ in range(n):
        ranks = deal()
        a, b = (min(r, 10) for r in ranks)
        assert a + b == 12 or a * b == 12, ranks
        assert 2 <= a <= 10 and 2 <= b <= 10
        assert sum(r > 10 for r in ranks) <= 1  # only the first card can be a face card
        plus += a + b == 12
        first_face += ranks[0] > 10
        orders.add((a, b))
    # "*" only for a first value of 2, 3, 4 or 6 (4 of 12 ranks) with probability 1/2: P(+) = 5/6
    assert abs(plus / n - 5 / 6) < 0.03
    # a face card is drawn first with probability 3/12 and lands on the left half the time
    assert abs(first_face / n - 3 / 24) < 0.025
    assert {(2, 10), (10, 2), (3, 4), (4, 3), (2, 6), (6, 2), (6, 6)} <= orders


def test_rewards():
    assert [r[1] for r in play(["3", "+", "9", "="], [3, 9])] == [0, 0, 0, 10]
    assert [r[1] for r in play(["4", "*", "3", "="], [3, 4])] == [0, 0, 0, 10]
    assert play(["3", "+", "9", "="], [3, 9])[-1][2:4] == (True, False)
    assert play(["3", "*", "9", "="], [3, 9])[-1][1:3] == (-1, True)  # 27
    assert play(["9", "+", "="], [3, 9])[-1][1:3] == (-1, True)  # malformed
    assert play(["10", "+", "="], [13, 2])[-1][1:3] == (-1, True)
    assert play(["="], [3, 9])[-1][1:3] == (-1, True)
    # "*" "*" is not a power here (the paper's eval read 2**6)
    assert play(["2", "*", "*", "6", "="], [2, 6])[-1][1:3] == (-1, True)


def test_equals_with_one_card_unused_loses():
    # 12 alone would need both cards: J (10) and 2, formula "10" then "="
    res = play(["10", "="], [11, 2])
    assert res[-1][1:3] == (-1, True) and res[-1][4]["remaining"] == [2]


def test_invalid_number_appends_a_blank_and_goes_on():
    res = play(["5", "3", "3", "+", "9", "="], [3, 9])
    assert [r[1] for r in res] == [-1, 0, -1, 0, 0, 10]
    assert [r[2] for r in res] == [False] * 5 + [True]
    info = res[-1][4]
    assert info["tokens"] == [" ", "3", " ", "+", "9"] and info["formula"] == "  3   + 9"
    assert TASK.info_text(info) == "Current formula:   3   + 9"


def test_truncated_once_the_formula_is_longer_than_five():
    env = make()
    env.reset(seed=0, options={"ranks": [3, 9]})
    for _ in range(6):
        _, r, term, trunc, info = env.step(WORDS.index("+"))
        assert (r, term, trunc) == (0, False, False)
    _, r, term, trunc, info = env.step(WORDS.index("="))
    assert (r, term, trunc) == (-1, False, True) and len(info["tokens"]) == 6
    # at length five "=" still evaluates: two blanks, then 3+9
    res = play(["1", "1", "3", "+", "9", "="], [3, 9])
    assert [r[1] for r in res] == [-1, -1, 0, 0, 0, 10]


def test_bad_input():
    with pytest.raises(UserError):
        make(target_points=13)
    env = make()
    with pytest.raises(UserError):
        env.reset(seed=0, options={"ranks": [3, 9, 1]})
    with pytest.raises(UserError):
        env.reset(seed=0, options={"ranks": [0, 9]})


def test_expert_always_wins_in_four_steps():
    env = make()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        ret, steps, done = 0.0, 0, False
        while not done:
            _, r, term, trunc, info = env.step(TASK.expert_action(info))
            ret, steps, done = ret + r, steps + 1, term or trunc
        assert (ret, steps, term) == (10.0, 4, True), (seed, info)


def test_expert_recovers_after_random_actions_when_it_can():
    env = make()
    _, info = env.reset(seed=0, options={"ranks": [2, 6]})
    *_, info = env.step(WORDS.index("6"))
    assert TASK.thoughts(info, TASK.expert_action(info)) == "Plan 6*2=12; next *."
    *_, info = env.step(WORDS.index("+"))  # 6+2 = 8: hopeless
    a = TASK.expert_action(info)
    assert WORDS[a] == "=" and TASK.thoughts(info, a) == "6+ cannot reach 12; end with =."


def test_text_side():
    env = make()
    _, info = env.reset(seed=0, options={"ranks": [13, 2]})
    assert TASK.read_state(info) == ("10, 2",)
    assert "Current formula: (empty)" in TASK.prompt(info) and '"cards"' in TASK.prompt(info)
    a = TASK.expert_action(info)
    assert TASK.thoughts(info, a) == "Plan 10+2=12; next 10."
    assert TASK.thoughts(info, WORDS.index("7")) == "Unused cards: 10, 2. 7 is not one of them."
    assert TASK.thoughts(info, WORDS.index("*")) == "Unused cards: 10, 2. Try *."
    rng = np.random.default_rng(0)
    for seed in range(5):
        _, info = env.reset(seed=seed)
        for step in range(4):
            for act in range(13):
                text = TASK.response(info, act)
                assert parse_action(text, WORDS, rng)[:2] == (act, True)
                assert len(TASK.thoughts(info, act).split()) <= 20
            *_, info = env.step(TASK.expert_action(info) if step % 2 else int(rng.integers(12)))
