"""Held-out evaluation: play seeded episodes with any policy that writes text, report honest numbers.

Every policy, the random and expert baselines included, answers with text that goes through the same
parser as a model's, so the invalid-action rate means the same thing for all of them. Success is an
episode return > 0, as in RL4VLM, except where the env reports ``info["won"]`` (ALFWorld, whose
per-step goal-condition reward makes a lost episode's return positive). Held-out episodes use seeds from ``HELD_OUT_SEED_BASE`` up, a range
that training and SFT never draw from, so evaluation never replays a training episode.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vlmrl.errors import UserError
from vlmrl.files import write_atomic
from vlmrl.metrics import wilson_interval
from vlmrl.rollout.pool import make_env_pool
from vlmrl.seeds import held_out_seed
from vlmrl.tasks import Task
from vlmrl.tasks.base import Memory, episode_success, observation_image
from vlmrl.tasks.parsing import parse_action


class TextPolicy(Protocol):
    """Anything that answers a batch of observations with response texts."""

    name: str

    def act(self, observations: Sequence[Any], infos: Sequence[dict]) -> list[str]: ...


class RandomPolicy:
    """Uniformly random legal action, written in the task's answer format (always parses)."""

    name = "random"

    def __init__(self, task: Task, seed: int = 0, cot: bool = False):
        self.task, self.cot = task, cot
        self.rng = np.random.default_rng(seed)

    def act(self, observations, infos):
        return [
            self.task.response(info, int(self.rng.integers(len(self.task.legal_actions(info)))), self.cot)
            for info in infos
        ]


class ExpertPolicy:
    """The task's expert: the upper baseline, and the source of demonstrations."""

    name = "expert"

    def __init__(self, task: Task, cot: bool = True):
        from vlmrl.tasks.base import require_expert

        require_expert(task, "--policy expert")  # before any env is made: one line, at once
        self.task, self.cot = task, cot

    def act(self, observations, infos):
        return [self.task.expert_response(info, self.cot) for info in infos]


class ModelPolicy:
    """A VLM policy folder (from ``vlmrl sft`` / ``vlmrl train``, or any HF VLM) as a text policy.

    Samples one batch per step for all running episodes, from its own seeded generator.
    ``constrained`` (None: the policy's own ``constrained_actions``) turns constrained action decoding
    on or off, e.g. on for an SFT folder, which saves no policy settings.
    """

    def __init__(self, policy, task: Task, cot: bool = True, temperature: float = 0.2, seed: int = 0,
                 max_new_tokens: int | None = None, name: str = "model", constrained: bool | None = None):
        import torch

        self.policy, self.task, self.cot, self.name = policy, task, cot, name
        self.temperature, self.max_new_tokens, self.constrained = temperature, max_new_tokens, constrained
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def load(cls, path: str, task: Task, cot: bool = True, temperature: float = 0.2, seed: int = 0,
             max_new_tokens: int | None = None, name: str | None = None,
             constrained: bool | None = None) -> ModelPolicy:
        from vlmrl.config import PolicyConfig
        from vlmrl.policy.model import POLICY_CONFIG_FILE, VLMPolicy
        from vlmrl.policy.presets import is_hub_id, resolve_model

        if is_hub_id(path):
            path = str(resolve_model(path))
        folder = Path(path)
        if not folder.exists() and path != "tiny":
            raise UserError(f"policy {path!r}: use random, expert, a policy folder written by sft/train, "
                            "or a Hugging Face Hub id")
        # A folder saved by VLMPolicy.save knows its own settings; a plain HF folder is scored as is.
        config = None if (folder / POLICY_CONFIG_FILE).is_file() else PolicyConfig(finetune="none")
        source = str(resolve_model(path, task)) if config is not None else path
        return cls(VLMPolicy.load(source, config), task, cot, temperature, seed, max_new_tokens,
                   name=name or str(path), constrained=constrained)

    def act(self, observations, infos):
        import torch

        prompts = [self.task.prompt(info, self.cot) for info in infos]
        images = [observation_image(o) for o in observations]
        from vlmrl.policy.model import cpu_threads

        with torch.no_grad(), cpu_threads(self.policy):
            # the legal words: a policy saved with constrained_actions samples under the same masks
            gen = self.policy.generate(images, prompts, temperature=self.temperature,
                                       max_new_tokens=self.max_new_tokens, seed=self.generator,
                                       legal_actions=[self.task.legal_actions(info) for info in infos],
                                       constrained=self.constrained)
        return gen.texts


