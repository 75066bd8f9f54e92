"""ALFWorld with AI2-THOR frames (the paper's visual setting) -- UNTESTED: no THOR here.

!!! Nothing in this module has been run against a real THOR simulator. Our machines cannot download
!!! the THOR build and have no display or GPU; the tests only cover the parts that need no THOR
!!! (frame conversion, the error when THOR is missing, the task's prompt). Treat it as a starting
!!! point and check it on a machine with ``pip install ai2thor==2.1.0`` and ALFWorld's THOR extras.

``ALFWorldThorEnv`` (``vlmrl/ALFWorld-THOR-v0``) plays the same games as ``ALFWorldEnv`` (same
splits, task types, ``num_games``, ``options={"game": i}``, reward, step limit, ``info`` keys), but
through alfworld's ``AlfredThorEnv`` with its oracle controller, which turns each text command into
THOR actions; the observation is the agent's current egocentric frame as a 300x300 RGB array, so a
VLM sees what the paper's LLaVA saw. The admissible commands come from the controller, as in the
paper. ``info["expert_action"]`` is alfworld's hand-coded THOR expert's next command when
``expert=True`` (slow: it plans in the simulator), else None.

THOR rebuilds each scene from the game's full ``traj_data.json`` (scene number, object poses, start
pose), which ``alfworld-download`` fetches; the copy in ``../shared/data/alfworld`` keeps only
``task_type`` and ``pddl_params`` (all the text engine reads), so it cannot drive THOR.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from vlmrl.errors import UserError
from vlmrl.tasks.alfworld import (
    MAX_COMMANDS,
    NOTHING,
    TASK_TYPES,
    ALFWorldTask,
    choose_game,
    clean_text,
    paper_reward,
    read_game_meta,
    select_games,
    split_intro,
)
from vlmrl.tasks.base import Info

FRAME_SIZE = 300  # the card tasks' image size, so the same processors and tiny presets apply


def frame_to_rgb(frame: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """alfworld's last frame (H, W, 3, BGR: it flips THOR's RGB for OpenCV) -> (size, size, 3) RGB uint8."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got shape {frame.shape}")
    rgb = np.ascontiguousarray(frame[:, :, ::-1]).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def _thor_config(split_dir: Path, task_types: Sequence[str], max_steps: int) -> dict[str, Any]:
    """The parts of alfworld's YAML config that ``AlfredThorEnv`` reads, for one split folder."""
    ids = [i + 1 for i, t in enumerate(TASK_TYPES) if t in task_types]  # alfworld numbers types from 1
    return {
        "dataset": {"data_path": str(split_dir), "eval_id_data_path": str(split_dir),
                    "eval_ood_data_path": str(split_dir), "num_train_games": -1, "num_eval_games": -1},
        "env": {"task_types": ids, "goal_desc_human_anns_prob": 0.0,
                "thor": {"screen_height": FRAME_SIZE, "screen_width": FRAME_SIZE, "smooth_nav": False,
                         "save_frames_to_disk": False, "save_frames_path": ""}},
        "controller": {"type": "oracle", "debug": False, "load_receps": True},
        "mask_rcnn": {"pretrained_model_path": ""},
        "general": {"training_method": "dagger"},
        # alfworld ends its own episode one step past this; ours truncates at max_steps first
        "dagger": {"training": {"max_nb_steps_per_episode": max_steps + 1}},
    }


def _import_thor() -> Any:
    """alfworld's ``AlfredThorEnv`` class, or a UserError that says what is missing."""
    try:
        from alfworld.agents.environment.alfred_thor_env import AlfredThorEnv
    except ImportError as err:  # ai2thor, torchvision (alfworld's detector) or alfworld itself
        raise UserError(
            f"ALFWorld-THOR needs AI2-THOR and alfworld's THOR extras ({err}); this adapter is untested. "
            "For the text version use task ALFWorld (vlmrl/ALFWorld-v0)."
        ) from err
    return AlfredThorEnv


