"""Rollouts from ``num_envs`` environments at once: one batched sampling call per step for all envs.

Each step: prompt every env from its ``info``, sample all responses in one ``generate`` call, parse
each into a legal action, step the envs, and store the transition in the ``RolloutBuffer``. An env
whose episode ends is reset at once (its next episode continues the env's own ``np_random`` stream);
on truncation the value of the final observation is stored so GAE can bootstrap from it.

Seeding: env i of rank r starts from ``reset(seed=training_seed(seed, r, i))``, a range disjoint from
the held-out evaluation seeds (``vlmrl.evaluate``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmrl.seeds import HELD_OUT_SEED_BASE
from vlmrl.rollout.buffer import RolloutBuffer
from vlmrl.tasks import Task
from vlmrl.tasks.base import episode_success, observation_image
from vlmrl.tasks.parsing import parse_action


def training_seed(seed: int, rank: int, env_index: int, stream: int = 0) -> int:
    """A reset seed for training env ``env_index`` of ``rank``, always below ``HELD_OUT_SEED_BASE``.

    Hashed through SeedSequence so any (seed, rank, env) is allowed; ``stream`` separates uses
    (0: PPO rollouts, 1: SFT demonstrations, 2+: re-seeding on resume).
    """
    state = np.random.SeedSequence([seed, rank, env_index, stream]).generate_state(2, dtype=np.uint64)
    return int(state[0] % HELD_OUT_SEED_BASE)


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


class Collector:
    """Owns the envs of one process and their current observations."""

    def __init__(self, task: Task, num_envs: int, seed: int, cot: bool = True, rank: int = 0,
                 env_kwargs: dict[str, Any] | None = None):
        self.task, self.cot, self.num_envs = task, cot, num_envs
        self.envs = [task.make_env(**(env_kwargs or {})) for _ in range(num_envs)]
        self.obs: list[Any] = []
        self.infos: list[dict] = []
        for i, env in enumerate(self.envs):
            obs, info = env.reset(seed=training_seed(seed, rank, i))
            self.obs.append(obs)
            self.infos.append(info)
        # Draws the random fallback action of unparsable answers.
        self.parse_rng = np.random.default_rng([seed, rank, 7])
        self.ep_return = np.zeros(num_envs)
        self.ep_length = np.zeros(num_envs, dtype=int)
        self.finished = Finished()

    # --- one rollout ----------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        return [self.task.prompt(info, self.cot) for info in self.infos]

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
        import time

        stats = StepStats()
        buffer.reset()
        while not buffer.full:
            images, prompts = self.images(), self.prompts()
            t0 = time.perf_counter()
            gen = policy.generate(images, prompts, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=generator)
            stats.generate_seconds += time.perf_counter() - t0
            ids = [gen.response_ids[i, : int(n)].tolist() for i, n in enumerate(gen.lengths)]
            old_logprob = policy.action_logprob(ids, gen.logprobs)
            ref_logprob = None
            if reference is not None:
                with reference() as ref:
                    ref_logprob = ref.evaluate(images, prompts, ids).action_logprob.float().cpu()

            rewards = np.zeros(self.num_envs, dtype=np.float32)
            terminated = np.zeros(self.num_envs, dtype=bool)
            truncated = np.zeros(self.num_envs, dtype=bool)
            valid = np.zeros(self.num_envs, dtype=bool)
            final: dict[int, tuple[Any, dict]] = {}
            for i, (env, text) in enumerate(zip(self.envs, gen.texts)):
                parsed = parse_action(text, self.task.legal_actions(self.infos[i]), self.parse_rng)
                obs, reward, term, trunc, info = env.step(parsed.action)
                reward = float(reward) - (0.0 if parsed.valid else invalid_action_penalty)
                rewards[i], terminated[i], truncated[i], valid[i] = reward, term, trunc, parsed.valid
                self.ep_return[i] += float(reward)
                self.ep_length[i] += 1
                if term or trunc:
                    self.finished.returns.append(float(self.ep_return[i]))
                    self.finished.lengths.append(int(self.ep_length[i]))
                    self.finished.wins.append(episode_success(info, self.ep_return[i]))
                    self.ep_return[i], self.ep_length[i] = 0.0, 0
                    if trunc and not term:
                        final[i] = (obs, info)
                    obs, info = env.reset()
                self.obs[i], self.infos[i] = obs, info

            final_values = torch.zeros(self.num_envs)
            if final:
                keys = sorted(final)
                v = policy.values([observation_image(final[k][0]) for k in keys],
                                  [self.task.prompt(final[k][1], self.cot) for k in keys])
                final_values[keys] = v.float().cpu()
            buffer.add(
                images=images, prompts=prompts, response_ids=ids, response_texts=gen.texts,
                logprobs=old_logprob.float().cpu(), values=gen.values.float().cpu(), rewards=rewards,
                terminated=terminated, truncated=truncated, valid=valid, final_values=final_values,
                ref_logprobs=ref_logprob,
            )
            stats.steps += self.num_envs
            stats.invalid += int((~valid).sum())
            stats.response_tokens += int(gen.lengths.sum())
        last_value = policy.values(self.images(), self.prompts()).float().cpu()
        return last_value, stats

    def pop_finished(self) -> Finished:
        done, self.finished = self.finished, Finished()
        return done

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> bytes | None:
        """The envs mid-episode, pickled, or None when an env cannot be pickled (e.g. ALFWorld)."""
        try:
            return pickle.dumps((self.envs, self.obs, self.infos, self.parse_rng, self.ep_return, self.ep_length))
        except Exception:  # noqa: BLE001  (any env may hold unpicklable handles; resume then re-seeds)
            return None

    def load_state(self, blob: bytes | None, seed: int, rank: int, update: int) -> None:
        """Put back ``state()``; without one, start fresh episodes from seeds derived from ``update``."""
        if blob is not None:
            for env in self.envs:
                env.close()
            self.envs, self.obs, self.infos, self.parse_rng, self.ep_return, self.ep_length = pickle.loads(blob)
            return
        for i, env in enumerate(self.envs):
            self.obs[i], self.infos[i] = env.reset(seed=training_seed(seed, rank, i, stream=2 + update))
        self.ep_return[:] = 0
        self.ep_length[:] = 0

    def close(self) -> None:
        for env in self.envs:
            env.close()