def make_policy(name: str, task: Task, cfg: Any) -> TextPolicy:
    """``random``, ``expert``, or a model (policy folder or Hub id) as a text policy, with the
    sampling settings of ``cfg`` (an ``EvalConfig``: seed, cot, temperature, max_new_tokens)."""
    if name == "random":
        return RandomPolicy(task, seed=cfg.seed)
    if name == "expert":
        return ExpertPolicy(task, cot=cfg.cot)
    return ModelPolicy.load(name, task, cot=cfg.cot, temperature=cfg.temperature, seed=cfg.seed,
                            max_new_tokens=cfg.max_new_tokens)


@dataclass
class EvalResult:
    task: str
    policy: str
    episodes: int
    success_rate: float
    success_ci95: tuple[float, float]
    mean_return: float
    invalid_action_rate: float
    mean_episode_length: float
    # success per group (ALFWorld: per task type), {group: {"episodes", "success_rate"}}
    by_group: dict[str, dict[str, float]] = field(default_factory=dict)
    # a few (prompt, response, reward) examples for people to read
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["success_ci95"] = list(self.success_ci95)
        d.pop("samples")
        if not self.by_group:
            d.pop("by_group")
        return d

    def table(self) -> str:
        lo, hi = self.success_ci95
        rows = [
            ("task", self.task),
            ("policy", self.policy),
            ("episodes", str(self.episodes)),
            ("success rate", f"{100 * self.success_rate:.1f}%  (95% CI {100 * lo:.1f}-{100 * hi:.1f})"),
            ("mean return", f"{self.mean_return:.3f}"),
            ("invalid action rate", f"{100 * self.invalid_action_rate:.1f}%"),
            ("mean episode length", f"{self.mean_episode_length:.2f}"),
        ]
        for group, g in sorted(self.by_group.items()):
            rows.append((f"  {group}", f"{100 * g['success_rate']:.1f}% of {int(g['episodes'])}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def evaluate(
    task: Task,
    policy: TextPolicy,
    episodes: int | None,
    seed: int = 0,
    num_envs: int = 1,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    keep_samples: int = 3,
    each_game_once: bool = False,
    history_length: int = 0,
    env_workers: int = 0,
    env_timeout_s: float | None = None,
) -> EvalResult:
    """Play ``episodes`` held-out episodes, ``num_envs`` at a time (one batched ``act`` per step).

    Episode i is reset with ``held_out_seed(seed, i)`` and parsed with a generator of the same seed,
    so the result does not depend on ``num_envs`` for deterministic policies.
    ``each_game_once``: for envs with a fixed list of games (ALFWorld's ``games``), episode i plays
    game i (``reset(options={"game": i})``) instead of a seeded draw, so ``episodes=None`` plays the
    whole split exactly once, as a benchmark evaluation should (and N its first N games).
    ``history_length`` K: the prompt carries the episode's last K steps (``tasks.base.Memory``),
    as the policy was trained with. ``env_workers`` W >= 1: the envs step in W worker processes
    (``vlmrl.rollout.pool``), with the same result, each answering a call within ``env_timeout_s``
    seconds (None: 600).
    """
    if (episodes is None and not each_game_once) or (episodes is not None and episodes <= 0):
        raise ValueError("episodes must be positive (None only with each_game_once: every game)")
    envs = make_env_pool(task, num_envs if episodes is None else min(num_envs, episodes), env_kwargs, env_workers,
                         env_timeout_s)
    if each_game_once:
        games = envs.attr("games")
        problem = None
        if games is None:
            problem = f"{task.name} has no fixed list of games: each_game_once is for ALFWorld-like envs"
        elif episodes is None:
            episodes = len(games)
        elif episodes > len(games):
            problem = f"asked for {episodes} episodes, each game once, but the split has {len(games)} games"
        if problem:
            envs.close()
            raise UserError(problem)
    returns: list[float] = []
    wins: list[bool] = []
    lengths: list[int] = []
    groups: list[str | None] = []
    invalid = steps = 0
    samples: list[dict[str, Any]] = []

    # slot state: (episode index, obs, info, return, length, parser rng)
    next_episode = 0
    slots: list[dict[str, Any] | None] = [None] * envs.num_envs

    def start(ks: list[int]) -> None:
        """Give slots ``ks`` (in this order) the next episodes, reset all at once; the rest end."""
        nonlocal next_episode
        requests = {}
        for k in ks:
            if next_episode >= episodes:
                slots[k] = None
                continue
            s = held_out_seed(seed, next_episode)
            requests[k] = (s, {"game": next_episode} if each_game_once else None)
            slots[k] = {"ret": 0.0, "len": 0, "rng": np.random.default_rng(s), "memory": Memory(task, history_length)}
            next_episode += 1
        for k, (obs, info) in envs.reset(requests).items():
            slots[k].update(obs=obs, info=info)

    bar = tqdm(total=episodes, desc=f"eval {task.name} [{policy.name}]", disable=not progress, leave=False)
    try:
        start(list(range(envs.num_envs)))
        while any(slots):
            active = [k for k, s in enumerate(slots) if s is not None]
            seen = [slots[k]["memory"].view(slots[k]["info"]) for k in active]
            texts = policy.act([slots[k]["obs"] for k in active], seen)
            actions, valid = {}, {}
            for k, text in zip(active, texts):
                slot = slots[k]
                words = task.legal_actions(slot["info"])
                parsed = parse_action(text, words, slot["rng"])
                slot["memory"].record(slot["info"], words[parsed.action])
                actions[k], valid[k] = parsed.action, parsed.valid
            results = envs.step(actions)  # every playing env at once (in parallel with env workers)
            ended = []
            for k, text, seen_info in zip(active, texts, seen):
                slot = slots[k]
                obs, reward, terminated, truncated, info = results[k]
                if len(samples) < keep_samples:
                    samples.append({"prompt": task.prompt(seen_info), "response": text, "reward": float(reward)})
                invalid += not valid[k]
                steps += 1
                slot.update(obs=obs, info=info, ret=slot["ret"] + float(reward), len=slot["len"] + 1)
                if terminated or truncated:
                    wins.append(episode_success(info, slot["ret"]))
                    returns.append(slot["ret"])
                    lengths.append(slot["len"])
                    groups.append(info.get("task_type"))
                    bar.update(1)
                    ended.append(k)
            start(ended)
    finally:
        bar.close()
        envs.close()

    by_group: dict[str, dict[str, float]] = {}
    if any(g is not None for g in groups):
        for g in sorted({g for g in groups if g is not None}):
            w = [win for win, gg in zip(wins, groups) if gg == g]
            by_group[g] = {"episodes": len(w), "success_rate": float(np.mean(w))}
    return EvalResult(
        task=task.name,
        policy=policy.name,
        episodes=len(returns),
        success_rate=float(np.mean(wins)),
        success_ci95=wilson_interval(sum(wins), len(wins)),
        mean_return=float(np.mean(returns)),
        invalid_action_rate=invalid / max(steps, 1),
        mean_episode_length=float(np.mean(lengths)),
        by_group=by_group,
        samples=samples,
    )


def write_json(result: EvalResult, path: str | Path) -> None:
    write_atomic(path, json.dumps(result.to_json(), indent=2) + "\n")
