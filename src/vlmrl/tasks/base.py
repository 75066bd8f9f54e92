"""The Task contract: what every task gives the pipeline, and what a user writes for a task of their own.

A task pairs a Gymnasium environment with the text around it. Everything here reads only the env's
``info`` dict, never the env object, so prompts, experts and demonstrations work the same for a live
env, a vectorised one or a stored transition.

What RL needs (PPO, and ``vlmrl eval`` of a model or of ``--policy random``), every task has it:

- ``name``; ``env_id``, a registered Gymnasium id that ``make_env`` makes (a user's module registers
  its env with ``gymnasium.register(id=..., entry_point=MyEnv)`` when it is imported);
- ``description`` (or ``describe(info)`` where it depends on env options), ``state_fields`` (hints
  only: what the agent should read from the observation), ``info_text(info)``: together ``prompt``;
- the legal actions, whose one source is the env: a fixed-action env sets ``action_words`` (action
  index -> word, one per action of its ``Discrete`` space) and puts them in every info as
  ``info["action_words"]``; ``make_env`` refuses an env whose words do not match its action space;
- success: ``episode_success(info, return)``, the env's ``info["won"]`` where it reports one, else
  return > 0 (RL4VLM).

What SFT needs, an OPTIONAL expert (``has_expert`` is True when a subclass defines ``expert_action``):

- ``expert_action(info)``: the action a perfect agent takes;
- ``read_state(info)``: the true values of ``state_fields`` (the first fields of a CoT answer);
- ``thoughts(info, action)``: a sentence from the state to the action (default: none).

``vlmrl sft``, ``--policy expert`` and ``vlmrl render`` need the expert and say so in one line
(``require_expert``) when a task has none; ``prompt`` never calls it, so PPO and evaluation start from
any model without one.

The response format follows RL4VLM: one JSON object whose chain-of-thought fields come first (the
state the agent reads from the image, then ``"thoughts"``) and whose last field is ``"action"``.
The action-only variant (``cot=False``, the paper's ablation) keeps just ``"action"``.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from vlmrl.errors import UserError

Info = dict[str, Any]


def observation_image(obs: Any) -> np.ndarray | None:
    """The observation as the policy's image, or None for a text observation (ALFWorld)."""
    return obs if isinstance(obs, np.ndarray) and obs.ndim == 3 else None


def episode_success(info: Info, episode_return: float) -> bool:
    """Whether a finished episode counts as won: the env's own ``won`` where it reports one (ALFWorld,
    whose per-step goal-condition reward makes a lost episode's return positive), else return > 0 (RL4VLM)."""
    return bool(info["won"]) if "won" in info else episode_return > 0


