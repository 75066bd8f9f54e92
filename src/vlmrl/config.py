"""Run configuration: dataclasses with the paper's defaults, and a strict loader.

``load_config(TrainConfig, "run.toml", {"ppo.lr": 1e-4})`` reads a dict or a .json/.toml/.yaml file,
applies overrides (dotted keys or nested dicts), and checks every key, type and range, raising
``UserError`` with the field's full name and what to do. ``to_dict`` gives the resolved config back
as plain data to save beside a run. Defaults follow RL4VLM (Zhai et al., 2024) and its code.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmrl.errors import UserError
from vlmrl.files import write_atomic
from vlmrl.seeds import DEMO_STRIDE, HELD_OUT_SEED_BASE


POLICY_DTYPES = ("fp32", "bf16")
# ppo.advantage: PPO's GAE, or a group estimator of vlmrl.algorithms.group (no value function)
ADVANTAGES = ("gae", "grpo", "rloo", "gigpo")
FINETUNE_MODES = ("lora", "full", "none")
SAMPLERS = ("multinomial", "cdf")


@dataclass
class PolicyConfig:
    """The model side of a run: precision, what trains, LoRA, the value head, sampling defaults."""

    # weights' dtype: "fp32" or "bf16" (the value head always stays fp32)
    dtype: str = "fp32"
    # "lora" (adapters, base frozen), "full" (all weights train) or "none" (only the value head trains)
    finetune: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    # 0 by default: with dropout the PPO update's forward differs from the sampling one at ratio 1
    lora_dropout: float = 0.0
    # module names (last part) that get adapters in the language model
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # extra names used in the vision tower when train_vision is on (Qwen's "qkv"/"proj", CLIP's "out_proj"/"fc1")
    lora_vision_targets: tuple[str, ...] = ("qkv", "proj", "out_proj", "fc1", "fc2")
    # train the vision tower too (LoRA on it, or its weights under full fine-tuning)
    train_vision: bool = False
    gradient_checkpointing: bool = False
    # lambda: weight of the chain-of-thought tokens in the action log-prob
    thought_weight: float = 0.5
    # weight of the CoT's state fields (its reading of the observation, before "thoughts"); None: lambda
    reading_weight: float | None = None
    # width of the value head's hidden layer
    value_hidden_size: int = 256
    # sampling defaults for generate(); evaluate() scores at the same temperature
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # after `"action": "` only this step's legal words (then `"}` and the stop token) may be sampled
    constrained_actions: bool = False
    # how a token is drawn: "multinomial" (torch.multinomial, as HF generate does; every recorded
    # figure in the README) or "cdf" (one uniform per row through the cumulative distribution: the same
    # distribution, other draws, ~70x cheaper on a CPU: torch.multinomial draws one exponential per
    # vocabulary entry, 3.6 ms a step at batch 32 and vocabulary 1,024)
    sampler: str = "multinomial"
    # seeds the value head and LoRA initialisation
    seed: int = 0
    # "cpu", "cuda", ...; None: cuda when available
    device: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in POLICY_DTYPES:
            raise UserError(f"dtype {self.dtype!r} is not supported: use one of {', '.join(POLICY_DTYPES)}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler {self.sampler!r} is not supported: use one of {', '.join(SAMPLERS)}")
        if self.finetune not in FINETUNE_MODES:
            raise UserError(f"finetune {self.finetune!r} is not supported: use one of {', '.join(FINETUNE_MODES)}")
        if self.lora_rank < 1 or self.value_hidden_size < 1 or self.max_new_tokens < 1:
            raise UserError("lora_rank, value_hidden_size and max_new_tokens must be at least 1")
        if not 0.0 <= self.thought_weight <= 1.0:
            raise UserError(f"thought_weight (lambda) must lie in [0, 1], got {self.thought_weight}")
        if self.reading_weight is not None and not 0.0 <= self.reading_weight <= 1.0:
            raise UserError(f"reading_weight must lie in [0, 1] (or be unset: lambda), got {self.reading_weight}")
        if not 0.0 < self.top_p <= 1.0 or self.temperature < 0:
            raise UserError("top_p must lie in (0, 1] and temperature must be >= 0 (0 = greedy)")
        self.lora_targets = tuple(self.lora_targets)
        self.lora_vision_targets = tuple(self.lora_vision_targets)



@dataclass
class PPOConfig:
    """PPO hyper-parameters (one update = ``epochs`` passes over one rollout)."""

    # Adam learning rate at the start (paper: 1e-5).
    lr: float = 1e-5
    # Learning rate at the end of the cosine schedule (paper: 1e-9).
    end_lr: float = 1e-9
    # "cosine" from lr to end_lr (paper) or "constant" at lr.
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # Updates the cosine spans, then stays at end_lr; None: all of total_updates (paper NumberLine: 25).
    lr_schedule_updates: int | None = None
    # Adam learning rate of the value head (same schedule); None: lr. The head starts from scratch, and
    # at a policy lr of 1e-4 it explained ~0% of EZPoints' returns (+10 a win) after 30 updates.
    value_lr: float | None = None
    # The policy's lr rises linearly over this many first updates (the value head's does not), so the
    # critic fits before its advantages steer the policy; 0: no warm-up.
    lr_warmup_updates: int = 0
    # Adam epsilon (paper's code: 1e-7).
    adam_eps: float = 1e-7
    # AdamW weight decay (paper: 0).
    weight_decay: float = 0.0
    # Policy ratio clip epsilon (paper: 0.1).
    clip: float = 0.1
    # The value may move at most this far from its rollout value per update; None: no clipping
    # (paper's code clips with the policy clip, 0.1).
    value_clip: float | None = 0.1
    # PPO epochs over each rollout (paper: 4).
    epochs: int = 4
    # Transitions per forward/backward pass (paper: 1, a 7B model per GPU).
    minibatch_size: int = 1
    # Minibatches whose gradients add up to one optimizer step (paper: 128).
    grad_accum_steps: int = 128
    # Discount factor (paper: 0.9).
    gamma: float = 0.9
    # GAE lambda (paper: 0.95).
    gae_lambda: float = 0.95
    # Weight of the chain-of-thought tokens' log-prob in the action log-prob (paper's lambda: 0.5).
    thought_weight: float = 0.5
    # Weight of the CoT's state fields (what it read from the observation, before "thoughts"); None:
    # thought_weight, as in the paper. 0: the reward never rewrites the reading. With lambda 0.5 on it,
    # Blackjack's PPO turned SFT's 98.6% right two-card totals into 89.8% (benchmarks/agreement.py).
    reading_weight: float | None = None
    # Weight of the value loss (paper: 0.5).
    value_coef: float = 0.5
    # Gradient norm clip (paper: 0.01).
    max_grad_norm: float = 0.01
    # Weight of the entropy bonus (paper: 0, none in its loss).
    ent_coef: float = 0.0
    # Weight of the k3 KL penalty to the reference (initial) policy (paper: 0).
    kl_coef: float = 0.0
    # Stop an update's epochs early once approx_kl exceeds this; None: never.
    target_kl: float | None = None
    # Subtracted from the reward of a step whose response did not parse to a legal action (0: off).
    invalid_action_penalty: float = 0.0
    # Normalise advantages over the whole rollout before the epochs (paper's code: yes). GAE only: the
    # group estimators normalise within their groups (normalize_group_std) and are used as they come.
    normalize_advantages: bool = True
    # Credit assignment: "gae" (PPO's value function, GAE) or a group estimator without a value function
    # (no value loss, value head frozen): "grpo", "rloo" or "gigpo" (vlmrl.algorithms.group). A group
    # run plays whole episodes from shared starts: each update the G envs of a group reset with one seed
    # and play one episode each, cut after num_steps steps (set num_steps to the task's episode limit).
    advantage: Literal["gae", "grpo", "rloo", "gigpo"] = "gae"
    # G, episodes per group (envs that start from the same state each update); 1 with "gae".
    group_size: int = 1
    # GiGPO's omega: weight of the step-level advantage (identical states within a group, the task's
    # state_key) beside the episode-level one; its step returns are discounted by ppo.gamma.
    gigpo_step_weight: float = 1.0
    # Divide group advantages by the group's std (GRPO, GiGPO); false: only subtract the mean (Dr. GRPO).
    normalize_group_std: bool = True

    def __post_init__(self) -> None:
        _check_now(self)


@dataclass
class TrainConfig:
    """One PPO training run."""

    # Task: a name (NumberLine, EZPoints, Points24, Blackjack, ALFWorld, FrozenLake, or one added
    # with register_task) or your own Task as an import path module:attr.
    task: str = "NumberLine"
    # Local folder of a Hugging Face model + processor (e.g. an SFT checkpoint).
    model: str = ""
    # Keyword arguments for the task's environment, e.g. {"split": "train"} for ALFWorld.
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # Parallel environments; the policy samples one batch of num_envs responses per step.
    num_envs: int = 4
    # Processes that step the envs (each its share, all at the same time, through Gymnasium's
    # AsyncVectorEnv) for slow envs like ALFWorld; 0: in this process, one after another. Same results.
    env_workers: int = 0
    # Seconds an env worker may take over one call (reset, step, ...) before the run stops with one
    # line naming it (an env that hangs); None: 600. Only with env_workers >= 1.
    env_timeout_s: float | None = None
    # Steps per environment per update; num_envs * num_steps transitions per update (paper: 1 x 512).
    num_steps: int = 128
    # PPO updates in the run (paper NumberLine: 15000 env steps / 512 = 29).
    total_updates: int = 29
    # Seeds everything: envs, sampling, shuffling, model init.
    seed: int = 1
    # Chain-of-thought prompt and answer (the paper's method); False: action only (its ablation).
    cot: bool = True
    # Memory: the prompt carries the episode's last K steps (step text and action taken); 0: none,
    # as in the paper.
    history_length: int = 0
    # Sampling temperature (paper: 0.2).
    temperature: float = 0.2
    # Nucleus sampling threshold; 1.0 samples from the full distribution.
    top_p: float = 1.0
    # Longest response sampled (paper: 256).
    max_new_tokens: int = 256
    # Run directory: config, metrics, checkpoints, samples.
    out_dir: str = "runs/run"
    # Save a checkpoint every this many updates (and at the end); 0: only at the end.
    checkpoint_every: int = 1
    # Checkpoints kept on disk (newest first).
    keep_checkpoints: int = 3
    # Minibatches with a non-finite loss are skipped; abort the run after this many.
    max_nan_skips: int = 10
    # Evaluate every this many updates; 0: never during training.
    eval_every: int = 0
    # Episodes per evaluation (paper: 200 for the card tasks).
    eval_episodes: int = 200
    # Write TensorBoard events under <out_dir>/tb.
    tensorboard: bool = True
    # Also log to Weights & Biases (needs `pip install wandb`).
    wandb: bool = False
    # Weights & Biases project and run name.
    wandb_project: str = "vlmrl"
    wandb_run: str | None = None
    # Sample responses written to <out_dir>/samples.jsonl per update (0: none).
    log_samples: int = 4
    # The algorithm.
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # The model side (precision, LoRA or full fine-tuning, value head). Its sampling fields are not
    # settings of a run: they come from temperature / top_p / max_new_tokens / seed above and
    # ppo.thought_weight (RUN_OWNED_POLICY_FIELDS), and setting them here is an error.
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        owned = [f"policy.{name} (set {where} instead)" for name, where in RUN_OWNED_POLICY_FIELDS.items()
                 if getattr(self.policy, name) != getattr(_POLICY_DEFAULTS, name)]
        if owned:
            raise UserError("these settings would be ignored, the run sets them: " + "; ".join(owned))
        _check_now(self)

    def policy_config(self) -> PolicyConfig:
        """The policy settings with the run's sampling settings, so both agree by construction."""
        return dataclasses.replace(
            self.policy, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, thought_weight=self.ppo.thought_weight,
            reading_weight=self.ppo.reading_weight, seed=self.seed,
        )


