"""EZPoints: make 12 from two playing cards with "+" or "*" (RL4VLM's gym-cards rules).

The deal, as in the paper: the first card has rank 2..13 (J, Q, K count 10); when its value is 1, 2, 3,
4 or 6 the second card makes 12 by "*" with probability 1/2, otherwise it makes 12 by "+"; then the two
cards swap places with probability 1/2. Suits are uniform. So every deal has a solution.
``reset(options={"ranks": [r1, r2]})`` deals given ranks instead (for tests and demos).

Actions (Discrete(13)): 0..9 = "1".."10", 10 "+", 11 "*", 12 "=". Step rules are those of Points24
(see ``points24``): an unused card value is appended, any other number gets -1 and a blank; "+" and
"*" are appended with reward 0; "=" gives +10 when the formula equals 12 with both cards used, else
-1, and terminates; a step that starts with the formula longer than 5 tokens is truncated with -1.
All draws come from ``self.np_random``; the formula is evaluated exactly, never with ``eval``.
"""

from __future__ import annotations

from vlmrl.errors import UserError
from vlmrl.tasks.points24 import FormulaCardsEnv, FormulaTask, Layout

TARGET = 12
_DIVISORS = (1, 2, 3, 4, 6)  # values whose partner can make 12 by "*"


class EZPointsEnv(FormulaCardsEnv):
    """Two cards whose values make 12; build the formula token by token. Observation: 300x300 RGB."""

    numbers = tuple(range(1, 11))
    operators = ("+", "*")
    max_length = 5
    layout = Layout(card_w=120, card_h=168, card_top=14, text_top=196, font_size=26)

    def __init__(self, render_mode: str | None = None, **kwargs):
        if kwargs:
            raise UserError(f"EZPoints takes only render_mode, got {', '.join(sorted(kwargs))}")
        super().__init__(TARGET, render_mode)

    n_cards = 2

    def _draw_ranks(self) -> list[int]:
        rng = self.np_random
        first = int(rng.integers(2, 14))
        value = min(first, 10)
        if value in _DIVISORS and rng.random() < 0.5:
            other = TARGET // value
        else:
            other = TARGET - value
        # the partner is drawn as its number (2..10), never as a face card, as in the paper
        ranks = [first, other]
        return ranks[::-1] if rng.random() < 0.5 else ranks


class EZPointsTask(FormulaTask):
    name = "EZPoints"
    env_id = "vlmrl/EZPoints-v0"
    description = (
        "The image shows two playing cards. Build a formula that equals {target} using both cards' values "
        'once, with "+" or "*"; {faces}. Each step writes one number or operator; '
        '"=" checks the formula.'
    )
    state_fields = (("cards", "<the values of the two cards, left to right; {faces}>"),)


TASK = EZPointsTask()
