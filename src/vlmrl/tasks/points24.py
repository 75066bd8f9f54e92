"""Points24: make 24 from four playing cards with + - * / and parentheses (RL4VLM's gym-cards rules).

The formula is built one token per step. Rules, as in the paper's environment (shared with EZPoints):

- a number is legal only while a card of that value is unused; otherwise the step gets -1 and a
  blank (" ") is appended, so the formula still grows, and the episode goes on;
- an operator or parenthesis is appended with reward 0 (no check until "=");
- "=" evaluates the formula: +10 if it equals the target and every card was used, otherwise -1
  (malformed formulas and division by zero included); the episode terminates;
- a step that starts with the formula longer than ``max_length`` (20 here) is truncated with -1.

Differences from the paper's code, all deliberate: every draw comes from ``self.np_random``; the formula
is evaluated exactly over the rationals by ``formula.evaluate`` instead of Python's ``eval`` on the
joined text, so "2" "4" is two numbers (not 24), "*" "*" is not a power and "/" "/" not floor division,
and a formula needs no unary minus (the solver never uses one). Blanks are whitespace, as in the paper.

The image follows the paper's layout (cards in a row, "Formula:" below) with taller cards, so the rank
stays readable when a small VLM downscales the 300 px image to ~112 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw

from vlmrl.errors import UserError
from vlmrl.tasks.base import Info, Task
from vlmrl.tasks.cards import RANK_LABELS, SUITS, blank_canvas, draw_card, font
from vlmrl.tasks.formula import FormulaError, complete, evaluate, is_solvable

SIZE = 300
WIN_REWARD = 10.0
PENALTY = -1.0
BLANK = " "  # what an invalid number appends, as in the paper


@dataclass(frozen=True)
class Layout:
    """Where things go on the 300x300 image."""

    card_w: int
    card_h: int
    card_top: int
    text_top: int  # y of the "Formula:" line
    font_size: int


def draw_cards(img: Image.Image, ranks: Sequence[int], suits: Sequence[int], layout: Layout) -> None:
    draw = ImageDraw.Draw(img)
    n = len(ranks)
    gap = (SIZE - n * layout.card_w) / (n + 1)
    for i, (rank, suit) in enumerate(zip(ranks, suits)):
        x0 = round(gap + i * (layout.card_w + gap))
        y0 = layout.card_top
        draw_card(draw, (x0, y0, x0 + layout.card_w, y0 + layout.card_h), rank, suit)


def draw_formula(img: Image.Image, tokens: Sequence[str], layout: Layout) -> None:
    draw = ImageDraw.Draw(img)
    fnt = font(layout.font_size)
    line_h = round(layout.font_size * 1.2)
    draw.text((10, layout.text_top), "Formula:", font=fnt, fill="white")
    # Greedy wrap at token boundaries; blanks stay whitespace, as in the paper's image.
    lines: list[str] = []
    line: list[str] = []
    for tok in tokens:
        if line and draw.textlength(" ".join(line + [tok]), font=fnt) > SIZE - 20:
            lines.append(" ".join(line))
            line = []
        line.append(tok)
    if line:
        lines.append(" ".join(line))
    for k, text in enumerate(lines):
        draw.text((10, layout.text_top + (k + 1) * line_h), text, font=fnt, fill="white")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _valid_ranks(ranks: Any, n: int) -> bool:
    if not isinstance(ranks, (list, tuple)) or len(ranks) != n:
        return False
    return all(_is_int(r) and 1 <= r <= 13 for r in ranks)


class FormulaCardsEnv(gym.Env):
    """The shared rules of EZPoints and Points24; subclasses deal the cards and set the constants.

    Every info carries ``action_words`` and ``face_values`` (what J, Q, K count), the task's only source
    for its words and text, so the prompt follows options like ``treat_face_cards_as_10``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    n_cards = 4
    numbers: tuple[int, ...] = tuple(range(1, 11))  # the number actions, in action order
    operators: tuple[str, ...] = ("+", "-", "*", "/", "(", ")")
    max_length = 20
    layout = Layout(card_w=66, card_h=150, card_top=12, text_top=178, font_size=24)

    def __init__(self, target: int, render_mode: str | None = None):
        name = type(self).__name__
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"{name} render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.target = int(target)
        self.render_mode = render_mode
        # action index -> word, the one source of the words: published in every info for the task
        self.action_words = tuple(str(n) for n in self.numbers) + self.operators + ("=",)
        self.action_space = spaces.Discrete(len(self.action_words))
        self.face_values = tuple(self._value(r) for r in (11, 12, 13))  # J, Q, K: for the task's text
        self.observation_space = spaces.Box(0, 255, shape=(SIZE, SIZE, 3), dtype=np.uint8)
        self.ranks: list[int] = []
        self.suits: list[int] = []
        self.values: list[int] = []
        self.tokens: list[str] = []
        self.remaining: list[int] = []
        self._table: Image.Image | None = None

    # --- per game ---------------------------------------------------------------------------------
    def _draw_ranks(self) -> list[int]:
        """The ranks (1..13) of a new deal, drawn from self.np_random."""
        raise NotImplementedError

    def _value(self, rank: int) -> int:
        """What a card of this rank counts for in formulas."""
        return min(rank, 10)

    # --- gymnasium --------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """``options={"ranks": [8, 8, 3, 3]}`` deals those ranks (suits still random), e.g. for tests."""
        super().reset(seed=seed)
        name = type(self).__name__
        options = dict(options or {})
        ranks = options.pop("ranks", None)
        if options:
            raise UserError(f"{name}.reset options take only 'ranks', got {', '.join(sorted(options))}")
        if ranks is None:
            ranks = self._draw_ranks()
        elif not _valid_ranks(ranks, self.n_cards):
            raise UserError(f"{name}: options['ranks'] must be {self.n_cards} ranks in 1..13, not {ranks!r}")
        self.ranks = [int(r) for r in ranks]
        self.suits = [int(s) for s in self.np_random.integers(0, len(SUITS), size=self.n_cards)]
        self.values = [self._value(r) for r in self.ranks]
        self.remaining = list(self.values)
        self.tokens = []
        self._table = blank_canvas(SIZE)
        draw_cards(self._table, self.ranks, self.suits, self.layout)
        return self._obs(), self._info()

    def step(self, action):
        a = int(action)
        if not 0 <= a < len(self.action_words):
            raise ValueError(f"action must be in 0..{len(self.action_words) - 1}, got {a}")
        # The length check comes first, before the action is looked at (as in the paper).
        if len(self.tokens) > self.max_length:
            return self._obs(), PENALTY, False, True, self._info()
        word = self.action_words[a]
        if word == "=":
            return self._obs(), self._score(), True, False, self._info()
        if word.isdigit():
            if int(word) not in self.remaining:
                self.tokens.append(BLANK)
                return self._obs(), PENALTY, False, False, self._info()
            self.remaining.remove(int(word))
        self.tokens.append(word)
        return self._obs(), 0.0, False, False, self._info()

    def render(self):
        if self.render_mode == "rgb_array":
            return self._obs()
        return None

    # --- helpers ----------------------------------------------------------------------------------
    def _score(self) -> float:
        if self.remaining:
            return PENALTY
        try:
            value = evaluate(self.tokens)
        except FormulaError:
            return PENALTY
        return WIN_REWARD if value == self.target else PENALTY

    def _obs(self) -> np.ndarray:
        assert self._table is not None, "call reset() before step()"
        img = self._table.copy()
        draw_formula(img, self.tokens, self.layout)
        return np.array(img, dtype=np.uint8)

    def _info(self) -> Info:
        return {
            "cards": [RANK_LABELS[r - 1] for r in self.ranks],
            "suits": [SUITS[s] for s in self.suits],
            "values": list(self.values),
            "remaining": list(self.remaining),
            "formula": " ".join(self.tokens),
            "tokens": list(self.tokens),
            "target": self.target,
            "max_length": self.max_length,
            "solvable": is_solvable(self.values, self.target),
            "face_values": self.face_values,
            "action_words": self.action_words,
        }


