"""Grid: walk the red square onto the green one on a 4x4 grid; a task written only against vlmrl's API.

``vlmrl sft own_task.grid_task:TASK`` (run from tests/) finds it by import path; ``NO_EXPERT`` is the
same env with the RL side only (no expert), for PPO and evaluation from a model.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from vlmrl import Task

N, CELL = 4, 75  # 4 cells of 75 px: the usual 300 px image


class GridEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    action_words = ("up", "down", "left", "right")  # action index -> word, also in every info
    MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(self.action_words))
        self.observation_space = spaces.Box(0, 255, (N * CELL, N * CELL, 3), np.uint8)
        self.agent = self.goal = (0, 0)
        self.steps = 0

    def _obs(self):
        img = np.full((N * CELL, N * CELL, 3), 255, np.uint8)
        for (r, c), colour in ((self.goal, (0, 170, 0)), (self.agent, (220, 0, 0))):
            img[r * CELL + 8:(r + 1) * CELL - 8, c * CELL + 8:(c + 1) * CELL - 8] = colour
        return img

    def _info(self):
        return {"agent": self.agent, "goal": self.goal, "action_words": self.action_words}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        a, g = self.np_random.choice(N * N, size=2, replace=False)  # all randomness from np_random
        self.agent, self.goal, self.steps = divmod(int(a), N), divmod(int(g), N), 0
        return self._obs(), self._info()

    def step(self, action):
        dr, dc = self.MOVES[int(action)]
        self.agent = (min(max(self.agent[0] + dr, 0), N - 1), min(max(self.agent[1] + dc, 0), N - 1))
        self.steps += 1
        terminated = self.agent == self.goal
        truncated = not terminated and self.steps >= 2 * N
        return self._obs(), float(terminated), terminated, truncated, self._info()

    def render(self):
        return self._obs() if self.render_mode == "rgb_array" else None


if "own/Grid-v0" not in gym.registry:
    gym.register(id="own/Grid-v0", entry_point=GridEnv)


class GridNoExpert(Task):  # what RL needs: name, env, description, state hints
    name = "GridNoExpert"
    env_id = "own/Grid-v0"
    description = ("The image shows a 4x4 grid with a red square (you) and a green square (the goal). "
                   "Move the red square onto the green one.")
    state_fields = (("red", "<row,column of the red square>"), ("green", "<row,column of the green square>"))


class GridTask(GridNoExpert):  # ... plus the expert, for SFT
    name = "Grid"

    def read_state(self, info):
        return tuple(f"{r},{c}" for r, c in (info["agent"], info["goal"]))

    def expert_action(self, info):
        (r, c), (gr, gc) = info["agent"], info["goal"]
        word = "down" if gr > r else "up" if gr < r else "right" if gc > c else "left"
        return self.legal_actions(info).index(word)

    def thoughts(self, info, action):
        return f"The green square is at {','.join(map(str, info['goal']))}, so I move {self.legal_actions(info)[action]}."


TASK = GridTask()
NO_EXPERT = GridNoExpert()
