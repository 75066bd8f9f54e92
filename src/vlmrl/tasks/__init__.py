"""The tasks: Gymnasium environments under the ``vlmrl/`` namespace, with their prompt text and experts.

Importing ``vlmrl.tasks`` (or ``vlmrl``) registers every id, e.g. ``gymnasium.make("vlmrl/NumberLine-v0")``.
``get_task(name)`` returns the task's text side (prompt, action words, expert); ``name`` is a
built-in name, one added with ``register_task``, or an import path ``module:attr`` naming a user's
own ``Task`` (the contract is in ``vlmrl.tasks.base``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import register, registry

from vlmrl.errors import UserError
from vlmrl.tasks.base import Task, first_line, require_expert

# name -> (module, env class); the module also holds TASK, the Task instance.
_TASKS = {
    "NumberLine": ("vlmrl.tasks.numberline", "NumberLineEnv"),
    "EZPoints": ("vlmrl.tasks.ezpoints", "EZPointsEnv"),
    "Points24": ("vlmrl.tasks.points24", "Points24Env"),
    "Blackjack": ("vlmrl.tasks.blackjack", "BlackjackEnv"),
    "ALFWorld": ("vlmrl.tasks.alfworld", "ALFWorldEnv"),
    # THOR frames for the same games: untested here (no THOR build can be downloaded)
    "ALFWorld-THOR": ("vlmrl.tasks.alfworld_thor", "ALFWorldThorEnv"),
    # Gymnasium's FrozenLake-v1 through the adapter (tasks/gym_adapter.py); the entry point is a factory
    "FrozenLake": ("vlmrl.tasks.frozenlake", "make_frozenlake_env"),
}
CARD_TASKS = ("NumberLine", "EZPoints", "Points24", "Blackjack")

for _name, (_module, _cls) in _TASKS.items():
    if f"vlmrl/{_name}-v0" not in registry:
        register(id=f"vlmrl/{_name}-v0", entry_point=f"{_module}:{_cls}")


# lower-cased name -> (name as given, task): tasks added in this process with register_task
_REGISTERED: dict[str, tuple[str, Task]] = {}


def task_names() -> list[str]:
    """The built-in tasks' names (``register_task`` adds more, which ``get_task`` also knows)."""
    return list(_TASKS)


def _key(name: str) -> str:
    return name.strip().removeprefix("vlmrl/").removesuffix("-v0").casefold()


def _builtin(name: str) -> Task | None:
    key = _key(name)
    for known, (module, _) in _TASKS.items():
        if known.casefold() == key:
            return importlib.import_module(module).TASK
    return None


def _by_name(name: str) -> Task | None:
    found = _REGISTERED.get(_key(name))
    return _builtin(name) or (found[1] if found else None)


def get_task(name: str | Task) -> Task:
    """The task that ``name`` names (a ``Task`` is returned as it is):

    - a built-in or registered name, case-insensitive ("numberline" and "vlmrl/NumberLine-v0" too);
    - an import path ``module:attr`` (``my_tasks:TASK``, ``pkg.tasks:make_task``), where ``attr`` is a
      ``Task`` instance or a zero-argument factory that returns one (a ``Task`` subclass counts).
      The current directory is put on ``sys.path`` first, as ``python -m`` does, so a ``my_tasks.py``
      beside you resolves from the ``vlmrl`` command too. The task keeps the path as ``task.ref``,
      which run configs store so that a resumed run finds it again.

    Anything else is one UserError line: an unknown name, a module that does not import (its
    exception's type and first line), a missing attribute, an object that is not a Task, a factory
    that needs arguments or raises.
    """
    if isinstance(name, Task):
        return name
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"a task is named by a string (a task name or module:attr), got {name!r}")
    if ":" in name:
        return load_task(name)
    task = _by_name(name)
    if task is None:
        names = list(_TASKS) + [shown for shown, _ in _REGISTERED.values()]
        raise UserError(f"unknown task {name!r}: choose one of {', '.join(names)}, "
                        "or give your own Task as an import path module:attr")
    return task