class Points24Env(FormulaCardsEnv):
    """Four cards of rank 1..13; make ``target_points`` (24). Observation: 300x300 RGB image.

    Actions (Discrete(17)): 0..9 = "1".."10", then "+", "-", "*", "/", "(", ")", "=". With
    ``treat_face_cards_as_10=False`` J, Q, K keep 11, 12, 13 and the actions "11".."13" follow "10"
    (Discrete(20)), as in the paper.
    """

    def __init__(
        self, treat_face_cards_as_10: bool = True, target_points: int = 24, render_mode: str | None = None
    ):
        if not isinstance(treat_face_cards_as_10, (bool, np.bool_)):
            raise UserError(
                f"Points24 treat_face_cards_as_10 must be True or False, got {treat_face_cards_as_10!r}"
            )
        if not _is_int(target_points) or target_points < 1:
            raise UserError(f"Points24 target_points must be a positive integer, got {target_points!r}")
        self.treat_face_cards_as_10 = bool(treat_face_cards_as_10)
        self.numbers = tuple(range(1, 11 if self.treat_face_cards_as_10 else 14))
        super().__init__(int(target_points), render_mode)

    def _draw_ranks(self) -> list[int]:
        return [int(r) for r in self.np_random.integers(1, 14, size=self.n_cards)]

    def _value(self, rank: int) -> int:
        return min(rank, 10) if self.treat_face_cards_as_10 else rank


