"""What every task gives the rest of the pipeline: prompt text, action words and an expert.

A task pairs a Gymnasium environment (registered as ``vlmrl/<Name>-v0``) with the text around it.
Everything here reads only the env's ``info`` dict, never the env object, so prompts, experts and
demonstrations work the same for a live env, a vectorised one or a stored transition.

The action words have one source, the env: a fixed-action env sets ``action_words`` (action index ->
word, one per action of its ``Discrete`` space) and puts them in every info as ``info["action_words"]``;
``make_env`` refuses an env whose words do not match its action space. Text that depends on env
options (e.g. what a face card counts) is read from info too (``describe``, ``state_hints``), so
prompt, expert and env cannot disagree.

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
    """Base class: subclasses set the class attributes and the four methods marked below."""

    #: short name used on the command line, e.g. "NumberLine"
    name: str = ""
    #: registered Gymnasium id, e.g. "vlmrl/NumberLine-v0"
    env_id: str = ""
    #: what the agent must do, in a few sentences (goes at the top of the prompt; see ``describe``)
    description: str = ""
    #: (field name, hint) for each piece of state the agent reads from the observation
    state_fields: tuple[tuple[str, str], ...] = ()
    #: True when observations are text only (no image): the policy then builds a text-only prompt
    text_only: bool = False

    # --- per task -------------------------------------------------------------------------------
    def read_state(self, info: Info) -> tuple[str, ...]:
        """The true values of ``state_fields`` for this observation, as text."""
        raise NotImplementedError

    def expert_action(self, info: Info) -> int:
        """The action index a perfect agent takes here."""
        raise NotImplementedError

    def thoughts(self, info: Info, action: int) -> str:
        """One or two sentences that reason from the state to ``action``."""
        raise NotImplementedError

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
        """``gym.make(self.env_id, **kwargs)``, checked with ``check_actions`` (UserError on a mismatch)."""
        try:
            env = gym.make(self.env_id, **kwargs)
        except TypeError as e:  # an option the environment does not take
            raise UserError(f"{self.env_id} does not take the options {kwargs}: {e}") from None
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


def discrete_actions(env: gym.Env, env_id: str) -> spaces.Discrete:
    """The env's action space, which must be Discrete(n) from 0: tasks name actions by index."""
    space = env.action_space
    if not isinstance(space, spaces.Discrete) or int(space.start) != 0:
        raise UserError(f"{env_id}: the action space is {space}; a task needs Discrete(n) starting at 0")
    return space


def _to_json(fields: dict[str, str]) -> str:
    # ensure_ascii=False keeps symbols like "*" and "÷" readable for the tokenizer.
    return json.dumps(fields, ensure_ascii=False)
