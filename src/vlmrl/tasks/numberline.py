"""NumberLine: move a current number to a target number with "-" and "+" (RL4VLM's gym-cards rules).

Rules, as in the paper's environment: positions 0..max_position; start and target differ; action 0
("-") subtracts one (not below 0), action 1 ("+") adds one (not above max_position). Reward +1 and
the episode terminates when the target is reached, -1 when the distance to the target did not shrink
(including a push against a wall), 0 otherwise. Truncated after 2 * max_position steps.

Unlike the paper's code, every draw comes from ``self.np_random`` (so ``reset(seed=...)`` fixes the
episode) and the start always differs from the target. The digits are drawn about 110 px tall on the
300 px image so that they still span several 14 px patches once a tiny VLM downscales the image.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw

from vlmrl.errors import UserError
from vlmrl.tasks.base import Info, Task
from vlmrl.tasks.cards import draw_label, fit_font, stroke

SIZE = 300
LABEL_H = 34  # ink height of "Target:" / "Current:"
DIGIT_BOX = (150, 110)  # width, height of the area each number fills


def render_numberline(target: int, current: int, size: int = SIZE) -> np.ndarray:
    """The (size, size, 3) uint8 image: "Target: t" above "Current: c", numbers drawn large."""
    # Few distinct states, so cache the pixels; a copy keeps callers from editing the cache.
    return _render(int(target), int(current), int(size)).copy()


@lru_cache(maxsize=512)
def _render(target: int, current: int, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    scale = size / SIZE
    half = size / 2
    label_font = fit_font("Current:", 140 * scale, LABEL_H * scale)
    for row, (label, value) in enumerate((("Target:", target), ("Current:", current))):
        mid = half * row + half / 2  # vertical centre of this row
        # Left-aligned label, vertically centred on the row.
        x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=label_font, stroke_width=stroke(label_font))
        draw.text(
            (8 * scale - x0, mid - (y0 + y1) / 2),
            label,
            font=label_font,
            fill=(0, 0, 0),
            stroke_width=stroke(label_font),
            stroke_fill=(0, 0, 0),
        )
        w, h = DIGIT_BOX[0] * scale, DIGIT_BOX[1] * scale
        box = (size - 8 * scale - w, mid - h / 2, size - 8 * scale, mid + h / 2)
        draw_label(draw, box, str(value), (0, 0, 0))
    # A rule between the rows keeps the two numbers visually apart after downscaling.
    draw.line((0, half, size, half), fill=(160, 160, 160), width=max(1, int(2 * scale)))
    return np.asarray(img, dtype=np.uint8)


class NumberLineEnv(gym.Env):
    """Reach the target number; observation is a 300x300 RGB image, actions Discrete(2): 0 "-", 1 "+"."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    #: action index -> word; published in every info, where the task reads it
    action_words = ("-", "+")

    def __init__(self, max_position: int = 5, render_mode: str | None = None):
        if isinstance(max_position, bool) or not isinstance(max_position, (int, np.integer)) or max_position < 1:
            raise UserError(f"NumberLine max_position must be an integer >= 1, got {max_position!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"NumberLine render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.max_position = int(max_position)
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(self.action_words))
        self.observation_space = spaces.Box(0, 255, shape=(SIZE, SIZE, 3), dtype=np.uint8)
        self.current = 0
        self.target = 0
        self.steps = 0

    def _info(self) -> Info:
        return {"current": self.current, "target": self.target, "max_position": self.max_position,
                "action_words": self.action_words}

    def _obs(self) -> np.ndarray:
        return render_numberline(self.target, self.current)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        n = self.max_position + 1
        self.current = int(self.np_random.integers(n))
        # Target uniform over the other n - 1 positions.
        self.target = (self.current + 1 + int(self.np_random.integers(n - 1))) % n
        self.steps = 0
        return self._obs(), self._info()

    def step(self, action):
        action = int(action)
        if action not in (0, 1):
            raise ValueError(f"NumberLine action must be 0 ('-') or 1 ('+'), got {action}")
        self.steps += 1
        before = abs(self.current - self.target)
        if self.action_words[action] == "-":
            self.current = max(0, self.current - 1)
        else:
            self.current = min(self.max_position, self.current + 1)
        after = abs(self.current - self.target)
        terminated = after == 0
        reward = 1.0 if terminated else (-1.0 if after >= before else 0.0)
        truncated = not terminated and self.steps >= 2 * self.max_position
        return self._obs(), reward, terminated, truncated, self._info()

    def render(self):
        if self.render_mode == "rgb_array":
            return self._obs()
        return None


class NumberLineTask(Task):
    name = "NumberLine"
    env_id = "vlmrl/NumberLine-v0"
    description = (
        "The image shows a target number and your current number. "
        'Each step, "+" adds one to the current number and "-" subtracts one. '
        "Make the current number equal to the target number in as few steps as possible."
    )
    state_fields = (
        ("current number", "<the current number in the image>"),
        ("target number", "<the target number in the image>"),
    )

    def read_state(self, info: Info) -> tuple[str, ...]:
        return str(info["current"]), str(info["target"])

    def state_key(self, info: Info) -> tuple[int, int]:
        # the whole state the image shows and the rewards depend on (the step count only truncates)
        return int(info["current"]), int(info["target"])

    def expert_action(self, info: Info) -> int:
        # Moving toward the target always shortens the distance, so this always wins.
        return self.legal_actions(info).index("+" if info["current"] < info["target"] else "-")

    def thoughts(self, info: Info, action: int) -> str:
        c, t = info["current"], info["target"]
        word = self.legal_actions(info)[action]
        if c == t:
            return f"{c} equals {t}; trying {word}."
        relation = "less than" if c < t else "more than"
        if action == self.expert_action(info):
            return f"{c} is {relation} {t}, so move {word}."
        return f"{c} is {relation} {t}; trying {word}."


TASK = NumberLineTask()
