"""Blackjack from images: Gymnasium's Blackjack-v1 rules (natural=False, sab=False), drawn as cards.

Rules (Sutton & Barto, Example 5.1): an infinite deck, each card's rank uniform over A..K (J, Q, K
count 10; an ace counts 11 while that does not bust the hand, "usable", else 1). The dealer shows one
card and holds one face down; the player sees both own cards. Action 0 = stand: the dealer draws
until their total is 17 or more (standing on soft 17), then +1 / 0 / -1 by comparison, a dealer bust
being +1. Action 1 = hit: one more card; over 21 ends the episode with -1. A two-card 21 earns no bonus.

The expert is the optimal policy for exactly these rules, computed once by dynamic programming over
the infinite deck (``optimal_action``); ``outcome_probabilities`` gives any policy's exact win, draw
and loss probabilities, which the tests use to check this env and Gymnasium's against each other.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw

from vlmrl.errors import UserError
from vlmrl.tasks.base import Info, Task
from vlmrl.tasks.cards import RANK_LABELS, SUITS, blank_canvas, draw_card, fit_font, stroke

SIZE = 300

# ---- rules ---------------------------------------------------------------------------------------

#: card value (1 = ace, 10 = 10/J/Q/K) -> probability of drawing it from the infinite deck
CARD_PROBS: dict[int, float] = {v: (4 if v == 10 else 1) / 13 for v in range(1, 11)}
#: dealer outcomes, in the order of ``dealer_outcomes``; 22 stands for bust
DEALER_FINALS = (17, 18, 19, 20, 21, 22)


def card_value(rank: int) -> int:
    """Rank 1..13 -> blackjack value 1..10 (aces count 1 here; see ``hand_total``)."""
    return min(rank, 10)


def hand_total(values: list[int] | tuple[int, ...]) -> tuple[int, bool]:
    """(best total, usable ace) of card values 1..10: one ace counts 11 when that does not bust."""
    raw = sum(values)
    usable = 1 in values and raw + 10 <= 21
    return raw + 10 * usable, usable


def _total(raw: int, has_ace: bool) -> tuple[int, bool]:
    usable = has_ace and raw + 10 <= 21
    return raw + 10 * usable, usable


def compare(player: int, dealer: int) -> float:
    """Reward after standing: player and dealer totals (a dealer over 21 has bust)."""
    if dealer > 21:
        return 1.0
    return float(player > dealer) - float(player < dealer)


# ---- exact dynamic programming -------------------------------------------------------------------


@lru_cache(maxsize=None)
def _dealer_from(raw: int, has_ace: bool) -> tuple[float, ...]:
    """Probabilities of the dealer's final total (order ``DEALER_FINALS``) from hard sum ``raw``."""
    total, _ = _total(raw, has_ace)
    if total >= 17:
        out = [0.0] * len(DEALER_FINALS)
        out[DEALER_FINALS.index(min(total, 22))] = 1.0
        return tuple(out)
    acc = np.zeros(len(DEALER_FINALS))
    for v, p in CARD_PROBS.items():
        acc += p * np.asarray(_dealer_from(raw + v, has_ace or v == 1))
    return tuple(acc.tolist())


def dealer_outcomes(upcard: int) -> dict[int, float]:
    """Final dealer total (17..21, 22 = bust) -> probability, given the face-up card's value 1..10.

    The hole card is just one more draw from the infinite deck (no peeking for blackjack).
    """
    return dict(zip(DEALER_FINALS, _dealer_from(upcard, upcard == 1)))


def _stand_probs(total: int, upcard: int) -> tuple[float, float, float]:
    """(win, draw, loss) probabilities of standing on ``total``."""
    win = draw = 0.0
    for final, p in dealer_outcomes(upcard).items():
        r = compare(total, final)
        win += p * (r > 0)
        draw += p * (r == 0)
    return win, draw, 1.0 - win - draw


@lru_cache(maxsize=None)
def _optimal(raw: int, has_ace: bool, upcard: int) -> tuple[float, int]:
    """(expected return, best action) of the optimal player from hard sum ``raw`` <= 21."""
    total, _ = _total(raw, has_ace)
    win, _, loss = _stand_probs(total, upcard)
    stand = win - loss
    hit = 0.0
    for v, p in CARD_PROBS.items():
        hit += p * (-1.0 if raw + v > 21 else _optimal(raw + v, has_ace or v == 1, upcard)[0])
    # Ties go to standing, so the policy is deterministic.
    return (hit, 1) if hit > stand + 1e-12 else (stand, 0)


