import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from vlmrl.errors import UserError
from vlmrl.tasks import get_task
from vlmrl.tasks.formula import evaluate, tokenize
from vlmrl.tasks.parsing import parse_action
from vlmrl.tasks.points24 import Points24Env

TASK = get_task("Points24")
WORDS = TASK.make_env().unwrapped.action_words  # the env's words, the task's only source


def make(**kw):
    return gym.make("vlmrl/Points24-v0", **kw)


def play(env, words, seed=0, ranks=None):
    """Reset (optionally to given ranks) and step the given words; returns the list of step results."""
    env.reset(seed=seed, options=None if ranks is None else {"ranks": ranks})
    return [env.step(WORDS.index(w)) for w in words]


@pytest.mark.parametrize("kw", [{}, {"treat_face_cards_as_10": False}])
def test_check_env(kw):
    env = make(render_mode="rgb_array", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    assert env.action_space.n == (17 if not kw else 20)


def test_action_words_match_the_paper():
    assert WORDS == tuple(str(i) for i in range(1, 11)) + ("+", "-", "*", "/", "(", ")", "=")
    wide = TASK.make_env(treat_face_cards_as_10=False)
    words = TASK.legal_actions(wide.reset(seed=0)[1])
    assert words[10:13] == ("11", "12", "13") and len(words) == 20 == wide.action_space.n






def test_observation_and_info():
    env = make(render_mode="rgb_array")
    obs, info = env.reset(seed=3)
    assert obs.shape == (300, 300, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert np.array_equal(env.render(), obs)
    assert len(info["cards"]) == 4 and all(v == min(r, 10) for v, r in zip(info["values"], map(rank_of, info["cards"])))
    assert info["remaining"] == info["values"] and info["formula"] == "" and info["target"] == 24
    obs2, *_ = env.step(WORDS.index("("))
    assert not np.array_equal(obs, obs2)  # the formula is drawn


def rank_of(label):
    return {"A": 1, "J": 11, "Q": 12, "K": 13}.get(label) or int(label)


def test_face_cards_count_ten_by_default_and_keep_their_value_on_request():
    env = make()
    _, info = env.reset(seed=0, options={"ranks": [11, 12, 13, 1]})
    assert info["cards"] == ["J", "Q", "K", "A"] and info["values"] == [10, 10, 10, 1]
    wide = make(treat_face_cards_as_10=False)
    _, info = wide.reset(seed=0, options={"ranks": [11, 12, 13, 1]})
    assert info["values"] == [11, 12, 13, 1]
    ws = wide.unwrapped.action_words
    # 12 * (13 - 11) * 1 = 24
    for w in ["12", "*", "(", "13", "-", "11", ")", "*"]:
        _, r, *_ = wide.step(ws.index(w))
        assert r == 0
    wide.step(ws.index("1"))
    assert wide.step(ws.index("="))[1:3] == (10.0, True)


def test_rewards_win_and_exact_division():
    results = play(make(), list("8/(3-8/3)") + ["="], ranks=[8, 8, 3, 3])
    assert [r[1] for r in results] == [0.0] * 9 + [10.0]
    assert results[-1][2] is True and not any(r[2] for r in results[:-1])
    assert results[-1][4]["formula"] == "8 / ( 3 - 8 / 3 )" and results[-1][4]["remaining"] == []


def test_invalid_number_gives_minus_one_appends_a_blank_and_goes_on():
    env = make()
    env.reset(seed=0, options={"ranks": [1, 2, 3, 4]})
    obs, r, term, trunc, info = env.step(WORDS.index("7"))
    assert (r, term, trunc) == (-1.0, False, False)
    assert info["tokens"] == [" "] and info["remaining"] == [1, 2, 3, 4]
    env.step(WORDS.index("2"))
    _, r, *_ , info = env.step(WORDS.index("2"))  # the only 2 is used now
    assert r == -1.0 and info["tokens"] == [" ", "2", " "]


def test_blanks_do_not_break_a_formula():
    results = play(make(), ["4", "9", "*", "3", "*", "2", "*", "1", "="], ranks=[1, 2, 3, 4])
    assert [r[1] for r in results] == [0, -1, 0, 0, 0, 0, 0, 0, 10]


def test_equals_with_a_card_unused_loses():
    results = play(make(), ["10", "+", "10", "+", "4", "="], ranks=[10, 10, 4, 1])
    assert results[-1][1:3] == (-1.0, True)  # 24, but the ace is unused


def test_wrong_value_malformed_and_division_by_zero_lose_without_crashing():
    assert play(make(), ["1", "+", "2", "+", "3", "+", "4", "="], ranks=[1, 2, 3, 4])[-1][1:3] == (-1.0, True)
    assert play(make(), ["1", "+", "="], ranks=[1, 2, 3, 4])[-1][1:3] == (-1.0, True)
    assert play(make(), ["=",], ranks=[1, 2, 3, 4])[-1][1:3] == (-1.0, True)
    res = play(make(), ["4", "/", "(", "3", "-", "3", ")", "+", "8", "="], ranks=[4, 3, 3, 8])
    assert res[-1][1:3] == (-1.0, True)


def test_truncated_once_the_formula_is_longer_than_20():
    env = make()
    env.reset(seed=0, options={"ranks": [1, 2, 3, 4]})
    for k in range(21):  # 21 parentheses: formula length 21 > 20
        _, r, term, trunc, info = env.step(WORDS.index("("))
        assert (r, term, trunc) == (0.0, False, False)
    _, r, term, trunc, info = env.step(WORDS.index("="))
    assert (r, term, trunc) == (-1.0, False, True)
    assert len(info["tokens"]) == 21  # the truncating step adds nothing


def test_equals_at_exactly_the_length_limit_still_counts():
    # a formula of four numbers has odd length; a blank (invalid 7) makes it exactly 20 tokens
    words = ["7"] + ["("] * 6 + ["1", "+", "2", "+", "3", ")", "*", "4"] + [")"] * 5
    assert len(words) == 20 and evaluate([w for w in words if w != "7"]) == 24
    res = play(make(), words + ["="], ranks=[1, 2, 3, 4])
    assert res[-2][4]["tokens"][0] == " " and len(res[-2][4]["tokens"]) == 20
    assert [r[1] for r in res] == [-1.0] + [0.0] * 19 + [10.0]
    assert res[-1][2:4] == (True, False)


def test_bad_kwargs_and_actions_are_reported():
    with pytest.raises(UserError):
        make(treat_face_cards_as_10="yes")
    with pytest.raises(UserError):
        Points24Env(render_mode="human")
    env = make()
    with pytest.raises(UserError):
        env.reset(seed=0, options={"ranks": [1, 2, 3]})
    with pytest.raises(UserError):
        env.reset(seed=0, options={"cards": [1, 2, 3, 4]})
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.unwrapped.step(17)


# --- expert and text -------------------------------------------------------------------------------
def run_expert(env, task, seed, random_prob=0.0, rng=None):
    obs, info = env.reset(seed=seed)
    ret, steps, done, first = 0.0, 0, False, info
    while not done:
        a = task.expert_action(info)
        if rng is not None and rng.random() < random_prob:
            a = int(rng.integers(len(task.legal_actions(info))))
        obs, r, term, trunc, info = env.step(a)
        ret, steps, done = ret + r, steps + 1, term or trunc
    return first, ret, steps, trunc


def test_expert_wins_every_solvable_deal_and_ends_unsolvable_ones_at_once():
    env = make()
    solvable = 0
    for seed in range(300):
        first, ret, steps, _ = run_expert(env, TASK, seed)
        if first["solvable"]:
            solvable += 1
            assert ret == 10.0, (seed, first["values"])
        else:
            assert (ret, steps) == (-1.0, 1), (seed, first["values"])
    assert 0.65 < solvable / 300 < 0.82  # exact probability 0.731 with J, Q, K = 10


def test_expert_plan_is_sound_after_random_actions():
    env = make()
    rng = np.random.default_rng(0)
    for seed in range(40):
        obs, info = env.reset(seed=seed)
        done = False
        while not done:
            plan = TASK.plan(info)
            if plan is not None:
                full = info["tokens"] + list(plan)
                assert evaluate(full) == 24 and len(full) <= 20
                used = sorted(int(t) for t in full if t.strip().isdigit())
                assert used == sorted(info["values"])
            a = TASK.expert_action(info) if rng.random() < 0.6 else int(rng.integers(len(WORDS)))
            obs, r, term, trunc, info = env.step(a)
            done = term or trunc


def test_response_parses_back_and_thoughts_are_short():
    env = make()
    rng = np.random.default_rng(0)
    for seed in range(6):
        _, info = env.reset(seed=seed)
        for _ in range(5):
            for a in range(len(WORDS)):
                text = TASK.response(info, a)
                assert parse_action(text, WORDS, rng) == (a, True, text[: text.rindex('"action"')])
                assert len(TASK.thoughts(info, a).split()) <= 20
                assert TASK.response(info, a, cot=False) == '{"action": "%s"}' % WORDS[a]
            _, _, term, trunc, info = env.step(int(rng.integers(len(WORDS) - 1)))  # never "="
            if term or trunc:
                break


def test_thoughts_name_the_plan_or_say_there_is_none():
    env = make()
    _, info = env.reset(seed=0, options={"ranks": [8, 8, 3, 3]})
    a = TASK.expert_action(info)
    assert WORDS[a] == "8" and TASK.thoughts(info, a) == "Plan 8/(3-8/3)=24; next 8."
    assert "not one of them" in TASK.thoughts(info, WORDS.index("5"))
    _, info = env.reset(seed=0, options={"ranks": [1, 1, 1, 1]})
    assert WORDS[TASK.expert_action(info)] == "=" and "No formula" in TASK.thoughts(info, WORDS.index("="))
    assert "Current formula: (empty)" in TASK.prompt(info)
    assert TASK.read_state(info) == ("1, 1, 1, 1",)
    # a formula that can no longer reach 24: the expert ends it
    _, info = env.reset(seed=0, options={"ranks": [1, 2, 3, 4]})
    for w in ["1", "-"]:
        *_, info = env.step(WORDS.index(w))
    *_, info = env.step(WORDS.index("2"))
    *_, info = env.step(WORDS.index("-"))  # 1-2-... cannot reach 24 with 3 and 4
    assert WORDS[TASK.expert_action(info)] == "="
    assert "cannot reach 24" in TASK.thoughts(info, WORDS.index("="))
    assert TASK.info_text(info) == "Current formula: 1 - 2 -"
    assert tokenize(info["tokens"]) == ["1", "-", "2", "-"]


@pytest.mark.parametrize("name", ["EZPoints", "Points24"])
def test_imperfect_player_reads_right_and_writes_well_formed_formulas(name):
    """random_actions: only unused card values, operators between them, "=" at the end."""
    from vlmrl.tasks.formula import evaluate as value_of

    task = get_task(name)
    env = task.make_env()
    rng = np.random.default_rng(0)
    values = []
    for episode in range(60):
        _, info = env.reset(seed=episode)
        for _ in range(20):
            choices = task.random_actions(info)
            _, reward, terminated, truncated, next_info = env.step(int(rng.choice(choices)))
            assert reward != -1.0 or terminated  # never an unavailable number
            if terminated:
                assert not next_info["remaining"]
                values.append(value_of(next_info["tokens"]))
                break
            info = next_info
        else:
            raise AssertionError("the imperfect player never finished its formula")
    # it finishes every episode with a formula of all the cards; only some of them hit the target
    target = info["target"]
    assert len(values) == 60 and 0 < sum(v == target for v in values) < 60
