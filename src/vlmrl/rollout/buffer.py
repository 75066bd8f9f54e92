"""The rollout buffer: num_steps x num_envs VLM transitions, their advantages, shuffled minibatches.

It knows nothing of the policy nor of the maths: it stores what the collector hands it (images,
prompt text, the sampled response as token ids and text, the rollout-time log-prob and value), holds
the ``advantages`` and ``returns`` the trainer computes from its tensors (GAE, ``vlmrl.algorithms``),
and gives it all back as ``RolloutBatch`` tuples for the PPO epochs. Per-step scalars live in [T, N]
tensors (T = num_steps, N = num_envs); per-step objects (images, strings, variable-length ids) live
in flat lists indexed ``t * num_envs + env``, the same order as ``tensor.flatten()``.

Group rollouts (``ppo.advantage`` other than "gae") play whole episodes, so an env whose episode
ended has no transition at later steps: ``mask`` [T, N] marks the real transitions (all of them in a
PPO rollout), ``pad()`` closes a rollout whose episodes all ended early, and ``minibatches`` and
``len`` see only real transitions, so padding is never trained on. Each transition may also carry
its ``episode``, ``step_index`` (position in the episode), ``group`` and ``state`` (the id of the
task's state key in this rollout), -1 where not given: what ``vlmrl.algorithms.group`` reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class RolloutBatch(NamedTuple):
    """One minibatch of B transitions; tensors are on the CPU."""

    indices: Tensor  # [B] long, flat index t * num_envs + env into the buffer
    images: list[np.ndarray | None]  # B uint8 arrays [H, W, C] (None for a text-only task)
    prompts: list[str]  # B prompt texts
    response_ids: list[Tensor]  # B long tensors [L_i], the sampled response tokens
    response_texts: list[str]  # B decoded responses
    old_logprob: Tensor  # [B] (CoT-weighted) log-prob of the response at rollout time
    old_value: Tensor  # [B] value at rollout time
    advantages: Tensor  # [B] the buffer's advantages (as the trainer set them: GAE, normalised)
    returns: Tensor  # [B] advantages + values, the value target
    valid: Tensor  # [B] bool, the response parsed into a legal action
    ref_logprob: Tensor | None  # [B] log-prob under the reference policy, if it was stored
    legal_actions: list[tuple[str, ...]]  # B: the step's legal words (constrained decoding masks with them)


class RolloutBuffer:
    """Fixed-size storage for one PPO update; ``reset()`` it to collect the next one."""

    def __init__(self, num_steps: int, num_envs: int):
        if num_steps < 1 or num_envs < 1:
            raise ValueError(f"num_steps and num_envs must be >= 1, got {num_steps}, {num_envs}")
        self.num_steps = num_steps
        self.num_envs = num_envs
        self.reset()

    def reset(self) -> None:
        T, N = self.num_steps, self.num_envs
        self.step = 0  # number of steps added so far
        self.logprobs = torch.zeros(T, N)
        self.values = torch.zeros(T, N)
        self.rewards = torch.zeros(T, N)
        self.terminated = torch.zeros(T, N, dtype=torch.bool)
        self.truncated = torch.zeros(T, N, dtype=torch.bool)
        self.valid = torch.zeros(T, N, dtype=torch.bool)
        # V(final observation) of an episode cut by a time limit at that step; 0 elsewhere.
        self.final_values = torch.zeros(T, N)
        self.ref_logprobs: Tensor | None = None  # allocated on the first step that brings them
        self.mask = torch.zeros(T, N, dtype=torch.bool)  # a real transition (not padding)
        # what group estimators read; -1 where not given (PPO rollouts) and on padding
        self.episode = torch.full((T, N), -1, dtype=torch.long)
        self.step_index = torch.full((T, N), -1, dtype=torch.long)
        self.group = torch.full((T, N), -1, dtype=torch.long)
        self.state = torch.full((T, N), -1, dtype=torch.long)
        # [T, N], set by the trainer once the buffer is full (the value target: advantages + values)
        self.advantages: Tensor | None = None
        self.returns: Tensor | None = None
        self.images: list[np.ndarray | None] = []
        self.prompts: list[str] = []
        self.response_ids: list[Tensor] = []
        self.response_texts: list[str] = []
        self.legal_actions: list[tuple[str, ...]] = []

    @property
    def full(self) -> bool:
        return self.step == self.num_steps

    def __len__(self) -> int:
        """Number of real transitions stored (steps added x num_envs, less the padding)."""
        return int(self.mask.sum())

    def add(
        self,
        *,
        images: Sequence[np.ndarray | None],
        prompts: Sequence[str],
        response_ids: Sequence[Sequence[int] | Tensor],
        response_texts: Sequence[str],
        logprobs: Sequence[float] | Tensor,
        values: Sequence[float] | Tensor,
        rewards: Sequence[float] | Tensor,
        terminated: Sequence[bool] | Tensor,
        truncated: Sequence[bool] | Tensor,
        valid: Sequence[bool] | Tensor,
        final_values: Sequence[float] | Tensor | None = None,
        ref_logprobs: Sequence[float] | Tensor | None = None,
        mask: Sequence[bool] | Tensor | None = None,
        episode: Sequence[int] | Tensor | None = None,
        step_index: Sequence[int] | Tensor | None = None,
        group: Sequence[int] | Tensor | None = None,
        state: Sequence[int] | Tensor | None = None,
        legal_actions: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """Store one vectorised step: every argument has one entry per env (length N).

        ``final_values`` is V of the final observation for envs truncated at this step (read
        only there; required if any env was truncated). ``ref_logprobs``, if given, must be given
        on every step of the rollout. ``mask`` marks the envs that really stepped (default: all); the
        entries of the others are placeholders, never trained on. ``episode``, ``step_index``,
        ``group`` and ``state`` label each transition for the group estimators (default -1).
        ``legal_actions`` are each env's legal words at this step (default: none recorded), which the
        PPO forward pass needs to apply the same masks as sampling under constrained decoding.
        """
        if self.full:
            raise RuntimeError(f"buffer is full ({self.num_steps} steps); call reset() first")
        N, t = self.num_envs, self.step
        objects = {"images": images, "prompts": prompts, "response_ids": response_ids,
                   "response_texts": response_texts}
        for name, seq in objects.items():
            if len(seq) != N:
                raise ValueError(f"{name} has {len(seq)} entries, expected num_envs={N}")
        row = {
            "logprobs": _row(logprobs, N, "logprobs", torch.float32),
            "values": _row(values, N, "values", torch.float32),
            "rewards": _row(rewards, N, "rewards", torch.float32),
            "terminated": _row(terminated, N, "terminated", torch.bool),
            "truncated": _row(truncated, N, "truncated", torch.bool),
            "valid": _row(valid, N, "valid", torch.bool),
        }
        cut = row["truncated"] & ~row["terminated"]
        if final_values is None:
            if bool(cut.any()):
                raise ValueError("final_values is required on a step where an env is truncated")
            final = torch.zeros(N)
        else:
            final = torch.where(cut, _row(final_values, N, "final_values", torch.float32), 0.0)
        if ref_logprobs is not None:
            if self.ref_logprobs is None:
                if t > 0:
                    raise ValueError("ref_logprobs must be given on every step, from the first")
                self.ref_logprobs = torch.zeros(self.num_steps, N)
            self.ref_logprobs[t] = _row(ref_logprobs, N, "ref_logprobs", torch.float32)
        elif self.ref_logprobs is not None:
            raise ValueError("ref_logprobs were given on earlier steps but not on this one")

        for image in images:
            if image is not None and (not isinstance(image, np.ndarray) or image.dtype != np.uint8):
                raise TypeError(f"images must be uint8 numpy arrays or None, got {type(image)}")
        # Copies: vector envs and generate() may reuse their output buffers.
        self.images.extend(None if im is None else im.copy() for im in images)
        self.prompts.extend(str(p) for p in prompts)
        self.response_ids.extend(
            torch.as_tensor(ids, dtype=torch.long).detach().cpu().clone().flatten() for ids in response_ids
        )
        self.response_texts.extend(str(s) for s in response_texts)
        if legal_actions is not None and len(legal_actions) != N:
            raise ValueError(f"legal_actions has {len(legal_actions)} entries, expected num_envs={N}")
        self.legal_actions.extend(tuple(w) for w in (legal_actions if legal_actions is not None else [()] * N))
        for name, value in row.items():
            getattr(self, name)[t] = value
        self.final_values[t] = final
        self.mask[t] = True if mask is None else _row(mask, N, "mask", torch.bool)
        labels = {"episode": episode, "step_index": step_index, "group": group, "state": state}
        for name, value in labels.items():
            if value is not None:
                getattr(self, name)[t] = torch.where(self.mask[t], _row(value, N, name, torch.long), -1)
        self.step += 1
        self.advantages = self.returns = None  # stale once data changes

    def pad(self) -> None:
        """Fill the steps not added with padding (no real transition), so that a rollout whose
        episodes all ended before ``num_steps`` is full."""
        missing = (self.num_steps - self.step) * self.num_envs
        self.images.extend([None] * missing)
        self.prompts.extend([""] * missing)
        self.response_ids.extend(torch.zeros(0, dtype=torch.long) for _ in range(missing))
        self.response_texts.extend([""] * missing)
        self.legal_actions.extend([()] * missing)
        self.step = self.num_steps
        self.advantages = self.returns = None

    def minibatches(self, batch_size: int, generator: torch.Generator) -> Iterator[RolloutBatch]:
        """One epoch: every real transition once (never padding), in an order drawn from ``generator``.

        The last minibatch is smaller when ``batch_size`` does not divide ``len(self)``. ``advantages``
        and ``returns`` must be set first, [T, N] each (their padding entries are never read).
        """
        if not self.full:
            raise RuntimeError(f"buffer holds {self.step} of {self.num_steps} steps; fill it first")
        if self.advantages is None or self.returns is None:
            raise RuntimeError("set the buffer's advantages and returns before minibatches()")
        shape = (self.num_steps, self.num_envs)
        if tuple(self.advantages.shape) != shape or tuple(self.returns.shape) != shape:
            raise ValueError(f"advantages and returns must have shape {shape}, got "
                             f"{tuple(self.advantages.shape)} and {tuple(self.returns.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        advantages = self.advantages.flatten()
        returns = self.returns.flatten()
        logprobs, values, valid = self.logprobs.flatten(), self.values.flatten(), self.valid.flatten()
        ref = None if self.ref_logprobs is None else self.ref_logprobs.flatten()
        real = self.mask.flatten().nonzero().squeeze(1)  # all of 0..T*N-1 in a PPO rollout
        order = real[torch.randperm(len(real), generator=generator)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = idx.tolist()
            yield RolloutBatch(
                indices=idx,
                images=[self.images[i] for i in rows],
                prompts=[self.prompts[i] for i in rows],
                response_ids=[self.response_ids[i] for i in rows],
                response_texts=[self.response_texts[i] for i in rows],
                old_logprob=logprobs[idx],
                old_value=values[idx],
                advantages=advantages[idx],
                returns=returns[idx],
                valid=valid[idx],
                ref_logprob=None if ref is None else ref[idx],
                legal_actions=[self.legal_actions[i] for i in rows],
            )


def _row(x: Sequence | Tensor, n: int, name: str, dtype: torch.dtype) -> Tensor:
    """One [N] row of a per-step scalar, checked for length."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x.detach().cpu())
    t = t.to(dtype).flatten()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected num_envs={n}")
    return t