class ALFWorldThorEnv(gym.Env):
    """ALFWorld games rendered by THOR (UNTESTED, see the module docstring); arguments as ``ALFWorldEnv``
    plus ``expert`` (alfworld's hand-coded THOR expert in ``info["expert_action"]``)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        split: str = "train",
        task_types: str | Sequence[str] | None = None,
        data_path: str | os.PathLike[str] | None = None,
        max_steps: int = 50,
        num_games: int | None = None,
        success_reward: float = 50.0,
        invalid_penalty: float = 1.0,
        expert: bool = False,
        render_mode: str | None = None,
    ) -> None:
        _import_thor()  # fail first, with what to install, before reading any game files
        if render_mode not in (None, "rgb_array"):
            raise UserError(f"render_mode {render_mode!r} is not supported: use None or 'rgb_array'")
        self.split = split
        self.task_types, self.root, self.games = select_games(split, task_types, data_path, num_games, max_steps)
        self.max_steps, self.render_mode = max_steps, render_mode
        self.success_reward, self.invalid_penalty = float(success_reward), float(invalid_penalty)
        self.action_space = spaces.Discrete(MAX_COMMANDS)
        self.observation_space = spaces.Box(0, 255, shape=(FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
        self._thor = self._start_thor(expert)
        self._expert = expert
        self._game: str | None = None
        self._frame = np.zeros(self.observation_space.shape, np.uint8)
        self._commands: list[str] = []
        self._info: Info = {}
        self._steps = 0

    def _start_thor(self, expert: bool) -> Any:
        AlfredThorEnv = _import_thor()
        split_dir = self.root / "json_2.1.1" / self.split
        # "train" makes alfworld run its hand-coded expert after every step; any other name skips it
        thor = AlfredThorEnv(_thor_config(split_dir, self.task_types, self.max_steps),
                             train_eval="train" if expert else "eval_out_of_distribution")
        return thor.init_env(batch_size=1)

    def _sync(self, feedback: str, infos: dict[str, Any], command: str | None) -> None:
        """Read frame, commands and flags of the one THOR env after a reset or a step."""
        self._frame = frame_to_rgb(self._thor.get_frames()[0])
        self._commands = sorted(infos["admissible_commands"][0])
        plan = infos.get("extra.expert_plan", [[]])[0] if self._expert else []
        self._info.update(
            observation=feedback, admissible_commands=list(self._commands), won=bool(infos["won"][0]),
            goal_condition_success_rate=float(infos["goal_condition_success_rate"][0]),
            expert_action=plan[0] if plan and plan[0] in self._commands else None,
            last_command=command, steps=self._steps,
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, Info]:
        super().reset(seed=seed)
        game = choose_game(self.games, self.np_random, options or {})
        task_type, _ = read_game_meta(game)
        # alfworld's own reset draws a random game; hand the chosen one to its worker directly
        self._thor.action_queues[0].put((None, True, str(Path(game).parent / "traj_data.json")))
        obs, _, infos = self._thor.wait_and_get_info()
        room, goal = split_intro(obs[0])
        self._game, self._steps = game, 0
        self._info = {"goal": goal, "task_type": task_type, "game": game}
        self._sync(room, infos, None)
        return self._frame.copy(), dict(self._info)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, Info]:
        if self._game is None:
            raise RuntimeError("ALFWorldThorEnv.step() called before reset()")
        index = int(action)
        self._steps += 1
        valid = 0 <= index < len(self._commands)
        if valid:
            command = self._commands[index]
            obs, _, _, infos = self._thor.step([command])
            self._sync(clean_text(obs[0]), infos, command)
        else:
            self._info.update(observation=NOTHING, last_command=None, steps=self._steps)
        info = dict(self._info)
        reward = paper_reward(info["won"], info["goal_condition_success_rate"], valid,
                              self.success_reward, self.invalid_penalty)
        terminated = info["won"]
        truncated = not terminated and self._steps >= self.max_steps
        return self._frame.copy(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        return self._frame.copy() if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        if self._thor is not None:
            self._thor.close()
            self._thor = None


class ALFWorldThorTask(ALFWorldTask):
    """The text task's prompt and parser, with the THOR frame attached as the image."""

    name = "ALFWorld-THOR"
    env_id = "vlmrl/ALFWorld-THOR-v0"
    description = (
        "You are in a household; the image is what you see. Finish the task below by choosing, at every "
        "step, one of the admissible commands, copied exactly."
    )
    text_only = False


TASK = ALFWorldThorTask()