def optimal_action(player_sum: int, usable_ace: bool, dealer_value: int) -> int:
    """The optimal action (0 stand, 1 hit) for a player total, usable ace flag and dealer upcard 1..10."""
    if player_sum > 21:
        return 0  # already bust: the episode is over and nothing matters
    raw = player_sum - 10 if usable_ace else player_sum
    return _optimal(raw, bool(usable_ace), dealer_value)[1]


Policy = Callable[[int, bool, int], int]  # (player_sum, usable_ace, dealer_value) -> action


def outcome_probabilities(policy: Policy = optimal_action) -> tuple[float, float, float]:
    """Exact (win, draw, loss) probabilities of an episode under a deterministic ``policy``."""

    @lru_cache(maxsize=None)
    def play(raw: int, has_ace: bool, up: int) -> tuple[float, float, float]:
        total, usable = _total(raw, has_ace)
        if policy(total, usable, up) == 0:
            return _stand_probs(total, up)
        bust = (0.0, 0.0, 1.0)
        acc = np.zeros(3)
        for v, p in CARD_PROBS.items():
            acc += p * np.asarray(bust if raw + v > 21 else play(raw + v, has_ace or v == 1, up))
        return tuple(acc.tolist())

    acc = np.zeros(3)
    for up, pu in CARD_PROBS.items():
        for a, pa in CARD_PROBS.items():
            for b, pb in CARD_PROBS.items():
                acc += pu * pa * pb * np.asarray(play(a + b, a == 1 or b == 1, up))
    return tuple(acc.tolist())


# ---- drawing -------------------------------------------------------------------------------------

Card = tuple[int, int]  # (rank 1..13, suit 0..3)


def _draw_row(draw: ImageDraw.ImageDraw, cards: list[Card | None], area: tuple[int, int, int, int]) -> None:
    """Lay cards out left to right in ``area``; more than 5 go on two rows, and cards narrow to fit."""
    x0, y0, x1, y1 = area
    gap = 5
    rows = 1 if len(cards) <= 5 else 2
    per_row = math.ceil(len(cards) / rows)
    w = min(70, int((x1 - x0 - gap * (per_row - 1)) / per_row))
    h = min(105, int((y1 - y0 - gap * (rows - 1)) / rows))
    for i, card in enumerate(cards):
        r, c = divmod(i, per_row)
        left, top = x0 + c * (w + gap), y0 + r * (h + gap)
        rank, suit = card if card is not None else (None, None)
        draw_card(draw, (left, top, left + w, top + h), rank, suit)


def render_blackjack(dealer: list[Card | None], player: list[Card]) -> np.ndarray:
    """The 300x300x3 uint8 image: dealer's cards on top (None = face down), the player's below."""
    img: Image.Image = blank_canvas(SIZE)
    draw = ImageDraw.Draw(img)
    label_font = fit_font("Dealer", 200, 16)
    for text, y in (("Dealer", 4), ("You", 146)):
        sw = stroke(label_font)
        x0, y0, _, _ = draw.textbbox((0, 0), text, font=label_font, stroke_width=sw)
        draw.text((6 - x0, y - y0), text, font=label_font, fill=(255, 255, 255), stroke_width=sw)
    _draw_row(draw, dealer, (6, 26, 294, 140))
    _draw_row(draw, player, (6, 168, 294, 296))
    return np.asarray(img, dtype=np.uint8)


# ---- environment ---------------------------------------------------------------------------------


