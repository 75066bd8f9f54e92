"""FrozenLake: Gymnasium's own ``FrozenLake-v1`` on a new random map every episode, through the adapter.

The env is ``gym.make("FrozenLake-v1", ...)`` (its dynamics, rewards and pixel-art ``render()``)
inside ``RandomMaps``, which draws the map at each reset from the env's seeded ``np_random`` with
Gymnasium's ``generate_random_map``, so ``reset(seed=s)`` always gives the same map and start and
held-out seeds give maps never trained on. ``GymTask`` then makes it a vlmrl task: the observation
is the 256x256 rendered frame (64 px a cell for 4x4), actions are "left", "down", "right", "up"
(FrozenLake's order). Not slippery by default (``is_slippery=True`` is FrozenLake's own option);
episodes are truncated after ``5 * size`` steps (FrozenLake-v1's 100 would let a policy that walks
into the edge spend 100 steps an episode; a shortest path on a 4x4 map is 6 steps).

The CoT answer reads the state from the image, then plans:
``{"position": "row 1, column 2", "safe moves": "down, right", "thoughts": "Shortest safe path: down.",
"action": "down"}``: where the player stands, which moves neither leave the lake nor step into a
hole, and which of them start a shortest path to the goal around the holes (breadth-first search).
The expert takes the first of those. The deliberately imperfect demonstrator (``random_actions``) is
a player who looks where it steps but does not plan: a random safe move.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map

from vlmrl.errors import UserError
from vlmrl.tasks.base import Info
from vlmrl.tasks.gym_adapter import GymTask

# FrozenLake draws with pygame, whose SDL complains on every headless machine without this (it only
# draws to an off-screen surface here, so any private folder does)
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())

ACTION_WORDS = ("left", "down", "right", "up")  # FrozenLake's actions 0..3
MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0))  # (row, column) change of each action
TILES = set("SFHG")


class RandomMaps(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """A new ``generate_random_map(size, p)`` map at every reset, drawn from the env's ``np_random``.

    ``reset(options={"desc": [...]})`` plays a given map instead (same size, Gymnasium's letters).
    """

    def __init__(self, env: gym.Env, size: int, p: float, is_slippery: bool, success_rate: float,
                 reward_schedule: tuple[float, float, float]):
        gym.utils.RecordConstructorArgs.__init__(self, size=size, p=p, is_slippery=is_slippery,
                                                 success_rate=success_rate, reward_schedule=reward_schedule)
        gym.Wrapper.__init__(self, env)
        if not isinstance(env.unwrapped, FrozenLakeEnv):
            raise UserError(f"RandomMaps wraps FrozenLake-v1, got {type(env.unwrapped).__name__}")
        self.size, self.p = size, p
        # the options FrozenLake read at construction, kept to rebuild it with
        self.slippery, self.success_rate, self.reward_schedule = is_slippery, success_rate, reward_schedule

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        desc = options.pop("desc", None)
        self.env.reset(seed=seed)  # seeds np_random (when a seed is given) before the map is drawn
        base = self.env.unwrapped
        if desc is None:
            desc = generate_random_map(self.size, self.p, seed=int(base.np_random.integers(2**32)))
        desc = check_desc(desc, self.size)
        # FrozenLake builds its transition table from the map in __init__ only: rebuild it there, with
        # the env's own options, on the same object (its spec, np_random and wrappers stay)
        FrozenLakeEnv.__init__(base, render_mode=base.render_mode, desc=desc, is_slippery=self.slippery,
                               success_rate=self.success_rate, reward_schedule=self.reward_schedule)
        return self.env.reset(options=options or None)  # unseeded: continues the stream seeded above


def check_desc(desc: Any, size: int) -> list[str]:
    """A map given in ``reset(options={"desc": ...})`` as rows of text, checked (the env's size, one S)."""
    rows = list(desc) if isinstance(desc, (list, tuple)) else []
    ok = (len(rows) == size and all(isinstance(r, str) and len(r) == size and set(r) <= TILES for r in rows)
          and "".join(rows).count("S") == 1 and "G" in "".join(rows))
    if not ok:
        raise UserError(f"FrozenLake map must be a list of {size} rows of {size} letters S/F/H/G with one S "
                        f"and a G, got {desc!r}")
    return rows


def make_base_env(size: int = 4, p: float = 0.8, is_slippery: bool = False, success_rate: float = 1.0 / 3.0,
                  reward_schedule: tuple[float, float, float] = (1, 0, 0), max_episode_steps: int | None = None,
                  render_mode: str | None = "rgb_array") -> gym.Env:
    """``FrozenLake-v1`` with these options (FrozenLake's own, plus the map's ``size`` and frozen
    fraction ``p``) in ``RandomMaps``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 2 <= size <= 8:
        raise UserError(f"FrozenLake size must be an integer from 2 to 8, got {size!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.5 <= p <= 1:  # below, solvable maps are rare
        raise UserError(f"FrozenLake p (the share of frozen tiles) must lie in [0.5, 1], got {p!r}")
    if max_episode_steps is None:
        max_episode_steps = 5 * int(size)
    placeholder = ["S" + "F" * (size - 1)] + ["F" * size] * (size - 2) + ["F" * (size - 1) + "G"]  # until reset
    env = gym.make("FrozenLake-v1", desc=placeholder, is_slippery=bool(is_slippery), success_rate=success_rate,
                   reward_schedule=tuple(reward_schedule), render_mode=render_mode,
                   max_episode_steps=int(max_episode_steps))
    return RandomMaps(env, int(size), float(p), bool(is_slippery), success_rate, tuple(reward_schedule))


def lake_info(env: gym.Env, obs: Any, info: Info) -> dict[str, Any]:
    """What the task's text needs beside the raw observation (the cell index): the map and options."""
    lake = ["".join(tile.decode() for tile in row) for row in env.unwrapped.desc.tolist()]
    return {"map": lake, "slippery": bool(env.get_wrapper_attr("slippery"))}


# --- the task's text, read from info only ------------------------------------------------------


def position(info: Info) -> tuple[int, int]:
    size = len(info["map"][0])
    return divmod(int(info["obs"]), size)


def _target(info: Info, r: int, c: int, action: int) -> tuple[int, int] | None:
    """The cell ``action`` moves to from (r, c) without slipping, or None off the lake."""
    rr, cc = r + MOVES[action][0], c + MOVES[action][1]
    n_rows, n_cols = len(info["map"]), len(info["map"][0])
    return (rr, cc) if 0 <= rr < n_rows and 0 <= cc < n_cols else None


def safe_moves(info: Info) -> list[int]:
    """Actions that neither leave the lake nor step into a hole, in action order."""
    r, c = position(info)
    cells = [_target(info, r, c, a) for a in range(len(MOVES))]
    return [a for a, cell in enumerate(cells) if cell is not None and info["map"][cell[0]][cell[1]] != "H"]


def goal_distances(lake: list[str]) -> dict[tuple[int, int], int]:
    """Steps from every cell to the nearest goal around the holes (breadth-first search from the goals)."""
    n_rows, n_cols = len(lake), len(lake[0])
    dist = {(r, c): 0 for r in range(n_rows) for c in range(n_cols) if lake[r][c] == "G"}
    queue = deque(dist)
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            cell = (r + dr, c + dc)
            if 0 <= cell[0] < n_rows and 0 <= cell[1] < n_cols and cell not in dist and lake[cell[0]][cell[1]] != "H":
                dist[cell] = dist[(r, c)] + 1
                queue.append(cell)
    return dist


def shortest_moves(info: Info) -> list[int]:
    """The safe moves that start a shortest path to the goal (several on a tie), in action order."""
    dist = goal_distances(info["map"])
    r, c = position(info)
    here = dist.get((r, c))
    return [a for a in safe_moves(info) if here is not None and dist.get(_target(info, r, c, a)) == here - 1]


def expert(info: Info) -> int:
    # The first move of a shortest path; where none exists (a cut-off cell, only after a slip), a safe move.
    return (shortest_moves(info) or safe_moves(info) or [0])[0]


def _names(actions: list[int]) -> str:
    return ", ".join(ACTION_WORDS[a] for a in actions) or "none"


def state_text(info: Info) -> tuple[str, str]:
    r, c = position(info)
    return f"row {r}, column {c}", _names(safe_moves(info))


def thoughts(info: Info, action: int) -> str:
    # The plan, whatever the action: the imperfect demonstrator reads it right but does not follow it.
    best = shortest_moves(info)
    return f"Shortest safe path: {' or '.join(ACTION_WORDS[a] for a in best)}." if best else "No safe path."


def random_moves(info: Info) -> list[int]:
    # A player who looks where it steps but does not plan: any safe move (all moves where none is safe).
    return safe_moves(info) or list(range(len(ACTION_WORDS)))


def state_key(info: Info) -> tuple[tuple[str, ...], int]:
    # The map and the cell are the whole state (FrozenLake has no other memory); the step count is not.
    return tuple(info["map"]), int(info["obs"])


def describe(info: Info) -> str:
    n = len(info["map"])
    text = (f"The image shows a {n}x{n} frozen lake from above, row 0 at the top and column 0 at the left. "
            "You are the small figure, the dark blue squares are holes and the flag is the goal. "
            "Each step moves you one square left, down, right or up; a move off the lake does nothing. "
            "Reach the goal without falling into a hole.")
    if info.get("slippery"):
        text += " The ice is slippery: sometimes you slide to one side of the way you chose."
    return text


TASK = GymTask(
    "FrozenLake",
    make_base_env,
    ACTION_WORDS,
    describe,
    env_id="vlmrl/FrozenLake-v0",
    image="render",
    state_fields=(("position", "<row, column of the figure in the image>"),
                  ("safe moves", "<moves that neither leave the lake nor step into a hole>")),
    state_text=state_text,
    expert=expert,
    thoughts=thoughts,
    random_actions=random_moves,
    extra_info=lake_info,
    state_key=state_key,
)


def make_frozenlake_env(**kwargs: Any) -> gym.Env:
    """Entry point of ``vlmrl/FrozenLake-v0``: the adapted env (options as in ``make_base_env``)."""
    return TASK.build_env(**kwargs)
