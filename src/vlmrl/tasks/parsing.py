"""Model text -> environment action, the same way for every task.

Following RL4VLM, only what follows the last ``"action":`` counts. The value there is taken as the
JSON string that starts it (or, unquoted, up to the next ``,``, ``}`` or line end). If it names
exactly one legal action word, that is the action; otherwise a random legal action is drawn from the
caller's generator and the step is marked invalid, so training can count and penalise it.

Words are matched whole: "10" is never read as "1", "go to cabinet 12" never as "go to cabinet 1".
A word found only inside a longer legal word that also matched (ALFWorld's "look" inside
"look at bowl 1") does not count separately. The function is pure and never raises on any text.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

_ACTION_KEY = re.compile(r'"action"\s*:')


class Parsed(NamedTuple):
    action: int  # index into the legal words
    valid: bool  # False when the action was drawn at random
    thought: str  # the text before the last "action" key (the chain of thought)


def action_value(text: str) -> str | None:
    """The raw value after the last ``"action":`` key, or None when there is no such key."""
    matches = list(_ACTION_KEY.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].lstrip()
    if rest.startswith('"'):
        end = rest.find('"', 1)
        return rest[1:end] if end >= 0 else rest[1:]
    return re.split(r"[,}\n]", rest, maxsplit=1)[0]


def _spans(word: str, value: str) -> list[tuple[int, int]]:
    """Where ``word`` stands whole in ``value`` (case-insensitive)."""
    # Boundaries only where the word itself starts/ends with a word character, so "+" still matches
    # in "3+" while "1" does not match inside "10".
    left = r"(?<!\w)" if word[:1].isalnum() or word[:1] == "_" else ""
    right = r"(?!\w)" if word[-1:].isalnum() or word[-1:] == "_" else ""
    pattern = left + re.escape(word) + right
    return [m.span() for m in re.finditer(pattern, value, flags=re.IGNORECASE)]


def find_action(value: str, words: Sequence[str]) -> int | None:
    """Index of the one legal word named in ``value``, or None if none or several are."""
    stripped = value.strip().strip(".").strip()
    for i, w in enumerate(words):
        if stripped.casefold() == w.casefold():
            return i
    spans = {i: _spans(w, value) for i, w in enumerate(words) if w}
    spans = {i: s for i, s in spans.items() if s}

    def covered(i: int) -> bool:
        # every occurrence of word i lies inside an occurrence of a longer matched word
        return all(
            any(j != i and a <= s and e <= b and (b - a) > (e - s) for j in spans for a, b in spans[j])
            for s, e in spans[i]
        )

    named = sorted(i for i in spans if not covered(i))
    # identical words listed twice count once
    distinct = {words[i].casefold() for i in named}
    if len(distinct) == 1:
        return named[0]
    return None


def parse_action(text: str, words: Sequence[str], rng: np.random.Generator) -> Parsed:
    """Text -> (action index, valid, thought). Draws from ``rng`` only when the text is invalid."""
    if not words:
        raise ValueError("parse_action needs at least one legal action word")
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    keys = list(_ACTION_KEY.finditer(text))
    thought = text[: keys[-1].start()] if keys else text
    value = action_value(text)
    index = find_action(value, words) if value is not None else None
    if index is None:
        return Parsed(int(rng.integers(len(words))), False, thought)
    return Parsed(index, True, thought)