class Task:
    """Base class of every task: set the class attributes, then override what the task needs.

    RL side (required): ``name``, ``env_id``, ``description``; optional ``state_fields``,
    ``describe``, ``state_hints``, ``info_text``, ``text_only``. SFT side (optional, the expert):
    ``expert_action``, ``read_state``, ``thoughts``. The rest is shared and rarely overridden.
    """

    #: short name used on the command line and in logs, e.g. "NumberLine"
    name: str = ""
    #: registered Gymnasium id, e.g. "vlmrl/NumberLine-v0"
    env_id: str = ""
    #: what the agent must do, in a few sentences (goes at the top of the prompt; see ``describe``)
    description: str = ""
    #: (field name, hint) for each piece of state the agent reads from the observation; the hints go
    #: in the CoT prompt as they are (no expert needed), the true values come from ``read_state``
    state_fields: tuple[tuple[str, str], ...] = ()
    #: True when observations are text only (no image; the text reaches the prompt through
    #: ``info_text``): SFT then caches its demonstrations on disk; the policy sees no image and builds
    #: a text-only prompt, so a tiny model's vision tower is simply never used
    text_only: bool = False
    #: the import path ``module:attr`` this task was loaded from, set by ``get_task`` (see ``ref``)
    _ref: str | None = None

    @property
    def ref(self) -> str:
        """The string that names this task to ``get_task`` in another process (a saved config, a
        resumed run): the import path it was loaded from, else its registered ``name``."""
        return self._ref or self.name

    @property
    def has_expert(self) -> bool:
        """Whether this task has an expert (its class overrides ``expert_action``): needed by SFT,
        ``--policy expert`` and rendering, never by PPO or evaluation of a model."""
        return type(self).expert_action is not Task.expert_action

    # --- expert side (optional: SFT demonstrations) ---------------------------------------------
    def expert_action(self, info: Info) -> int:
        """The action index a perfect agent takes here. Not defined: the task has no expert."""
        raise _no_expert(self, "the expert's action")

    def read_state(self, info: Info) -> tuple[str, ...]:
        """The true values of ``state_fields`` for this observation, as text (for CoT answers)."""
        if not self.state_fields:
            return ()
        raise UserError(
            f"task {self.name!r} has state_fields but no read_state: define read_state to give their true "
            "values for chain-of-thought answers, or use --no-cot"
        )

    def thoughts(self, info: Info, action: int) -> str:
        """One or two sentences that reason from the state to ``action``; default: none."""
        return ""

    # --- RL side: the prompt --------------------------------------------------------------------
    def info_text(self, info: Info) -> str:
        """State given to the agent as text beside the image (e.g. the current formula); may be ''."""
        return ""

    def describe(self, info: Info) -> str:
        """The description for this env; override where it depends on env options (read from info)."""
        return self.description

    def state_hints(self, info: Info) -> tuple[tuple[str, str], ...]:
        """``state_fields`` for this env; override where a hint depends on env options."""
        return self.state_fields

    # --- shared ----------------------------------------------------------------------------------
    def legal_actions(self, info: Info) -> Sequence[str]:
        """The words that are legal now, action index -> word: the env's ``info["action_words"]``
        (ALFWorld overrides this with the step's admissible commands)."""
        try:
            return tuple(info["action_words"])
        except KeyError:
            raise UserError(
                f"{self.env_id or self.name}: info has no 'action_words'; the env must publish its action "
                "words in every info (or the task must override legal_actions)"
            ) from None

    def random_actions(self, info: Info) -> Sequence[int]:
        """The actions a deliberately imperfect demonstrator picks among, uniformly, when it does not
        follow the expert: every legal action, unless the task overrides it where a uniformly random
        word is not a plausible move (formulas: one that breaks the formula's grammar)."""
        return range(len(self.legal_actions(info)))

    def make_env(self, **kwargs: Any) -> gym.Env:
        """``gym.make(self.env_id, **kwargs)``, checked with ``check_actions``; a missing or unregistered
        id, an option the env does not take, or mismatched action words is one UserError line."""
        if not self.env_id:
            raise UserError(
                f"task {self.name!r} has no env_id: set it to a Gymnasium id that its module registers, "
                "e.g. gymnasium.register(id='my/Grid-v0', entry_point=GridEnv)"
            )
        try:
            env = gym.make(self.env_id, **kwargs)
        except gym.error.Error as e:  # NameNotFound, NamespaceNotFound, a malformed id, a missing dependency
            raise UserError(
                f"task {self.name!r}: cannot make env {self.env_id!r}: {type(e).__name__}: {first_line(e)} "
                "(is it registered with gymnasium.register where the task's module is imported?)"
            ) from None
        except TypeError as e:  # an option the environment does not take
            raise UserError(f"{self.env_id} does not take the options {kwargs}: {first_line(e)}") from None
        try:
            self.check_actions(env)
        except UserError:
            env.close()
            raise
        return env

    def check_actions(self, env: gym.Env) -> None:
        """Raise UserError unless ``env.unwrapped.action_words`` names each action of the env's
        ``Discrete`` space once, so a parsed word always plays that word. Reads attributes only: no reset."""
        space = discrete_actions(env, self.env_id)
        words = getattr(env.unwrapped, "action_words", None)
        if words is None:
            raise UserError(
                f"{self.env_id} has no action_words: a fixed-action env must set env.action_words "
                "(action index -> word) and put them in every info as info['action_words']"
            )
        if len(words) != space.n:
            raise UserError(
                f"{self.env_id} publishes {len(words)} action words for {space.n} actions: {tuple(words)}"
            )
        repeated = sorted({w for w in words if tuple(words).count(w) > 1})
        if repeated:
            raise UserError(
                f"{self.env_id} lists the action words {repeated} more than once: a word must name one action"
            )

    def prompt(self, info: Info, cot: bool = True) -> str:
        """The user message for one step (the image is attached separately by the policy)."""
        # " | " rather than quotes: json.dumps would escape quotes inside the hint.
        words = " | ".join(self.legal_actions(info))
        fields: dict[str, str] = {}
        if cot:
            fields.update({name: hint for name, hint in self.state_hints(info)})
            fields["thoughts"] = "<reason step by step from the state to the action>"
        fields["action"] = f"<one of: {words}>"
        lines = [f"You are playing {self.name}. {self.describe(info)}"]
        extra = self.info_text(info)
        if extra:
            lines.append(extra)
        lines.append("Answer with one JSON object and nothing else, in this format:")
        lines.append(_to_json(fields))
        return "\n".join(lines)

    def response(self, info: Info, action: int, cot: bool = True) -> str:
        """The answer a perfect reader writes when it takes ``action`` (used for demonstrations)."""
        fields: dict[str, str] = {}
        if cot:
            names = [name for name, _ in self.state_fields]
            fields.update(zip(names, self.read_state(info)))
            fields["thoughts"] = self.thoughts(info, action)
        fields["action"] = self.legal_actions(info)[action]
        return _to_json(fields)

    def expert_response(self, info: Info, cot: bool = True) -> str:
        return self.response(info, self.expert_action(info), cot)


def require_expert(task: Task, what: str) -> None:
    """One UserError unless ``task`` has an expert; ``what`` names what needs it ("vlmrl sft").

    Called before any work starts (a model load, a run folder), so a task without an expert fails
    at once with the way out, rather than deep inside demonstration collection."""
    if not task.has_expert:
        raise _no_expert(task, what)


def _no_expert(task: Task, what: str) -> UserError:
    return UserError(
        f"{what} needs an expert and task {task.name!r} has none (its Task defines no expert_action): "
        "define expert_action (and read_state, thoughts for CoT answers), or skip SFT: "
        "`vlmrl train TASK --model MODEL` and `vlmrl eval TASK --policy random|FOLDER` need no expert"
    )


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def discrete_actions(env: gym.Env, env_id: str) -> spaces.Discrete:
    """The env's action space, which must be Discrete(n) from 0: tasks name actions by index."""
    space = env.action_space
    if not isinstance(space, spaces.Discrete) or int(space.start) != 0:
        raise UserError(f"{env_id}: the action space is {space}; a task needs Discrete(n) starting at 0")
    return space


def _to_json(fields: dict[str, str]) -> str:
    # ensure_ascii=False keeps symbols like "*" and "÷" readable for the tokenizer.
    return json.dumps(fields, ensure_ascii=False)