# --- the text side ---------------------------------------------------------------------------------
def compact(tokens: Sequence[str]) -> str:
    """The formula without blanks or spaces, e.g. "8/(3-8/3)"."""
    return "".join(t for t in tokens if t != BLANK)


class FormulaTask(Task):
    """Prompt text, expert and thoughts shared by EZPoints and Points24 (everything read from info).

    ``description`` and the ``state_fields`` hints are templates: ``{target}`` and ``{faces}`` (what J,
    Q and K count) are filled from info, so the text follows the env's options.
    """

    def read_state(self, info: Info) -> tuple[str, ...]:
        return (", ".join(str(v) for v in info["values"]),)

    def state_key(self, info: Info) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # the cards (as drawn: "K" and "10" count alike but look different) and the formula so far,
        # blanks included; which cards remain follows from these two
        return tuple(info["cards"]), tuple(info["tokens"])

    def info_text(self, info: Info) -> str:
        return f"Current formula: {info['formula'] if info['tokens'] else '(empty)'}"

    def _fill(self, template: str, info: Info) -> str:
        j, q, k = info["face_values"]
        faces = f"J, Q and K count as {j}" if j == q == k else f"J, Q and K count as {j}, {q} and {k}"
        return template.format(target=info["target"], faces=faces)

    def describe(self, info: Info) -> str:
        return self._fill(self.description, info)

    def state_hints(self, info: Info) -> tuple[tuple[str, str], ...]:
        return tuple((name, self._fill(hint, info)) for name, hint in self.state_fields)

    def arithmetic(self, info: Info) -> tuple[str, ...]:
        """The env's operators that combine two values (not the parentheses), in action order."""
        return tuple(w for w in self.legal_actions(info) if w in ("+", "-", "*", "/"))

    def plan(self, info: Info) -> tuple[str, ...] | None:
        """The shortest way to finish the formula so far (without "="); None if it cannot reach the target."""
        return complete(
            info["tokens"],
            info["remaining"],
            info["target"],
            operators="".join(self.arithmetic(info)),
            parens="(" in self.legal_actions(info),
            max_tokens=info["max_length"] - len(info["tokens"]),
        )

    def expert_action(self, info: Info) -> int:
        rest = self.plan(info)
        # "=" when the formula is finished, and also when it cannot be: ending now costs the least
        word = rest[0] if rest else "="
        return self.legal_actions(info).index(word)

    def random_actions(self, info: Info) -> Sequence[int]:
        """A player who reads the cards right but does not plan: a card still unused where a number
        fits, else an arithmetic operator, "=" once every card is used. No parentheses, so its formulas
        are always well formed (the expert's are too); which cards and operators it picks is random."""
        words = self.legal_actions(info)
        tokens = [t for t in info["tokens"] if t != BLANK]
        arithmetic = self.arithmetic(info)
        wants_number = not tokens or tokens[-1] in (*arithmetic, "(")
        if not info["remaining"]:
            return [words.index("=")]
        if wants_number:
            return sorted({words.index(str(v)) for v in info["remaining"]})
        return [words.index(o) for o in arithmetic]

    def thoughts(self, info: Info, action: int) -> str:
        word = self.legal_actions(info)[action]
        target, so_far = info["target"], compact(info["tokens"])
        rest = self.plan(info)
        expert = rest[0] if rest else "="
        if word == expert:
            if rest is None:
                if not so_far:
                    return f"No formula makes {target} with these cards; end with =."
                return f"{so_far} cannot reach {target}; end with =."
            if not rest:
                return f"{so_far}={target} uses every card; evaluate with =."
            return f"Plan {so_far}{''.join(rest)}={target}; next {word}."
        unused = ", ".join(str(v) for v in info["remaining"]) or "none"
        if word.isdigit() and int(word) not in info["remaining"]:
            return f"Unused cards: {unused}. {word} is not one of them."
        if word == "=":
            return f"Unused cards: {unused}. Evaluate {so_far or 'the empty formula'}."
        return f"Unused cards: {unused}. Try {word}."


class Points24Task(FormulaTask):
    # Options (treat_face_cards_as_10, target_points) go to make_env; words and text follow from info.
    name = "Points24"
    env_id = "vlmrl/Points24-v0"
    description = (
        "The image shows four playing cards. Build a formula that equals {target} using each card's value "
        "exactly once, with +, -, *, / and parentheses; {faces}. Each step writes one number, "
        'operator or parenthesis; "=" checks the formula.'
    )
    state_fields = (("cards", "<the values of the four cards, left to right; {faces}>"),)


TASK = Points24Task()
