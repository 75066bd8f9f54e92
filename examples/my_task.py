r"""Your own task for vlmrl, complete in one file: "Compare" the two numbers drawn on the image.

Name it by import path, module:attr (the current directory is on the import path, as for `python -m`).
From the repository root:

    vlmrl sft examples.my_task:TASK --model tiny --out runs/compare-sft
    vlmrl train examples.my_task:TASK --model runs/compare-sft --out runs/compare-ppo --updates 3 \
      --set num_envs=32 num_steps=4 max_new_tokens=48 ppo.lr=1e-4 ppo.epochs=2 ppo.minibatch_size=16 \
            ppo.grad_accum_steps=2 ppo.max_grad_norm=1.0 policy.finetune=full
    vlmrl eval examples.my_task:TASK --policy runs/compare-ppo/final --episodes 200

or `my_task:TASK` from inside examples/. `python examples/my_task.py` runs Gymnasium's env checker
and plays the expert.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw, ImageFont

from vlmrl import Task

SIZE, ROUNDS = 300, 3
FONT = ImageFont.load_default(size=110)  # digits tall enough to span several patches of a small VLM


class CompareEnv(gym.Env):
    """Two digits side by side; answer "<", "=" or ">". Three rounds an episode, +1 per right answer,
    -1 per wrong one, so an episode is won (return > 0) with two right answers of three."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}
    # The one source of the action words: action index -> word, published in every info too.
    action_words = ("<", "=", ">")

    def __init__(self, render_mode: str | None = None):
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(self.action_words))
        self.observation_space = spaces.Box(0, 255, shape=(SIZE, SIZE, 3), dtype=np.uint8)
        self.left = self.right = self.round = 0

    def _draw_pair(self) -> None:
        # Every draw from self.np_random, so reset(seed=s) replays the episode; "=" a third of the time.
        self.left = int(self.np_random.integers(10))
        equal = self.np_random.random() < 1 / 3
        self.right = self.left if equal else (self.left + 1 + int(self.np_random.integers(9))) % 10

    def _obs(self) -> np.ndarray:
        img = Image.new("RGB", (SIZE, SIZE), "white")
        draw = ImageDraw.Draw(img)
        for x, value in ((SIZE // 4, self.left), (3 * SIZE // 4, self.right)):
            draw.text((x, SIZE // 2), str(value), font=FONT, fill="black", anchor="mm")
        draw.line((SIZE // 2, 40, SIZE // 2, SIZE - 40), fill=(160, 160, 160), width=3)
        return np.asarray(img, dtype=np.uint8)

    def _info(self) -> dict:
        return {"left": self.left, "right": self.right, "round": self.round, "action_words": self.action_words}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.round = 0
        self._draw_pair()
        return self._obs(), self._info()

    def step(self, action):
        truth = "<" if self.left < self.right else ">" if self.left > self.right else "="
        reward = 1.0 if self.action_words[int(action)] == truth else -1.0
        self.round += 1
        terminated = self.round >= ROUNDS
        if not terminated:
            self._draw_pair()
        return self._obs(), reward, terminated, False, self._info()

    def render(self):
        return self._obs() if self.render_mode == "rgb_array" else None


# Tasks make their env by a registered id: register it when this module is imported.
if "examples/Compare-v0" not in gym.registry:
    gym.register(id="examples/Compare-v0", entry_point=CompareEnv)


class CompareTask(Task):
    # --- what RL needs (PPO, evaluation): the legal actions come from info["action_words"] --------
    name = "Compare"
    env_id = "examples/Compare-v0"
    description = ('The image shows two numbers. Answer "<" if the left number is smaller than the right one, '
                   '">" if it is larger, and "=" if they are equal.')
    # hints for the chain of thought: what to read from the image, before "thoughts" and "action"
    state_fields = (("left number", "<the left number in the image>"), ("right number", "<the right number in the image>"))

    # --- what SFT needs: an expert (optional; without it, `vlmrl train/eval` still work) ----------
    def read_state(self, info: dict) -> tuple[str, ...]:
        return str(info["left"]), str(info["right"])

    def expert_action(self, info: dict) -> int:
        a, b = info["left"], info["right"]
        return self.legal_actions(info).index("<" if a < b else ">" if a > b else "=")

    def thoughts(self, info: dict, action: int) -> str:
        a, b = info["left"], info["right"]
        relation = "less than" if a < b else "more than" if a > b else "equal to"
        return f"{a} is {relation} {b}, so I answer {self.legal_actions(info)[action]}."


TASK = CompareTask()
# Optional: `vlmrl.register_task(TASK)` here would let Python code say get_task("Compare") once this
# module is imported; the import path works everywhere without it.


if __name__ == "__main__":
    from gymnasium.utils.env_checker import check_env

    env = TASK.make_env()
    check_env(env.unwrapped)
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            print(TASK.expert_response(info))
            obs, reward, terminated, truncated, info = env.step(TASK.expert_action(info))
            total, done = total + reward, terminated or truncated
        print(f"seed {seed}: return {total}")
