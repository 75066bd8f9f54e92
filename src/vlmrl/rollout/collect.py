"""Rollouts from ``num_envs`` environments at once: one batched sampling call per step for all envs.

Each step: prompt every env from its ``info``, sample all responses in one ``generate`` call, parse
each into a legal action, step the envs, and store the transition in the ``RolloutBuffer``. An env
whose episode ends is reset at once (its next episode continues the env's own ``np_random`` stream);
on truncation the value of the final observation is stored so GAE can bootstrap from it.

Seeding: env i of rank r starts from ``reset(seed=training_seed(seed, r, i))``, a range disjoint from
the held-out evaluation seeds (``vlmrl.evaluate``).

Group rollouts (``Collector(..., group_size=G)``, for the group estimators GRPO / RLOO / GiGPO) are
episodic instead: at every update the ``num_envs`` envs form ``num_envs / G`` groups, the G envs of
group j reset with one seed, ``group_seed(seed, rank, j, update)``, so they start from one state, and
each plays one episode to its end without auto-reset. An env whose episode ended is no longer
stepped nor sampled for (each step samples one batch for the envs still playing); an episode still
running after ``num_steps`` steps is cut there and counts what it collected (its return so far, not
won). Everything an update draws derives from the update's index, so nothing of the envs needs
saving for a resume.

The envs live in an env pool (``vlmrl.rollout.pool``): in this process (``env_workers=0``) or in
worker processes that step them at the same time; the transitions are the same either way.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmrl.rollout.buffer import RolloutBuffer
from vlmrl.rollout.pool import make_env_pool
from vlmrl.seeds import HELD_OUT_SEED_BASE
from vlmrl.tasks import Task
from vlmrl.tasks.base import Memory, episode_success, observation_image
from vlmrl.tasks.parsing import parse_action

# streams GROUP_STREAM + u of training_seed: the group starts of update u (far above 2 + any update)
GROUP_STREAM = 1 << 32


def training_seed(seed: int, rank: int, env_index: int, stream: int = 0) -> int:
    """A reset seed for training env ``env_index`` of ``rank``, always below ``HELD_OUT_SEED_BASE``.

    Hashed through SeedSequence so any (seed, rank, env) is allowed; ``stream`` separates uses
    (0: PPO rollouts, 1: SFT demonstrations, 2+: re-seeding on resume, GROUP_STREAM + u: the group
    starts of update u).
    """
    state = np.random.SeedSequence([seed, rank, env_index, stream]).generate_state(2, dtype=np.uint64)
    return int(state[0] % HELD_OUT_SEED_BASE)


def group_seed(seed: int, rank: int, group: int, update: int) -> int:
    """The reset seed shared by the envs of ``group`` of ``rank`` in update ``update`` (0 first):
    fresh starts every update, below the held-out range, a function of these four numbers only."""
    return training_seed(seed, rank, group, stream=GROUP_STREAM + update)


@dataclass
class Finished:
    """Episodes that ended since the last ``pop_finished``."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    # won: the env's own "won" where it reports one (ALFWorld), else return > 0 (the paper's rule)
    wins: list[bool] = field(default_factory=list)


@dataclass
class StepStats:
    steps: int = 0
    invalid: int = 0
    response_tokens: int = 0
    generate_seconds: float = 0.0
    cut: int = 0  # group rollouts: episodes still running after num_steps steps, cut there