# PolicyConfig field -> the TrainConfig field that sets it in a training run.
RUN_OWNED_POLICY_FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
                           "thought_weight": "ppo.thought_weight", "reading_weight": "ppo.reading_weight",
                           "seed": "seed"}
_POLICY_DEFAULTS = PolicyConfig()


@dataclass
class SFTConfig:
    """Settings of one SFT run. The defaults suit the ``tiny`` preset (a model trained from scratch);
    for a pretrained 2B-7B VLM use ``finetune="lora"``, ``lr`` about 1e-5 to 1e-4, ``train_vision=False``."""

    # task: a name, e.g. "NumberLine", or your own Task as an import path module:attr
    task: str = "NumberLine"
    # keyword arguments of the task's env, e.g. {"split": "train"} for ALFWorld
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # a Hugging Face model folder, or "tiny" for the offline tiny preset (built and cached on first use)
    model: str = "tiny"
    # where the final model + processor (and checkpoints/) go
    out_dir: str = "runs/sft"
    # demonstration episodes played (seeds seed * 1_000_000 + i, below the held-out evaluation range);
    # ALFWorld: ``episodes`` distinct games of the split (in a seeded order), each played once
    episodes: int = 400
    # per step, probability of a uniformly random action instead of the expert's (imperfect policies)
    random_action_fraction: float = 0.0
    # chain-of-thought responses (state fields + thoughts before "action"), else the action only
    cot: bool = True
    # memory: the prompt carries the episode's last K steps (step text and action); 0: none (the paper)
    history_length: int = 0
    # learn only the expert's answers: random actions then only take the episode off the expert's
    # path (ALFWorld: detours it recovers from), instead of teaching a deliberately imperfect policy
    expert_only: bool = False
    # "full" (every weight) or "lora" (adapters on the language model, merged into the saved weights)
    finetune: str = "full"
    # train the vision tower as well (needed for a model built from scratch, like the tiny preset)
    train_vision: bool = True
    # weights' dtype: "fp32" or "bf16"
    dtype: str = "fp32"
    # optimisation: AdamW, linear warmup then cosine decay to lr * min_lr_ratio
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.0
    batch_size: int = 16
    # number of optimiser steps; if 0, ``epochs`` passes over the demonstrations instead
    steps: int = 0
    epochs: float = 3.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # save a checkpoint (model, processor, optimizer) every this many steps (0: only the final save)
    checkpoint_every: int = 0
    # processor resize override: images go in as image_size x image_size (None: the model's own)
    image_size: int | None = None
    # torch CPU threads; 0: 1 for a model under policy.model.SMALL_MODEL_PARAMS on the CPU (tiny preset),
    # torch's default otherwise. Tiny models are bound by per-op overhead: 2 threads are hardly faster
    # on an idle machine and thrash on a busy one (measured at load 8 on 2 cores: 25 steps took
    # 200 s with 2 threads, while 1 thread ran 200 steps in 130 s)
    threads: int = 0
    # DAgger (Ross et al., 2011): after the SFT above, this many rounds of: the policy plays
    # dagger_episodes training episodes, the expert labels every state it visited, the labels join the
    # demonstrations, SFT continues on them all (0: plain SFT)
    dagger_rounds: int = 0
    # episodes the policy plays per round (reset seeds continue the demonstrations': seed * 1_000_000 + i)
    dagger_episodes: int = 32
    # optimiser steps on the aggregate after each round, with a fresh warmup + cosine schedule;
    # 0: the rule of the first phase (steps, else epochs passes) applied to the aggregate
    dagger_steps: int = 0
    # sampling temperature of the policy's own episodes (0: greedy; 0.2: what vlmrl eval plays at)
    dagger_temperature: float = 0.2
    # episodes played at once (one batched generate per step)
    dagger_num_envs: int = 16
    # longest response the policy may write in its episodes; None: the policy's own (256)
    dagger_max_new_tokens: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _check_now(self)


