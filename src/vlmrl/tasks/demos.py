"""Demonstrations: seeded episodes played by a task's expert, optionally mixed with random actions.

They feed SFT (``vlmrl.sft``) and the tokenizer of the tiny model (``vlmrl.policy.tiny``); they need
only the task and its env, so they live in the tasks layer. Each step is one (image, prompt,
response) example whose response is ``task.response(info, a, cot)`` for the action ``a`` actually
taken; text tasks (ALFWorld) give examples without an image.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vlmrl.errors import UserError
from vlmrl.files import write_atomic
from vlmrl.seeds import demo_seed
from vlmrl.tasks.base import Memory, Task, episode_success, observation_image


@dataclass
class Demo:
    image: np.ndarray | None  # (H, W, 3) uint8 observation; None for a text-only task
    prompt: str
    response: str
    expert: bool  # whether the action taken was the expert's


# --- demonstrations --------------------------------------------------------------------------------


def collect_demonstrations(
    task: Task,
    episodes: int,
    random_action_fraction: float = 0.0,
    cot: bool = True,
    seed: int = 0,
    max_steps: int = 100,
    env_kwargs: dict[str, Any] | None = None,
    history_length: int = 0,
    progress: bool = False,
) -> list[Demo]:
    """Play ``episodes`` seeded episodes; at each step take a random action with the given probability
    (uniform over ``task.random_actions(info)``: every legal action unless the task narrows it).

    Episode i resets with seed ``demo_seed(seed, i)`` (= ``seed * 1_000_000 + i``); action choices draw from
    ``np.random.default_rng(seed)``, so the same arguments give the same demonstrations.
    An env with a fixed list of games (ALFWorld's ``games``, sorted by task type) plays ``episodes``
    distinct games instead, in an order shuffled by ``seed`` so that every task type is covered (a
    seeded draw would repeat games, and loading a new one costs about a second). An episode ends
    early where the expert has no answer (ALFWorld's walkthrough after a random action changed the
    world). ``history_length`` K puts the episode's last K steps in each prompt (``Memory``), so
    that SFT teaches the prompt that rollouts with memory will show.

    Fallback: an env whose expert may fail (``env.unwrapped.fallback_expert`` set: ALFWorld's
    handcoded expert, which can run out of admissible ideas or steps) demonstrates a game its expert
    did not win with that other expert instead (reset option ``{"expert": fallback_expert}``, same
    game and seed): the failed episode's steps are dropped, so SFT never learns a losing search. The
    choice belongs here, not in the env, because only a finished episode tells whether the expert
    won; in the env (RL, DAgger) ``info["expert_action"]`` stays the expert's own answer.
    """
    if not 0.0 <= random_action_fraction <= 1.0:
        raise UserError(f"random_action_fraction must be in [0, 1], got {random_action_fraction}")
    rng = np.random.default_rng(seed)
    env = task.make_env(**(env_kwargs or {}))
    games = getattr(env.unwrapped, "games", None)
    if games is not None and episodes > len(games):
        raise UserError(f"{task.name}: asked for {episodes} demonstration games, the split has {len(games)}: lower episodes")
    order = np.random.default_rng([seed, 1]).permutation(len(games)).tolist() if games is not None else []
    fallback = getattr(env.unwrapped, "fallback_expert", None)

    def play(i: int, options: dict[str, Any] | None) -> tuple[list[Demo], bool]:
        """Episode i's demonstrations and whether it was won."""
        steps: list[Demo] = []
        obs, info = env.reset(seed=demo_seed(seed, i), options=options)
        memory = Memory(task, history_length)
        total = 0.0
        for _ in range(max_steps):
            try:
                expert = task.expert_action(info)
            except ValueError:  # the expert has no answer (ALFWorld off its walkthrough): stop here
                return steps, False
            action = expert
            if rng.random() < random_action_fraction:
                choices = task.random_actions(info)
                action = int(choices[int(rng.integers(len(choices)))])
            seen = memory.view(info)
            steps.append(Demo(observation_image(obs), task.prompt(seen, cot), task.response(seen, action, cot),
                              action == expert))
            memory.record(info, task.legal_actions(info)[action])
            obs, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return steps, episode_success(info, total)

    demos: list[Demo] = []
    fallbacks = 0
    bar = tqdm(range(episodes), desc=f"demos {task.name}", disable=not progress, mininterval=10)
    try:
        for i in bar:
            options = {"game": order[i]} if games is not None else None
            episode, won = play(i, options)
            if not won and fallback is not None:
                fallbacks += 1
                episode, _ = play(i, {**(options or {}), "expert": fallback})
            demos.extend(episode)
            if fallback is not None:
                bar.set_postfix(fallbacks=fallbacks, refresh=False)
    finally:
        env.close()
    if progress and fallback is not None:
        tqdm.write(f"demos {task.name}: {episodes} episodes, {fallbacks} of them demonstrated by the "
                   f"{fallback} (the expert did not win them), {len(demos)} steps")
    return demos


DEMO_CACHE_VERSION = "1"


def cached_demonstrations(
    task: Task,
    episodes: int,
    random_action_fraction: float = 0.0,
    cot: bool = True,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    history_length: int = 0,
    progress: bool = False,
) -> list[Demo]:
    """``collect_demonstrations`` for a text-only task, kept as JSON lines under ``cache_dir``
    (default ``$VLMRL_CACHE/demos``, else ``~/.cache/vlmrl/demos``; ``cache_path`` names the file).

    ALFWorld's demonstrations cost about 2 s a game (loading it, then its walkthrough), so runs that
    share them (SFT, the tokenizer of the tiny model, benchmarks) read them back. The file name is a
    digest of the arguments and of the task class's source, so a changed prompt collects afresh.
    """
    if not task.text_only:
        raise UserError(f"{task.name} has image observations: call collect_demonstrations (images are not cached)")
    path = cache_path(task, episodes, random_action_fraction, cot, seed, env_kwargs, cache_dir, history_length)
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [Demo(None, r["prompt"], r["response"], r["expert"]) for r in rows]
    demos = collect_demonstrations(task, episodes, random_action_fraction, cot, seed, env_kwargs=env_kwargs,
                                   history_length=history_length, progress=progress)
    write_atomic(path, "".join(json.dumps({"prompt": d.prompt, "response": d.response, "expert": d.expert}) + "\n"
                               for d in demos))  # a concurrent reader sees all of it or none
    return demos


def cache_path(
    task: Task,
    episodes: int,
    random_action_fraction: float = 0.0,
    cot: bool = True,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    history_length: int = 0,
) -> Path:
    """The file ``cached_demonstrations`` keeps these demonstrations in (it may not exist yet)."""
    spec = [DEMO_CACHE_VERSION, task.name, episodes, random_action_fraction, cot, seed, env_kwargs or {},
            inspect.getsource(type(task))] + ([history_length] if history_length else [])
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("VLMRL_CACHE") or Path.home() / ".cache" / "vlmrl") / "demos"
    return root / f"{task.name}-{episodes}-{digest}.jsonl"


__all__ = ["DEMO_CACHE_VERSION", "Demo", "cache_path", "cached_demonstrations", "collect_demonstrations"]
