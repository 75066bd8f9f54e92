"""The tasks: Gymnasium environments under the ``vlmrl/`` namespace, with their prompt text and experts.

Importing ``vlmrl.tasks`` (or ``vlmrl``) registers every id, e.g. ``gymnasium.make("vlmrl/NumberLine-v0")``.
``get_task(name)`` returns the task's text side (prompt, action words, expert).
"""

from __future__ import annotations

import importlib

from gymnasium.envs.registration import register, registry

from vlmrl.errors import UserError
from vlmrl.tasks.base import Task

# name -> (module, env class); the module also holds TASK, the Task instance.
_TASKS = {
    "NumberLine": ("vlmrl.tasks.numberline", "NumberLineEnv"),
    "EZPoints": ("vlmrl.tasks.ezpoints", "EZPointsEnv"),
    "Points24": ("vlmrl.tasks.points24", "Points24Env"),
    "Blackjack": ("vlmrl.tasks.blackjack", "BlackjackEnv"),
    "ALFWorld": ("vlmrl.tasks.alfworld", "ALFWorldEnv"),
    # THOR frames for the same games: untested here (no THOR build can be downloaded)
    "ALFWorld-THOR": ("vlmrl.tasks.alfworld_thor", "ALFWorldThorEnv"),
}
CARD_TASKS = ("NumberLine", "EZPoints", "Points24", "Blackjack")

for _name, (_module, _cls) in _TASKS.items():
    if f"vlmrl/{_name}-v0" not in registry:
        register(id=f"vlmrl/{_name}-v0", entry_point=f"{_module}:{_cls}")


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive; "vlmrl/NumberLine-v0" works too)."""
    key = name.removeprefix("vlmrl/").removesuffix("-v0").casefold()
    for known, (module, _) in _TASKS.items():
        if known.casefold() == key:
            return importlib.import_module(module).TASK
    raise UserError(f"unknown task {name!r}: choose one of {', '.join(_TASKS)}")


__all__ = ["CARD_TASKS", "Task", "get_task", "task_names"]