@dataclass
class EvalConfig:
    """Held-out evaluation: ``vlmrl eval``, and the [eval] table of a recipe."""

    # Task name (or module:attr import path).
    task: str = "NumberLine"
    # random, expert, a policy folder (from sft/train) or a Hugging Face Hub id.
    policy: str = "expert"
    # Held-out episodes; None: 100 (ALFWorld: each game of the split once).
    episodes: int | None = None
    # Seeds the held-out episodes (reset seeds from 10^9 + seed * 10^6) and the sampling.
    seed: int = 0
    # Episodes played at once (one batch per step).
    num_envs: int = 16
    # Processes that step the envs (see TrainConfig.env_workers); 0: in this process. Same results.
    env_workers: int = 0
    # Seconds an env worker may take over one call (see TrainConfig.env_timeout_s); None: 600.
    env_timeout_s: float | None = None
    # Sampling temperature of model policies (paper: 0.2).
    temperature: float = 0.2
    # Longest response sampled from a model policy; None: the policy's own (256).
    max_new_tokens: int | None = None
    # Chain-of-thought prompt; False: the action-only ablation.
    cot: bool = True
    # Memory: the prompt carries the episode's last K steps, as the policy was trained with; 0: none.
    history_length: int = 0
    # Keyword arguments for the task's environment, e.g. {"split": "valid_unseen"} for ALFWorld.
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_now(self)


