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
  return > 0 (RL4VLM);
- optionally ``state_key(info)``: a hashable key of the true state, equal for identical states, which
  GiGPO needs to compare steps taken from the same state (default None: no key).

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
from typing import Any, Hashable, Sequence

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

    # --- RL side: grouping identical states (GiGPO) ------------------------------------------------
    def state_key(self, info: Info) -> Hashable | None:
        """A hashable key, equal exactly when two infos are the same state of the game; None: no key.

        GiGPO (``ppo.advantage = "gigpo"``) compares the steps of one group taken from identical
        states, so a key must hold everything the next rewards depend on that the agent can see
        (e.g. NumberLine's current and target numbers), and nothing that differs between two ways of
        reaching the same state (the path, the step count). The default, None, means the task has
        none: a GiGPO run then refuses to start. Read only ``info``, like everything else here.
        """
        return None

    @property
    def has_state_key(self) -> bool:
        """Whether this task's class overrides ``state_key`` (needed by GiGPO)."""
        return type(self).state_key is not Task.state_key

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
        if info.get(MEMORY_KEY):
            lines.append(memory_text(info[MEMORY_KEY]))
        extra = self.info_text(info)
        if extra:
            lines.append(extra)
        lines.append("Answer with one JSON object and nothing else, in this format:")
        lines.append(_to_json(fields))
        return "\n".join(lines)

    def step_text(self, info: Info) -> str:
        """What a remembered step says about its observation, in prompts with memory
        (``history_length`` > 0); the info text by default, may be ''."""
        return self.info_text(info)

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


# --- memory: the last K steps of the episode in the prompt -------------------------------------------
#: the info key under which ``Memory.view`` puts the recent steps; ``Task.prompt`` reads it
MEMORY_KEY = "recent_steps"


class Memory:
    """The last ``length`` steps of one episode, as (step text, action word) pairs, oldest first.

    Whoever steps an env (rollouts, evaluation, demonstrations) keeps one per env: ``view(info)``
    before prompting, ``record(info, word)`` after choosing the action, ``clear()`` at a reset. The
    steps travel inside the info (``info[MEMORY_KEY]``), so a prompt, a stored transition and an expert
    all see the same thing. With ``length`` 0 the info is returned unchanged (the paper's prompt).
    """

    def __init__(self, task: Task, length: int):
        if length < 0:
            raise UserError(f"history_length must be >= 0, got {length}")
        self.task, self.length = task, length
        self.steps: list[tuple[str, str]] = []

    def clear(self) -> None:
        self.steps = []

    def record(self, info: Info, word: str) -> None:
        if self.length:
            self.steps = (self.steps + [(self.task.step_text(info), word)])[-self.length:]

    def view(self, info: Info) -> Info:
        return dict(info, **{MEMORY_KEY: tuple(self.steps)}) if self.length else info


def memory_text(steps: Sequence[tuple[str, str]]) -> str:
    """The recent steps as prompt lines, oldest first."""
    lines = [f"Your last {len(steps)} step{'s' if len(steps) != 1 else ''}, oldest first:"]
    for k, (text, word) in enumerate(steps, 1):
        seen = " ".join(text.split())  # one line per step
        lines.append(f"{k}. {seen + ' -> ' if seen else ''}action: {word}")
    return "\n".join(lines)


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