class BlackjackEnv(gym.Env):
    """Blackjack with a 300x300 RGB observation; actions Discrete(2): 0 stand, 1 hit."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    #: action index -> word (Gymnasium's 0 stand, 1 hit); published in every info, where the task reads it
    action_words = ("stand", "hit")

    def __init__(self, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"Blackjack render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(self.action_words))
        self.observation_space = spaces.Box(0, 255, shape=(SIZE, SIZE, 3), dtype=np.uint8)
        self.dealer: list[Card] = []
        self.player: list[Card] = []
        self.revealed = False  # the dealer's hole card is shown once the player stands

    def _draw(self) -> Card:
        rank = int(self.np_random.integers(1, 14))
        suit = int(self.np_random.integers(len(SUITS)))
        return rank, suit

    def _values(self, hand: list[Card]) -> list[int]:
        return [card_value(rank) for rank, _ in hand]

    def _info(self) -> Info:
        player_sum, usable = hand_total(self._values(self.player))
        shown = self.dealer if self.revealed else self.dealer[:1]
        up_rank = self.dealer[0][0]
        return {
            "player_cards": [RANK_LABELS[r - 1] for r, _ in self.player],
            "player_suits": [SUITS[s] for _, s in self.player],
            "dealer_card": RANK_LABELS[up_rank - 1],
            "player_sum": player_sum,
            "usable_ace": usable,
            # value of the face-up card, 1 for an ace, 10 for 10/J/Q/K (Gymnasium's observation)
            "dealer_value": card_value(up_rank),
            # the dealer's cards in view: the face-up card, then the whole hand after the player stands
            "dealer_cards": [RANK_LABELS[r - 1] for r, _ in shown],
            "dealer_sum": hand_total(self._values(shown))[0],
            "action_words": self.action_words,
        }

    def _obs(self) -> np.ndarray:
        dealer: list[Card | None] = list(self.dealer) if self.revealed else [self.dealer[0], None]
        return render_blackjack(dealer, self.player)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # Same dealing order as Gymnasium: dealer's two cards, then the player's two.
        self.dealer = [self._draw(), self._draw()]
        self.player = [self._draw(), self._draw()]
        self.revealed = False
        return self._obs(), self._info()

    def step(self, action):
        action = int(action)
        if action not in (0, 1):
            raise ValueError(f"Blackjack action must be 0 (stand) or 1 (hit), got {action}")
        if self.action_words[action] == "hit":
            self.player.append(self._draw())
            player_sum, _ = hand_total(self._values(self.player))
            terminated = player_sum > 21
            reward = -1.0 if terminated else 0.0
        else:
            while hand_total(self._values(self.dealer))[0] < 17:
                self.dealer.append(self._draw())
            self.revealed = True
            terminated = True
            reward = compare(hand_total(self._values(self.player))[0], hand_total(self._values(self.dealer))[0])
        return self._obs(), reward, terminated, False, self._info()

    def render(self):
        if self.render_mode == "rgb_array":
            return self._obs()
        return None


# ---- task ----------------------------------------------------------------------------------------


class BlackjackTask(Task):
    name = "Blackjack"
    env_id = "vlmrl/Blackjack-v0"
    description = (
        "The image shows the dealer's face-up card, one face-down dealer card and your cards. "
        "Get a total closer to 21 than the dealer without going over. "
        "J, Q and K count 10; an ace counts 11 unless that takes you over 21, then 1. "
        '"hit" takes one more card; "stand" ends your turn and the dealer draws to 17 or more.'
    )
    state_fields = (
        ("dealer card", "<the dealer's face-up card>"),
        ("your cards", "<your cards, e.g. 7, K>"),
        ("your total", "<the total of your cards>"),
    )

    def read_state(self, info: Info) -> tuple[str, ...]:
        return info["dealer_card"], ", ".join(info["player_cards"]), str(info["player_sum"])

    def state_key(self, info: Info) -> tuple[int, bool, int]:
        # the Markov state of the rules (Sutton & Barto's): the player's total, whether an ace counts
        # 11, and the dealer's face-up value; 7+K and 5+2+K are one state (the deck is infinite)
        return int(info["player_sum"]), bool(info["usable_ace"]), int(info["dealer_value"])

    def expert_action(self, info: Info) -> int:
        # optimal_action speaks Gymnasium's 0 stand / 1 hit; the index is the env's, from its words
        hit = optimal_action(info["player_sum"], info["usable_ace"], info["dealer_value"]) == 1
        return self.legal_actions(info).index("hit" if hit else "stand")

    def thoughts(self, info: Info, action: int) -> str:
        kind = "Soft" if info["usable_ace"] else "Hard"
        hand = f"{kind} {info['player_sum']} against {info['dealer_card']}"
        word = self.legal_actions(info)[action]
        if action == self.expert_action(info):
            return f"{hand}, so {word}."
        return f"{hand}; trying {word}."


TASK = BlackjackTask()