# --- range checks ---------------------------------------------------------------------------------
# (field, test, requirement as the user reads it); None values pass (Optional fields).
_CHECKS: dict[type, list[tuple[str, typing.Callable[[Any], bool], str]]] = {
    PPOConfig: [
        ("lr", lambda v: v > 0, "> 0"),
        ("end_lr", lambda v: v >= 0, ">= 0"),
        ("lr_schedule_updates", lambda v: v >= 1, ">= 1"),
        ("value_lr", lambda v: v > 0, "> 0 (or null: lr)"),
        ("lr_warmup_updates", lambda v: v >= 0, ">= 0 (0: no warm-up)"),
        ("adam_eps", lambda v: v > 0, "> 0"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("clip", lambda v: v > 0, "> 0"),
        ("value_clip", lambda v: v > 0, "> 0 (or null for no clipping)"),
        ("epochs", lambda v: v >= 1, ">= 1"),
        ("minibatch_size", lambda v: v >= 1, ">= 1"),
        ("grad_accum_steps", lambda v: v >= 1, ">= 1"),
        ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("gae_lambda", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("thought_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("reading_weight", lambda v: 0 <= v <= 1, "in [0, 1] (or unset: thought_weight)"),
        ("value_coef", lambda v: v >= 0, ">= 0"),
        ("max_grad_norm", lambda v: v > 0, "> 0"),
        ("ent_coef", lambda v: v >= 0, ">= 0"),
        ("kl_coef", lambda v: v >= 0, ">= 0"),
        ("target_kl", lambda v: v > 0, "> 0 (or null for no early stop)"),
        ("invalid_action_penalty", lambda v: v >= 0, ">= 0 (it is subtracted from the reward)"),
        ("advantage", lambda v: v in ADVANTAGES, "one of " + ", ".join(map(repr, ADVANTAGES))),
        ("group_size", lambda v: v >= 1, ">= 1"),
        ("gigpo_step_weight", lambda v: v >= 0, ">= 0"),
    ],
    SFTConfig: [
        ("history_length", lambda v: v >= 0, ">= 0"),
        ("task", lambda v: bool(v.strip()), "a task name"),
        ("episodes", lambda v: v >= 1, ">= 1"),
        ("random_action_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("finetune", lambda v: v in ("full", "lora"), "'full' or 'lora'"),
        ("dtype", lambda v: v in POLICY_DTYPES, f"one of {', '.join(POLICY_DTYPES)}"),
        ("lr", lambda v: v > 0, "> 0"),
        ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("warmup_steps", lambda v: v >= 0, ">= 0"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("batch_size", lambda v: v >= 1, ">= 1"),
        ("steps", lambda v: v >= 0, ">= 0 (0: epochs instead)"),
        ("epochs", lambda v: v >= 0, ">= 0"),
        ("max_grad_norm", lambda v: v > 0, "> 0"),
        ("checkpoint_every", lambda v: v >= 0, ">= 0"),
        ("image_size", lambda v: v >= 1, ">= 1"),
        ("threads", lambda v: v >= 0, ">= 0 (0: automatic)"),
        ("dagger_rounds", lambda v: v >= 0, ">= 0 (0: plain SFT)"),
        ("dagger_episodes", lambda v: v >= 1, ">= 1"),
        ("dagger_steps", lambda v: v >= 0, ">= 0 (0: the first phase's rule)"),
        ("dagger_temperature", lambda v: v >= 0, ">= 0 (0: greedy)"),
        ("dagger_num_envs", lambda v: v >= 1, ">= 1"),
        ("dagger_max_new_tokens", lambda v: v >= 1, ">= 1"),
    ],
    EvalConfig: [
        ("history_length", lambda v: v >= 0, ">= 0"),
        ("episodes", lambda v: v >= 1, ">= 1"),
        ("seed", lambda v: v >= 0, ">= 0"),
        ("num_envs", lambda v: v >= 1, ">= 1"),
        ("env_workers", lambda v: v >= 0, ">= 0 (0: the envs in this process)"),
        ("temperature", lambda v: v >= 0, ">= 0 (0: greedy)"),
        ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ],
    TrainConfig: [
        ("history_length", lambda v: v >= 0, ">= 0"),
        ("task", lambda v: bool(v.strip()), "a task name"),
        ("num_envs", lambda v: v >= 1, ">= 1"),
        ("env_workers", lambda v: v >= 0, ">= 0 (0: the envs in this process)"),
        ("num_steps", lambda v: v >= 1, ">= 1"),
        ("total_updates", lambda v: v >= 1, ">= 1"),
        ("seed", lambda v: v >= 0, ">= 0"),
        ("temperature", lambda v: v > 0, "> 0"),
        ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("max_new_tokens", lambda v: v >= 1, ">= 1"),
        ("checkpoint_every", lambda v: v >= 0, ">= 0"),
        ("keep_checkpoints", lambda v: v >= 1, ">= 1"),
        ("max_nan_skips", lambda v: v >= 0, ">= 0"),
        ("eval_every", lambda v: v >= 0, ">= 0"),
        ("eval_episodes", lambda v: v >= 1, ">= 1"),
        ("log_samples", lambda v: v >= 0, ">= 0"),
    ],
}


def env_timeout_problem(timeout: float | None, workers: int, prefix: str = "") -> str | None:
    """What is wrong with an env worker timeout of ``timeout`` s for ``workers`` env worker processes,
    or None. The configs and ``rollout.pool.make_env_pool`` both ask this, so the rule is said once."""
    if timeout is None:
        return None
    if workers == 0:  # the envs then run in this process, where nothing can stop one that hangs
        return (f"{prefix}env_timeout_s ({timeout}) applies to env worker processes and would be ignored with "
                f"{prefix}env_workers 0: set {prefix}env_workers >= 1, or leave {prefix}env_timeout_s null")
    if not timeout > 0:
        return f"{prefix}env_timeout_s must be > 0 seconds (null: 600), got {timeout!r}"
    return None


def _cross_checks(cfg: Any, prefix: str) -> list[str]:
    """Rules between fields."""
    problems = []
    if isinstance(cfg, PPOConfig) and cfg.end_lr > cfg.lr:
        problems.append(f"{prefix}end_lr ({cfg.end_lr}) must be <= {prefix}lr ({cfg.lr})")
    if isinstance(cfg, PPOConfig) and cfg.advantage != "gae" and cfg.group_size < 2:
        problems.append(f"{prefix}advantage {cfg.advantage!r} compares the episodes of a group, and a group size "
                        f"of {cfg.group_size} leaves each episode alone (advantage 0): set {prefix}group_size >= 2")
    if isinstance(cfg, PPOConfig) and cfg.advantage == "gae" and cfg.group_size > 1:
        problems.append(f"{prefix}group_size ({cfg.group_size}) means nothing to {prefix}advantage 'gae', which "
                        f"compares with a value function: set {prefix}advantage to grpo, rloo or gigpo, "
                        f"or {prefix}group_size to 1")
    if isinstance(cfg, PPOConfig) and cfg.advantage != "gae" and cfg.value_lr is not None:
        problems.append(f"{prefix}value_lr is the value head's rate, and {prefix}advantage {cfg.advantage!r} "
                        f"builds no value head: leave {prefix}value_lr null, or use advantage 'gae'")
    if isinstance(cfg, SFTConfig):
        if cfg.steps == 0 and cfg.epochs == 0:
            problems.append(f"{prefix}steps or {prefix}epochs must be > 0")
        # demonstration seeds must stay below the range that evaluation reserves for held-out episodes
        if not 0 <= cfg.seed < HELD_OUT_SEED_BASE // DEMO_STRIDE or cfg.episodes >= DEMO_STRIDE:
            problems.append(f"{prefix}seed must be in [0, {HELD_OUT_SEED_BASE // DEMO_STRIDE - 1}] and "
                            f"{prefix}episodes < {DEMO_STRIDE:,}, or demonstrations would reach the held-out seeds")
        # DAgger's episodes take the seeds after the demonstrations', in the same seed's block
        elif cfg.dagger_rounds >= 0 and cfg.dagger_episodes >= 1 and \
                cfg.episodes + cfg.dagger_rounds * cfg.dagger_episodes >= DEMO_STRIDE:
            problems.append(f"{prefix}episodes + {prefix}dagger_rounds * {prefix}dagger_episodes must be < "
                            f"{DEMO_STRIDE:,}, or the policy's episodes would reuse another seed's")
    if isinstance(cfg, (TrainConfig, EvalConfig)):
        problem = env_timeout_problem(cfg.env_timeout_s, cfg.env_workers, prefix)
        if problem:
            problems.append(problem)
    if isinstance(cfg, TrainConfig):
        batch = cfg.num_envs * cfg.num_steps
        if cfg.ppo.minibatch_size > batch:
            problems.append(f"{prefix}ppo.minibatch_size ({cfg.ppo.minibatch_size}) must be <= "
                            f"num_envs * num_steps ({batch}), the transitions in one rollout")
        if cfg.ppo.group_size >= 1 and cfg.num_envs % cfg.ppo.group_size:
            problems.append(f"{prefix}num_envs ({cfg.num_envs}) must be a multiple of {prefix}ppo.group_size "
                            f"({cfg.ppo.group_size}): the envs form num_envs / group_size groups")
        if cfg.ppo.advantage != "gae" and cfg.policy.finetune == "none":
            problems.append(f"{prefix}policy.finetune 'none' trains only the value head, which "
                            f"{prefix}ppo.advantage {cfg.ppo.advantage!r} does not use: nothing would train; "
                            f"use 'lora' or 'full'")
    return problems


# load_config builds nested configs before their parent and checks the whole tree once at the end,
# so that every problem is named with its full dotted key; built directly, a config checks itself.
_deferred = contextvars.ContextVar("deferred_config_checks", default=False)


def _check_now(cfg: Any) -> None:
    if _deferred.get():
        return
    problems = _problems(cfg, "", recurse=False)  # nested configs checked themselves when built
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def validate(cfg: Any, prefix: str = "") -> None:
    """Check the ranges of a config (and its nested configs); raise UserError naming every problem."""
    problems = _problems(cfg, prefix)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def _problems(cfg: Any, prefix: str, recurse: bool = True) -> list[str]:
    problems = []
    for name, ok, requirement in _CHECKS.get(type(cfg), []):
        value = getattr(cfg, name)
        if value is not None and not ok(value):
            problems.append(f"{prefix}{name} must be {requirement}, got {value!r}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if recurse and dataclasses.is_dataclass(value):
            problems += _problems(value, f"{prefix}{f.name}.")
    return problems + _cross_checks(cfg, prefix)


# --- loading --------------------------------------------------------------------------------------

# A recipe file (configs/recipes/*.toml) holds one table per stage; each command reads its own.
RECIPE_SECTIONS = ("sft", "train", "eval")


def is_recipe(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is a recipe (tables named by RECIPE_SECTIONS) rather than one config."""
    return any(k in RECIPE_SECTIONS for k in data)


def read_recipe(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A recipe's tables, ``{"sft": {...}, "train": {...}, "eval": {...}}`` (each may be missing).

    Raises UserError for a top-level key that is not one of RECIPE_SECTIONS: it would be ignored."""
    data = _read_source(source)
    where = "" if isinstance(source, Mapping) else f" {source}"
    extra = sorted(set(data) - set(RECIPE_SECTIONS))
    if extra:
        raise UserError(f"recipe{where}: top-level key(s) {', '.join(extra)} would be ignored; put every "
                        f"setting under one of the tables [{'], ['.join(RECIPE_SECTIONS)}]")
    for name, table in data.items():
        if not isinstance(table, Mapping):
            raise UserError(f"recipe{where}: [{name}] must be a table of key = value, got {table!r}")
    return {name: dict(table) for name, table in data.items()}


def load_config(cls: type, source: Mapping[str, Any] | str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None, section: str | None = None) -> Any:
    """Build ``cls`` (a config dataclass) from ``source`` then ``overrides``, fully checked.

    Args:
        cls: e.g. TrainConfig.
        source: a dict, a path to a .json / .toml / .yaml / .yml file, or None for the defaults.
        overrides: applied on top; keys may be dotted ("ppo.lr") or nested dicts ({"ppo": {...}}).
        section: when ``source`` is a recipe (tables [sft], [train], [eval]), the table to read.
    Raises:
        UserError: unreadable file, unknown key, wrong type or out-of-range value.
    """
    data = _read_source(source)
    if section is not None and is_recipe(data):
        tables = read_recipe(data)
        if section not in tables:
            where = "" if isinstance(source, Mapping) else f" {source}"
            raise UserError(f"the recipe{where} has no [{section}] table (it has "
                            f"{', '.join(f'[{t}]' for t in tables)})")
        data = tables[section]
    for key, value in (overrides or {}).items():
        _set_dotted(data, str(key), value)
    token = _deferred.set(True)
    try:
        cfg = _build(cls, data, "")
    finally:
        _deferred.reset(token)
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Command-line ``key=value`` pairs -> overrides; values read as JSON when they parse as JSON
    (numbers, true/false, null, lists), else kept as text: ``["ppo.lr=1e-4", "task=Blackjack"]``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not key=value: write e.g. ppo.lr=1e-4")
        out[key.strip()] = _from_text(text)
    return out


def check_unchanged(command: str, saved: Any, given: Mapping[str, Any], free: Sequence[str] = ()) -> None:
    """One UserError naming every setting that ``given`` (overrides, dotted keys allowed) would change
    in the config ``saved``, except the fields in ``free``: a resume continues the saved run, so a
    different value could only be ignored or break the exact continuation."""
    flat = _flatten(to_dict(saved))
    mine = _flatten(to_dict(load_config(type(saved), to_dict(saved), given)))
    # a whole value given (env_kwargs={}) replaces the saved one, where the loader would merge it
    mine.update({k: json.loads(json.dumps(v, default=str)) for k, v in given.items()
                 if "." not in k and k not in ("ppo", "policy")})
    differ = [f"{k}={mine[k]!r} (the run has {flat.get(k)!r})" for k in sorted(mine)
              if mine[k] != flat.get(k) and k not in free]
    if differ:
        raise UserError(f"{command} --resume: settings differ from the run in {saved.out_dir}: {'; '.join(differ)}. "
                        "Drop them to continue that run, or start a new --out")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys: {"ppo": {"lr": 1}} -> {"ppo.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k in ("ppo", "policy"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data; ``load_config(type(cfg), to_dict(cfg)) == cfg``.

    A TrainConfig's policy section leaves out the fields the run sets (RUN_OWNED_POLICY_FIELDS)."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if isinstance(cfg, TrainConfig):
        for name in RUN_OWNED_POLICY_FIELDS:
            data["policy"].pop(name)
    return data


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``to_dict(cfg)`` as indented JSON (atomically: tmp file + replace)."""
    return write_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def _read_source(source: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return json.loads(json.dumps(source))  # a deep copy of plain data; never mutate the caller's
    path = Path(source)
    if not path.is_file():
        raise UserError(f"config file {path} not found: check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError(f"{path} is YAML but PyYAML is not installed: "
                                "pip install pyyaml, or use .json / .toml") from None
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            raise UserError(f"config file {path} must end in .json, .toml, .yaml or .yml")
    except UserError:
        raise
    except Exception as e:  # the parsers' own errors carry the line and column
        raise UserError(f"cannot parse config file {path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of key = value, got a {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None:
                raise UserError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a section")
            child = node[part] = {}
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():  # merge a nested dict into an existing section
            _set_dotted(node[parts[-1]], str(k), v)
    else:
        node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, Mapping):
        raise UserError(f"{where} must be a table of key = value, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if prefix == "policy." and key in RUN_OWNED_POLICY_FIELDS:
            raise UserError(f"config key 'policy.{key}' would be ignored: a run sets it from "
                            f"'{RUN_OWNED_POLICY_FIELDS[key]}'; set {RUN_OWNED_POLICY_FIELDS[key]} instead")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown config key '{prefix}{key}'{hint}: valid keys in {where} are "
                            f"{', '.join(fields)}")
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, name: str) -> Any:
    """``value`` as type ``tp``, or UserError naming the field, the expected and the given type."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # TOML has no null: "none" stands for it where the field cannot also be text
        if (isinstance(value, str) and value.strip().casefold() in ("none", "null") and type(None) in args
                and str not in args):
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return _convert(member, value, name)
            except UserError:
                continue
        raise _type_error(name, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"config field {name!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(name, tp, value)
        inner = args[1] if args else Any
        return {str(k): _convert(inner, v, f"{name}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(name, tp, value)
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {name!r} has a type the loader does not handle: {tp}")
    raise _type_error(name, tp, value)


def _type_error(name: str, tp: Any, value: Any) -> UserError:
    expected = _type_name(tp)
    msg = f"config field {name!r} expects {expected}, got {type(value).__name__} ({value!r})"
    if isinstance(value, str) and _looks_numeric(value):
        msg += ": write it as a number without quotes (YAML reads 1e-5 as text; write 1.0e-5)"
    return UserError(msg)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True




# --- command lines generated from the dataclasses --------------------------------------------------

def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: the comment lines right above it in the class body."""
    import inspect

    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            continue
        name = text.split(":", 1)[0].strip()
        if ":" in text and name.isidentifier() and not text.startswith(("def ", "class ", "return")):
            docs[name] = " ".join(comment)
        comment = []
    return docs


def add_config_arguments(parser: Any, cls: type, aliases: Mapping[str, Sequence[str]] | None = None,
                         skip: Sequence[str] = (), prefix: str = "") -> None:
    """One option per field of ``cls`` (nested configs as ``--ppo.lr``), so every setting is
    reachable with one default, the dataclass's own. Options default to "not given", so that a config
    file (``--config``) or a saved run supplies the rest; ``given_overrides`` collects what was typed.

    ``aliases`` maps a dotted field to extra option strings (``{"out_dir": ["--out"]}``); ``skip``
    names fields the command sets itself (``policy.temperature`` in a run, positional arguments).
    """
    import argparse

    aliases = aliases or {}
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in skip or not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_config_arguments(parser, tp, aliases, skip, key + ".")
            continue
        flags = [f"--{prefix}{f.name.replace('_', '-')}"]
        if "_" in f.name and tp is not bool:
            flags.append(f"--{prefix}{f.name}")  # the config key's own spelling works too
        flags += [a for a in aliases.get(key, ()) if a not in flags]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = (docs.get(f.name) or key).replace("%", "%%") + f" (default: {_shown(default)})"
        common = dict(dest=f"cfg:{key}", default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(tp) is Literal:
            parser.add_argument(*flags, choices=typing.get_args(tp), **common)
        else:
            # text fields stay text; others are read as JSON (numbers, null, tables) and the loader
            # then checks types and ranges with the config's own messages
            texty = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
            many = typing.get_origin(tp) in (tuple, list)
            convert = str if tp is str else _text if texty or many else _from_text
            parser.add_argument(*flags, type=convert, nargs="+" if many else None,
                                metavar="VALUE" if many else _type_name(tp).upper().replace(" OR ", "|"), **common)


def given_overrides(args: Any) -> dict[str, Any]:
    """The options of ``add_config_arguments`` that were typed, as ``load_config`` overrides."""
    return {dest[4:]: value for dest, value in vars(args).items() if dest.startswith("cfg:")}


def _text(text: str) -> str | None:
    return None if text.strip().casefold() == "none" else text


def _from_text(text: str) -> Any:
    # numbers, true/false, null and JSON tables read as such; anything else stays text (and the
    # loader names the field that wanted something else)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _text(text)


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value) if not isinstance(value, tuple) else " ".join(map(str, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


__all__ = [
    "EvalConfig", "RECIPE_SECTIONS", "SFTConfig", "check_unchanged", "add_config_arguments", "given_overrides", "is_recipe", "read_recipe", "PPOConfig", "TrainConfig", "load_config", "parse_overrides", "save_config", "to_dict", "validate",
]