def load_task(path: str) -> Task:
    """The ``Task`` at the import path ``module:attr`` (see ``get_task``), remembering the path."""
    path = path.strip()
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise UserError(f"task {path!r}: an import path is module:attr, e.g. my_tasks:TASK")
    _cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything: report it in one line, not hide it
        where = f" in {os.getcwd()} or on PYTHONPATH" if isinstance(e, ModuleNotFoundError) and e.name == module_name else ""
        raise UserError(f"task {path!r}: cannot import module {module_name!r}{where}: {type(e).__name__}: "
                        f"{first_line(e)} (`python -c 'import {module_name}'` shows the traceback)") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            tasks = sorted(n for n, v in vars(module).items() if _is_task_like(v))
            have = f" (it has {', '.join(tasks)})" if tasks else ""
            raise UserError(f"task {path!r}: module {module_name!r} has no attribute {attr!r}{have}")
        obj = getattr(obj, part)
    task = _as_task(obj, path)
    if not isinstance(task.name, str) or not task.name.strip():
        raise UserError(f"task {path!r}: the task has no name: set the class attribute name, e.g. name = 'Grid'")
    # A built-in found by a path still goes by its name; any other task keeps the path, which works
    # in every process (a registered name only where the registering code ran).
    if _builtin(task.name) is not task:
        task._ref = path
    return task


def _cwd_on_path() -> None:
    """The current directory first on ``sys.path`` unless it is there (``""`` counts), as ``python -m``
    does: the ``vlmrl`` console script starts with its own bin folder there instead."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import is found too


def _is_task_like(value: Any) -> bool:
    return isinstance(value, Task) or (isinstance(value, type) and issubclass(value, Task) and value is not Task)


def _as_task(obj: Any, path: str) -> Task:
    """``obj`` if it is a Task, else what the zero-argument factory ``obj`` returns, checked."""
    if isinstance(obj, Task):
        return obj
    if isinstance(obj, type) and not issubclass(obj, Task):
        hint = " (a Gymnasium env: give the Task around it; vlmrl.tasks.gym_adapter wraps Discrete-action envs)" if issubclass(obj, gym.Env) else ""
        raise UserError(f"task {path!r} is the class {obj.__name__}, not a vlmrl.Task subclass{hint}")
    if not callable(obj):
        raise UserError(f"task {path!r} is of type {type(obj).__name__}, not a vlmrl.Task: point at a Task instance, "
                        "a Task subclass, or a function that takes no arguments and returns a Task")
    label = getattr(obj, "__name__", type(obj).__name__)
    try:
        inspect.signature(obj).bind()
    except TypeError as e:  # required parameters: a factory here gets no arguments
        raise UserError(f"task {path!r}: {label}() needs arguments ({e}): point at a factory that takes none, "
                        "or at a module-level instance such as TASK = MyTask(...)") from None
    except ValueError:  # no signature to read (a builtin): just call it
        pass
    try:
        task = obj()
    except Exception as e:  # the user's factory: one line with its exception's type and message
        raise UserError(f"task {path!r}: {label}() raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(task, Task):
        raise UserError(f"task {path!r}: {label}() returned type {type(task).__name__}, not a vlmrl.Task")
    return task


def register_task(task: Task, name: str | None = None) -> Task:
    """Make ``task`` known to ``get_task`` (and so to ``TrainConfig.task``) by ``name`` (default
    ``task.name``, case-insensitive) in this process; returns ``task``.

    Another process knows the name only if it registers it too (e.g. the task's module calls
    ``register_task`` when imported); an import path ``module:attr`` works everywhere. A built-in
    name is refused unless ``task`` is that built-in; registering a name again replaces the task.
    """
    if not isinstance(task, Task):
        what = f"the class {task.__name__}: pass an instance, {task.__name__}()" if isinstance(task, type) else f"type {type(task).__name__}"
        raise UserError(f"register_task takes a vlmrl.Task, got {what}")
    name = task.name if name is None else name
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise UserError(f"register_task: a task name is a non-empty string without ':' (that marks an import path), got {name!r}")
    key = _key(name)
    for known, (module, _) in _TASKS.items():
        if known.casefold() == key:
            if getattr(sys.modules.get(module), "TASK", None) is task:
                return task  # the built-in itself: nothing to add
            raise UserError(f"register_task: {name!r} is the name of the built-in task {known}: "
                            "register yours under another name")
    _REGISTERED[key] = (name.strip(), task)
    if task._ref is None and _key(task.name) != key:
        task._ref = name.strip()  # found again by the name it was registered under
    return task


__all__ = ["CARD_TASKS", "Task", "get_task", "load_task", "register_task", "require_expert", "task_names"]
