"""Blackjack: Gymnasium's Blackjack-v1 rules, the exact DP expert, the image, the task's text side."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import vlmrl.tasks  # noqa: F401  (registers the ids)
from vlmrl.tasks import get_task
from vlmrl.tasks.blackjack import (
    TASK,
    BlackjackEnv,
    dealer_outcomes,
    hand_total,
    optimal_action,
    outcome_probabilities,
    render_blackjack,
)
from vlmrl.tasks.cards import CARD_BACK
from vlmrl.tasks.parsing import parse_action

STAND, HIT = 0, 1


def stacked(player, dealer, deck=()):
    """An env in the middle of a hand: given ranks (suit 0), and the ranks the next draws will give."""
    env = BlackjackEnv()
    env.reset(seed=0)
    env.player = [(r, 0) for r in player]
    env.dealer = [(r, 0) for r in dealer]
    cards = iter([(r, 1) for r in deck])
    env._draw = lambda: next(cards)  # a stacked deck: the rules run unchanged on known cards
    return env


def test_check_env():
    env = gym.make("vlmrl/Blackjack-v0", render_mode="rgb_array")
    check_env(env.unwrapped)
    assert env.action_space == gym.spaces.Discrete(2)
    assert env.observation_space.shape == (300, 300, 3)






def test_hand_total():
    assert hand_total([1, 6]) == (17, True)
    assert hand_total([1, 6, 10]) == (17, False)
    assert hand_total([1, 1]) == (12, True)
    assert hand_total([1, 10]) == (21, True)
    assert hand_total([10, 6, 9]) == (25, False)


def test_hit_then_bust():
    env = stacked(player=[10, 3], dealer=[9, 9], deck=[2, 13])
    _, r, term, _, info = env.step(HIT)
    assert (r, term, info["player_sum"]) == (0.0, False, 15)
    _, r, term, trunc, info = env.step(HIT)
    assert (r, term, trunc) == (-1.0, True, False)
    assert info["player_sum"] == 25 and info["player_cards"] == ["10", "3", "2", "K"]


def test_usable_ace_becomes_hard_instead_of_busting():
    env = stacked(player=[1, 6], dealer=[9, 9], deck=[12])
    _, r, term, _, info = env.step(HIT)
    assert info["player_sum"] == 17 and not info["usable_ace"]
    assert (r, term) == (0.0, False)


@pytest.mark.parametrize(
    "dealer, deck, drawn, final",
    [
        ([10, 6], [5], 1, 21),  # 16 draws
        ([10, 6], [1, 9], 1, 17),  # 16 + ace = hard 17 stops
        ([10, 7], [5], 0, 17),  # hard 17 stands
        ([1, 6], [5], 0, 17),  # soft 17 stands (Gymnasium's rule)
        ([2, 3], [1, 1, 5], 2, 17),  # 5, +A = soft 16 draws, +A = soft 17 stands
        ([1, 5], [10, 3], 2, 19),  # soft 16 draws, +10 = hard 16 draws again
    ],
)
def test_dealer_draws_to_17(dealer, deck, drawn, final):
    env = stacked(player=[10, 8], dealer=dealer, deck=deck)
    _, _, term, _, info = env.step(STAND)
    assert term
    assert len(info["dealer_cards"]) == len(dealer) + drawn
    assert info["dealer_sum"] == final


@pytest.mark.parametrize(
    "player, dealer, deck, reward",
    [
        ([10, 8], [10, 8], [], 0.0),  # tie
        ([1, 10], [10, 1], [], 0.0),  # two naturals tie; no bonus (natural=False)
        ([1, 10], [10, 7], [], 1.0),  # a natural just wins +1
        ([10, 9], [10, 8], [], 1.0),
        ([10, 7], [10, 8], [], -1.0),
        ([10, 2], [10, 6], [13], 1.0),  # dealer busts
        ([10, 2], [10, 6], [4], -1.0),  # 12 loses to a dealer's 20
    ],
)
def test_stand_rewards(player, dealer, deck, reward):
    env = stacked(player, dealer, deck)
    _, r, term, trunc, _ = env.step(STAND)
    assert (r, term, trunc) == (reward, True, False)


def test_info_and_image_hide_the_hole_card_until_stand():
    env = BlackjackEnv()
    obs, info = env.reset(seed=5)
    assert set(info) >= {"player_cards", "dealer_card", "player_sum", "usable_ace", "dealer_value"}
    assert info["dealer_cards"] == [info["dealer_card"]]
    back = (obs == np.array(CARD_BACK)).all(-1)[:150].sum()
    assert back > 2000  # a face-down card on the dealer's row
    obs, _, _, _, info = env.step(STAND)
    assert len(info["dealer_cards"]) >= 2 and info["dealer_sum"] >= 17
    assert (obs == np.array(CARD_BACK)).all(-1).sum() == 0


def runs(mask: np.ndarray) -> int:
    """Number of runs of True in a 1-D mask."""
    return int((np.diff(np.concatenate([[0], mask.astype(int), [0]])) == 1).sum())


def test_many_cards_are_all_drawn():
    hand = [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (10, 3), (13, 1)]
    for n in (2, 5, 6, 12):
        img = render_blackjack([(12, 1), None], hand[:n])
        cards = ~(img[166:] == img[299, 299]).all(-1)  # not the table colour, below the "You" label
        bands = cards.any(1)  # card rows are separated by rows of bare table
        assert runs(bands) == (1 if n <= 5 else 2)
        count = 0
        for start in np.where(np.diff(np.concatenate([[0], bands.astype(int)])) == 1)[0]:
            count += runs(cards[start + 1 : start + 20].any(0))
        assert count == n


@pytest.mark.parametrize("upcard, bust", [(2, 0.3536), (6, 0.4232), (10, 0.2121), (1, 0.1153)])
def test_dealer_distribution_matches_published_bust_rates(upcard, bust):
    # Infinite deck, dealer stands on soft 17, no hole-card peek.
    outcomes = dealer_outcomes(upcard)
    assert sum(outcomes.values()) == pytest.approx(1.0)
    assert outcomes[22] == pytest.approx(bust, abs=1e-4)


def test_expert_agrees_with_basic_strategy():
    for dealer in range(1, 11):
        for total in range(17, 22):
            assert optimal_action(total, False, dealer) == STAND
        for total in range(4, 12):
            assert optimal_action(total, False, dealer) == HIT
        for total in range(12, 18):
            assert optimal_action(total, True, dealer) == HIT  # soft 17 or less
        assert optimal_action(19, True, dealer) == STAND
    for dealer in range(2, 7):
        for total in range(13, 17):
            assert optimal_action(total, False, dealer) == STAND
    for dealer in (7, 8, 9, 10, 1):
        for total in range(12, 17):
            assert optimal_action(total, False, dealer) == HIT
    assert optimal_action(12, False, 2) == optimal_action(12, False, 3) == HIT
    assert optimal_action(12, False, 4) == STAND


class RulesOnly(BlackjackEnv):
    """The real env with the picture skipped: drawing takes ~2 ms and never touches the random stream."""

    def _obs(self):
        return None


def play(env, policy, episodes: int, seed: int) -> np.ndarray:
    returns = np.empty(episodes)
    env.reset(seed=seed)
    for i in range(episodes):
        obs, info = env.reset()
        while True:
            obs, r, term, trunc, info = env.step(policy(obs, info))
            if term or trunc:
                break
        returns[i] = r
    return returns


def within_4_se(returns: np.ndarray, exact: np.ndarray) -> bool:
    freq = np.array([(returns > 0).mean(), (returns == 0).mean(), (returns < 0).mean()])
    return bool(np.all(np.abs(freq - exact) < 4 * np.sqrt(exact * (1 - exact) / len(returns))))


def test_this_env_and_gymnasium_match_the_exact_dp_outcomes():
    """Same policy on both envs: win/draw/loss frequencies within 4 standard errors of the exact DP."""
    simple = lambda total, usable, dealer: int(total < 17)  # noqa: E731
    exact = np.array(outcome_probabilities(simple))
    ours = play(RulesOnly(), lambda o, i: simple(i["player_sum"], i["usable_ace"], i["dealer_value"]), 8000, 0)
    gym_env = gym.make("Blackjack-v1", natural=False, sab=False).unwrapped
    theirs = play(gym_env, lambda o, i: simple(o[0], bool(o[2]), o[1]), 8000, 0)
    assert within_4_se(ours, exact) and within_4_se(theirs, exact)


def test_expert_win_rate():
    win, draw, loss = outcome_probabilities()
    assert 0.42 < win < 0.44 and win + draw + loss == pytest.approx(1.0)
    returns = play(RulesOnly(), lambda o, i: TASK.expert_action(i), 8000, 1234)
    assert within_4_se(returns, np.array([win, draw, loss]))
    # and on the registered env, images and all, for a few hundred episodes
    returns = play(gym.make("vlmrl/Blackjack-v0"), lambda o, i: TASK.expert_action(i), 300, 99)
    assert abs((returns > 0).mean() - win) < 4 * np.sqrt(win * (1 - win) / 300)


def test_task_text_side():
    assert get_task("Blackjack") is TASK
    info = BlackjackEnv().reset(seed=11)[1]
    assert TASK.legal_actions(info) == ("stand", "hit")
    dealer, cards, total = TASK.read_state(info)
    assert dealer == info["dealer_card"]
    assert cards.split(", ") == info["player_cards"] and total == str(info["player_sum"])
    soft17 = {"player_cards": ["A", "6"], "dealer_card": "9", "player_sum": 17, "usable_ace": True, "dealer_value": 9,
              "action_words": ("stand", "hit")}
    assert TASK.expert_action(soft17) == HIT
    assert TASK.thoughts(soft17, HIT) == "Soft 17 against 9, so hit."
    assert TASK.thoughts(soft17, STAND) == "Soft 17 against 9; trying stand."


def test_responses_parse_back_and_thoughts_are_short():
    rng = np.random.default_rng(0)
    env = BlackjackEnv()
    for seed in range(30):
        info = env.reset(seed=seed)[1]
        for action in (STAND, HIT):
            assert len(TASK.thoughts(info, action).split()) <= 12
            for cot in (True, False):
                parsed = parse_action(TASK.response(info, action, cot), TASK.legal_actions(info), rng)
                assert parsed.action == action and parsed.valid