class Collector:
    """Owns the envs of one process and their current observations."""

    def __init__(self, task: Task, num_envs: int, seed: int, cot: bool = True, rank: int = 0,
                 env_kwargs: dict[str, Any] | None = None, group_size: int | None = None,
                 history_length: int = 0, env_workers: int = 0,
                 env_timeout_s: float | None = None):
        """``group_size``: None for PPO's continuing rollouts (``collect``), G for group rollouts
        (``collect_groups``; ``num_envs`` must be a multiple of G). ``history_length`` K: each prompt
        carries the episode's last K steps (``tasks.base.Memory``). ``env_workers`` W: 0 steps the
        envs here, one after another; W >= 1 in W worker processes (``vlmrl.rollout.pool``), each of
        which must answer a call within ``env_timeout_s`` seconds (None: 600)."""
        if group_size is not None and (group_size < 1 or num_envs % group_size):
            raise ValueError(f"num_envs ({num_envs}) must be a multiple of group_size ({group_size})")
        self.task, self.cot, self.num_envs = task, cot, num_envs
        self.seed, self.rank, self.group_size = seed, rank, group_size
        self.pool = make_env_pool(task, num_envs, env_kwargs, env_workers, env_timeout_s)
        self.obs: list[Any] = [None] * num_envs
        self.infos: list[dict] = [{} for _ in range(num_envs)]
        # group rollouts reset every env at the start of each update instead
        if not group_size:
            self._reset({i: (training_seed(seed, rank, i), None) for i in range(num_envs)})
        # Draws the random fallback action of unparsable answers.
        self.parse_rng = np.random.default_rng([seed, rank, 7])
        self.ep_return = np.zeros(num_envs)
        self.ep_length = np.zeros(num_envs, dtype=int)
        self.finished = Finished()
        self.memory = [Memory(task, history_length) for _ in range(num_envs)]

    # --- one rollout ----------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        return [self.task.prompt(m.view(info), self.cot) for m, info in zip(self.memory, self.infos)]

    def images(self) -> list[np.ndarray | None]:
        return [observation_image(o) for o in self.obs]

    @torch.no_grad()
    def collect(
        self,
        policy,
        buffer: RolloutBuffer,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        generator: torch.Generator,
        invalid_action_penalty: float = 0.0,
        reference=None,
    ) -> tuple[torch.Tensor, StepStats]:
        """Fill ``buffer`` (num_steps steps of all envs); return V(s_T) [num_envs] and step counts.

        ``reference``, if given, is a context manager factory (``policy.reference``) under which the
        sampled responses are scored again for the KL penalty.
        """
        if self.group_size is not None:
            raise RuntimeError("a Collector built with group_size collects with collect_groups()")
        stats = StepStats()
        buffer.reset()
        while not buffer.full:
            images, prompts = self.images(), self.prompts()
            legal = [tuple(self.task.legal_actions(info)) for info in self.infos]
            gen, ids, old_logprob, ref_logprob = _sample(policy, images, prompts, legal, stats, temperature=temperature,
                                                         top_p=top_p, max_new_tokens=max_new_tokens,
                                                         generator=generator, reference=reference)

            rewards = np.zeros(self.num_envs, dtype=np.float32)
            terminated = np.zeros(self.num_envs, dtype=bool)
            truncated = np.zeros(self.num_envs, dtype=bool)
            valid = np.zeros(self.num_envs, dtype=bool)
            final: dict[int, tuple[Any, dict]] = {}
            actions = {}
            for i, text in enumerate(gen.texts):
                parsed = parse_action(text, legal[i], self.parse_rng)
                self.memory[i].record(self.infos[i], legal[i][parsed.action])
                actions[i], valid[i] = parsed.action, parsed.valid
            results = self.pool.step(actions)  # all envs at once (in parallel with env workers)
            resets = {}
            for i in range(self.num_envs):
                obs, reward, term, trunc, info = results[i]
                reward = float(reward) - (0.0 if valid[i] else invalid_action_penalty)
                rewards[i], terminated[i], truncated[i] = reward, term, trunc
                self.ep_return[i] += float(reward)
                self.ep_length[i] += 1
                if term or trunc:
                    self.finished.returns.append(float(self.ep_return[i]))
                    self.finished.lengths.append(int(self.ep_length[i]))
                    self.finished.wins.append(episode_success(info, self.ep_return[i]))
                    self.ep_return[i], self.ep_length[i] = 0.0, 0
                    if trunc and not term:
                        final[i] = (obs, self.memory[i].view(info))
                    self.memory[i].clear()
                    resets[i] = (None, None)  # the next episode continues the env's own np_random
                self.obs[i], self.infos[i] = obs, info
            self._reset(resets)

            final_values = torch.zeros(self.num_envs)
            if final:
                keys = sorted(final)
                v = policy.values([observation_image(final[k][0]) for k in keys],
                                  [self.task.prompt(final[k][1], self.cot) for k in keys])
                final_values[keys] = v.float().cpu()
            buffer.add(
                images=images, prompts=prompts, response_ids=ids, response_texts=gen.texts,
                logprobs=old_logprob, values=gen.values.float().cpu(), rewards=rewards,
                terminated=terminated, truncated=truncated, valid=valid, final_values=final_values,
                ref_logprobs=ref_logprob, legal_actions=legal,
            )
            stats.steps += self.num_envs
            stats.invalid += int((~valid).sum())
        last_value = policy.values(self.images(), self.prompts()).float().cpu()
        return last_value, stats

    @torch.no_grad()
    def collect_groups(
        self,
        policy,
        buffer: RolloutBuffer,
        *,
        update: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        generator: torch.Generator,
        invalid_action_penalty: float = 0.0,
        reference=None,
    ) -> StepStats:
        """Fill ``buffer`` with one episode per env from the group starts of ``update`` (0 first).

        Env i belongs to group ``i // G`` and plays episode i of the rollout; every transition is
        stored with its episode, step index, group and state id (the task's ``state_key``, numbered
        in order of first sight in this rollout; a state without a key gets an id of its own). The
        rollout ends when every episode has ended or after ``buffer.num_steps`` steps; the rest of
        the buffer is padding (``buffer.mask``).
        """
        if self.group_size is None:
            raise RuntimeError("collect_groups() needs a Collector built with group_size")
        n, g = self.num_envs, self.group_size
        groups = np.arange(n) // g
        self._reset({i: (group_seed(self.seed, self.rank, int(groups[i]), update), None) for i in range(n)})
        for m in self.memory:
            m.clear()
        # the fallback actions of unparsable answers, drawn afresh each update too
        self.parse_rng = np.random.default_rng([self.seed, self.rank, 7, GROUP_STREAM + update])
        self.ep_return[:], self.ep_length[:] = 0.0, 0
        keys: dict[Any, int] = {}
        stats = StepStats()
        buffer.reset()
        active = np.ones(n, dtype=bool)
        while active.any() and not buffer.full:
            rows = np.flatnonzero(active).tolist()
            images = [observation_image(self.obs[i]) for i in rows]
            prompts = [self.task.prompt(self.memory[i].view(self.infos[i]), self.cot) for i in rows]
            legal = [tuple(self.task.legal_actions(self.infos[i])) for i in rows]
            gen, ids, old_logprob, ref_logprob = _sample(policy, images, prompts, legal, stats, temperature=temperature,
                                                         top_p=top_p, max_new_tokens=max_new_tokens,
                                                         generator=generator, reference=reference)
            # one entry per env; the envs not playing keep placeholders, masked out
            rewards = np.zeros(n, dtype=np.float32)
            terminated, truncated, valid = (np.zeros(n, dtype=bool) for _ in range(3))
            state = np.full(n, -1, dtype=np.int64)
            full_images: list[Any] = [None] * n
            full_prompts, full_texts = [""] * n, [""] * n
            full_ids: list[list[int]] = [[] for _ in range(n)]
            full_legal: list[tuple[str, ...]] = [()] * n
            logprobs, values = torch.zeros(n), torch.zeros(n)
            refs = None if ref_logprob is None else torch.zeros(n)
            gen_values = gen.values.float().cpu()
            actions = {}
            for k, i in enumerate(rows):
                key = self.task.state_key(self.infos[i])
                state[i] = keys.setdefault(object() if key is None else key, len(keys))
                full_images[i], full_prompts[i], full_texts[i], full_ids[i] = images[k], prompts[k], gen.texts[k], ids[k]
                logprobs[i], values[i] = old_logprob[k], gen_values[k]
                if refs is not None:
                    refs[i] = ref_logprob[k]
                full_legal[i] = legal[k]
                parsed = parse_action(gen.texts[k], legal[k], self.parse_rng)
                self.memory[i].record(self.infos[i], legal[k][parsed.action])
                actions[i], valid[i] = parsed.action, parsed.valid
            results = self.pool.step(actions)  # only the envs still playing
            for i in rows:
                obs, reward, term, trunc, info = results[i]
                reward = float(reward) - (0.0 if valid[i] else invalid_action_penalty)
                rewards[i], terminated[i], truncated[i] = reward, term, trunc
                self.ep_return[i] += float(reward)
                self.ep_length[i] += 1
                if term or trunc:
                    self._finish(i, episode_success(info, self.ep_return[i]))
                    active[i] = False
                self.obs[i], self.infos[i] = obs, info
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            # no bootstrap value: the group estimators use none, so final_values stay 0
            buffer.add(
                images=full_images, prompts=full_prompts, response_ids=full_ids, response_texts=full_texts,
                logprobs=logprobs, values=values, rewards=rewards, terminated=terminated,
                truncated=truncated, valid=valid, final_values=torch.zeros(n), ref_logprobs=refs, mask=mask,
                episode=np.arange(n), step_index=np.full(n, buffer.step), group=groups, state=state,
                legal_actions=full_legal,
            )
            stats.steps += len(rows)
            stats.invalid += int((~valid[rows]).sum())
        for i in np.flatnonzero(active).tolist():  # cut by the step budget: it counts what it collected
            self._finish(i, False)
            stats.cut += 1
        buffer.pad()
        return stats

    def _reset(self, requests: dict[int, tuple[int | None, dict | None]]) -> None:
        for i, (obs, info) in self.pool.reset(requests).items():
            self.obs[i], self.infos[i] = obs, info

    def _finish(self, i: int, won: bool) -> None:
        self.finished.returns.append(float(self.ep_return[i]))
        self.finished.lengths.append(int(self.ep_length[i]))
        self.finished.wins.append(bool(won))
        self.ep_return[i], self.ep_length[i] = 0.0, 0

    def pop_finished(self) -> Finished:
        done, self.finished = self.finished, Finished()
        return done

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> bytes | None:
        """The envs mid-episode, pickled, or None when an env cannot be pickled (e.g. ALFWorld).
        Group rollouts: None, always; every update starts afresh from seeds of its index."""
        if self.group_size is not None:
            return None
        envs = self.pool.state()  # each env pickled where it lives (a worker pickles its own)
        if envs is None:
            return None
        try:
            return pickle.dumps((envs, self.obs, self.infos, self.parse_rng, self.ep_return, self.ep_length,
                                 [m.steps for m in self.memory]))
        except Exception:  # noqa: BLE001  (any env may hold unpicklable handles; resume then re-seeds)
            return None

    def load_state(self, blob: bytes | None, seed: int, rank: int, update: int) -> None:
        """Put back ``state()``; without one, start fresh episodes from seeds derived from ``update``.
        Group rollouts have nothing to put back (``collect_groups`` resets every env itself)."""
        if self.group_size is not None:
            return
        if blob is not None:
            (envs, self.obs, self.infos, self.parse_rng, self.ep_return, self.ep_length,
             steps) = pickle.loads(blob)
            # the same pickles for either pool; env objects themselves in checkpoints of older versions
            self.pool.load([e if isinstance(e, bytes) else pickle.dumps(e) for e in envs])
            for m, s in zip(self.memory, steps):
                m.steps = s
            return
        self._reset({i: (training_seed(seed, rank, i, stream=2 + update), None) for i in range(self.num_envs)})
        self.ep_return[:] = 0
        self.ep_length[:] = 0
        for m in self.memory:
            m.clear()

    def close(self) -> None:
        self.pool.close()


def _sample(policy, images, prompts, legal, stats: StepStats, *, temperature: float, top_p: float,
            max_new_tokens: int, generator: torch.Generator, reference=None):
    """One batched ``generate`` for these rows: (generation, response id lists, rollout log-prob [B],
    reference log-prob [B] or None); adds the time and the response tokens to ``stats``. ``legal``
    are the rows' legal words: with ``constrained_actions`` the policy samples only those after
    the ``"action": "`` prefix (and the reference scores under the same masks)."""
    t0 = time.perf_counter()
    gen = policy.generate(images, prompts, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, seed=generator, legal_actions=legal)
    stats.generate_seconds += time.perf_counter() - t0
    ids = [gen.response_ids[i, : int(n)].tolist() for i, n in enumerate(gen.lengths)]
    old_logprob = policy.action_logprob(ids, gen.logprobs)
    ref_logprob = None
    if reference is not None:
        with reference() as ref:
            ref_logprob = ref.score(images, prompts, ids, legal_actions=legal).action_logprob.float().cpu()
    stats.response_tokens += int(gen.lengths.sum())
    return gen, ids, old_logprob.float().cpu(), ref_logprob
