"""`vlmrl render`: what the agent sees, as PNGs a person can look at.

Each PNG puts the observation on the left and the prompt (plus the expert's answer) on the right.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmrl.tasks import Task
from vlmrl.tasks.base import observation_image

_TEXT_WIDTH = 560
_FONT_SIZE = 13


def compose(observation: np.ndarray | None, text: str) -> Image.Image:
    """Observation image (H x W x 3 uint8, or None for text-only tasks) with ``text`` beside it."""
    font = ImageFont.load_default(size=_FONT_SIZE)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width=_TEXT_WIDTH // 7) or [""])
    line_h = _FONT_SIZE + 4
    img_w, img_h = (0, 0) if observation is None else observation.shape[1::-1]
    height = max(img_h, 16 + line_h * len(lines))
    canvas = Image.new("RGB", (img_w + _TEXT_WIDTH, height), "white")
    if observation is not None:
        canvas.paste(Image.fromarray(np.asarray(observation, dtype=np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((img_w + 8, 8 + i * line_h), line, fill="black", font=font)
    return canvas


def render_episode(task: Task, seed: int, out_dir: str | Path, steps: int = 4, cot: bool = True) -> list[Path]:
    """Play up to ``steps`` expert steps from ``reset(seed)`` and write one PNG per observation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = task.make_env()
    paths: list[Path] = []
    try:
        obs, info = env.reset(seed=seed)
        for t in range(steps):
            answer = task.expert_response(info, cot)
            image = observation_image(obs)
            text = f"PROMPT\n{task.prompt(info, cot)}\n\nEXPERT ANSWER\n{answer}"
            path = out / f"{task.name}-seed{seed}-step{t}.png"
            compose(image, text).save(path)
            paths.append(path)
            obs, _, terminated, truncated, info = env.step(task.expert_action(info))
            if terminated or truncated:
                break
    finally:
        env.close()
    return paths
