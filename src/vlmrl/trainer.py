"""PPO fine-tuning of a VLM agent: collect -> advantages -> update -> log -> save. Reads top to bottom.

``train`` is the loop; ``rollout_advantages`` turns a full buffer into its GAE targets (or, with
``ppo.advantage`` "grpo", "rloo" or "gigpo", ``group_advantages`` turns a rollout of whole episodes
from shared starts into group-relative ones, with no value function) and ``ppo_update`` is one
update's epochs over minibatches (``benchmarks/throughput.py`` times this same function for the
README's FLOP/s figure).

One process or many (``accelerate launch``): every rank steps its own envs for a fixed number of
steps and meets the others only inside the update (gradient all-reduce) and at logging, so ranks
whose rollouts take different times never time out a collective while collecting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlmrl import metrics as M
from vlmrl.algorithms import PPOLoss, explained_variance, gae, lr_factors, normalize_advantages, ppo_loss
from vlmrl.algorithms.group import episode_returns, gigpo_advantages, grpo_advantages, rloo_advantages
from vlmrl.checkpoint import capture_rng_state, latest_checkpoint, restore_rng_state, save_checkpoint
from vlmrl.config import RUN_OWNED_POLICY_FIELDS, PolicyConfig, PPOConfig, TrainConfig, save_config
from vlmrl.errors import UserError
from vlmrl.files import filter_jsonl
from vlmrl.metrics import MetricsLogger, plot_learning_curve
from vlmrl.rollout import RolloutBatch, RolloutBuffer
from vlmrl.rollout.collect import Collector
from vlmrl.tasks import Task, get_task

if TYPE_CHECKING:
    from vlmrl.policy.model import VLMPolicy

ACCELERATE_STATE = "accelerate"  # the folder of a checkpoint that accelerator.save_state writes

# PPOLoss field -> its logged name, in the order of the metrics file's columns
_LOSS_METRICS = {"loss": M.LOSS, "policy_loss": M.POLICY_LOSS, "value_loss": M.VALUE_LOSS, "entropy": M.ENTROPY,
                 "approx_kl": M.APPROX_KL, "clipfrac": M.CLIPFRAC, "kl_ref": M.KL_REF}


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


@dataclasses.dataclass
class RankUpdate:
    """What one rank did in one update (the logged metrics are the gathered view over ranks)."""

    update: int  # updates done so far
    rank: int
    world_size: int
    episodes: int  # episodes this rank finished in this update
    env_steps: int  # transitions this rank collected in this update
    policy: Any  # this rank's VLMPolicy after the update


@dataclasses.dataclass
class UpdateStats:
    """What one ``ppo_update`` did on this rank."""

    # PPOLoss field -> its mean over the minibatches that counted (empty when none did)
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    epochs: int = 0  # epochs run: fewer than ppo.epochs after a target_kl stop
    minibatches: int = 0  # minibatches that counted: finite loss and gradient
    optimizer_steps: int = 0
    nan_skipped: int = 0  # minibatches skipped for a non-finite loss or gradient norm
    nan_streak: int = 0  # non-finite minibatches in a row at the end (the next update counts on)
    forward_backward_seconds: float = 0.0  # forward, loss and backward only: the benchmark's FLOP/s time
    last_batch: RolloutBatch | None = None  # the last minibatch, to score the new weights on


@dataclasses.dataclass
class _RolloutReport:
    """One rank's rollout figures; the logged metrics are computed from every rank's."""

    returns: list[float]  # of the episodes that ended in this update
    lengths: list[int]
    wins: list[bool]
    steps: int  # transitions collected
    invalid: int  # of which the response did not parse to a legal action
    response_tokens: int
    generate_seconds: float
    collect_seconds: float
    group_return_stds: list[float] = dataclasses.field(default_factory=list)  # one per group (group runs)
    cut: int = 0  # episodes cut at num_steps (group runs)


def train(cfg: TrainConfig, task: Task | None = None, policy: VLMPolicy | None = None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[RankUpdate], None] | None = None) -> Path:
    """Run PPO as configured; return the folder of the final policy (``<out_dir>/final``).

    Args:
        cfg: the run's settings.
        task: a ``vlmrl.Task`` to train on, instead of ``get_task(cfg.task)``. The run's config.json
            names it by ``task.ref``, so that ``vlmrl train --resume`` finds it again when it is
            built in, registered or importable (``module:attr``).
        policy: a ready ``VLMPolicy`` to start from, instead of loading ``cfg.model`` (which may then
            be empty). It is trained in place, moved to this rank's device and given the run's
            sampling settings (``temperature``, ``top_p``, ``max_new_tokens``, ``seed``,
            ``ppo.thought_weight``); its other settings (finetune, LoRA, dtype, ...) replace
            ``cfg.policy`` and are saved with the run. A resume still loads the weights from the
            checkpoint (with those settings) and leaves the object as it was.
        resume: continue the run in ``cfg.out_dir`` from its newest checkpoint.
        progress: show a progress bar (rank 0).
        callback: runs on every rank after every update, before the checkpoint.

    With a group estimator (``ppo.advantage`` "grpo", "rloo" or "gigpo") each update plays one
    episode per env from group starts (``Collector.collect_groups``), the advantages come from
    ``group_advantages``, there is no value loss, and the value head is frozen (requires_grad False,
    left out of the optimizer; a policy object passed in is changed so too).
    """
    from accelerate import Accelerator

    from vlmrl.policy.model import NonFiniteLogits, VLMPolicy, cpu_threads
    from vlmrl.policy.presets import resolve_model

    if task is not None:
        cfg = dataclasses.replace(cfg, task=task.ref)
    if policy is not None:  # its own settings, less the run's, so that config.json can load it again
        defaults = PolicyConfig()
        cfg = dataclasses.replace(cfg, policy=dataclasses.replace(
            policy.config, **{name: getattr(defaults, name) for name in RUN_OWNED_POLICY_FIELDS}))
    ppo = cfg.ppo
    grouped = ppo.advantage != "gae"
    # cpu=True on a host without CUDA: otherwise accelerate ignores the ranks torchrun started and
    # every process trains alone (DistributedType.NO); with it they join one gloo group.
    accelerator = Accelerator(gradient_accumulation_steps=ppo.grad_accum_steps, cpu=not torch.cuda.is_available())
    rank, main = accelerator.process_index, accelerator.is_main_process
    run_dir = Path(cfg.out_dir)
    random.seed(cfg.seed * 1000 + rank)
    torch.manual_seed(cfg.seed * 1000 + rank)
    np.random.seed(cfg.seed * 1000 + rank)
    task = get_task(cfg.task if task is None else task)
    if ppo.advantage == "gigpo" and not task.has_state_key:
        raise UserError(f"ppo.advantage 'gigpo' compares steps taken from identical states and task {task.name!r} "
                        f"has no state key: define state_key(info) on its Task class (a hashable key of the state; "
                        f"see vlmrl.Task.state_key), or use ppo.advantage grpo or rloo")

    # --- where to start from ---------------------------------------------------------------------
    # A half-written checkpoint is never loaded: latest_checkpoint() sees only complete ones. A run
    # killed before its first checkpoint resumes from update 0 (its partial metrics are cut away).
    # Rank 0 decides (and alone cleans away the debris of interrupted saves): every rank loads the same.
    checkpoint = _broadcast(latest_checkpoint(run_dir) if resume and main else None)
    if checkpoint is not None and not (checkpoint / ACCELERATE_STATE).is_dir():
        raise UserError(f"{checkpoint} has no {ACCELERATE_STATE}/ folder: an older vlmrl wrote it (trainer.pt); "
                        "resume it with that version, or start a new run from its policy/")
    if resume and checkpoint is None and not (run_dir / "config.json").is_file():
        raise UserError(f"--resume: {run_dir} holds no run (no config.json); start without --resume")
    if not resume and (run_dir / M.METRICS_FILE).exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it or choose a new --out")
    if checkpoint is None and policy is None and not cfg.model:
        raise UserError("no model to start from: set model (a folder, a Hub id or 'tiny') or pass a policy "
                        "(train(cfg, policy=...)); a run started from a policy resumes without one only once "
                        "it has a checkpoint")

    # --- policy, optimizer, learning-rate schedule -----------------------------------------------
    policy_cfg = cfg.policy_config()
    if policy_cfg.device is None:  # each rank loads onto its own device, not all onto cuda:0
        policy_cfg = dataclasses.replace(policy_cfg, device=str(accelerator.device))
    # the group estimators have no value function: no value head is built (a given one is dropped)
    if checkpoint is not None:
        policy = VLMPolicy.load(checkpoint / "policy", policy_cfg, value_head=not grouped)
    elif policy is not None:
        policy.config = policy_cfg
        if grouped:
            policy.value_head = None
        policy = policy.to(policy_cfg.device)
    else:
        policy = VLMPolicy.load(resolve_model(cfg.model, task), policy_cfg, value_head=not grouped)
    optimizer = make_optimizer(policy, ppo)
    span = ppo.lr_schedule_updates or cfg.total_updates

    def lr_factor(update: int, part: int) -> float:  # per update: the paper's cosine from lr to end_lr
        return lr_factors(update, span, schedule=ppo.lr_schedule, end_ratio=ppo.end_lr / ppo.lr,
                          warmup=ppo.lr_warmup_updates)[part]

    # one multiplier per parameter group: the policy's (group 0), then the value head's (make_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [functools.partial(lr_factor, part=min(i, 1)) for i in range(len(optimizer.param_groups))])
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader to take the micro-batch size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = ppo.minibatch_size
    model, optimizer = accelerator.prepare(policy, optimizer)
    policy = accelerator.unwrap_model(model)  # sampling and saving go around the DDP wrapper

    collector = Collector(task, cfg.num_envs, cfg.seed, cfg.cot, rank, env_kwargs=cfg.env_kwargs,
                          group_size=ppo.group_size if grouped else None, history_length=cfg.history_length,
                          env_workers=cfg.env_workers, env_timeout_s=cfg.env_timeout_s)
    buffer = RolloutBuffer(cfg.num_steps, cfg.num_envs)
    sampling = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
    shuffling = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 2)
    counters = {"update": 0, "env_steps": 0, "nan_skipped": 0}

    # Checkpoints go through accelerate's save_state/load_state on every rank, which write the
    # optimizer however it is sharded (DeepSpeed ZeRO: one file per rank) and each rank's global RNGs.
    # The scheduler is not prepared (accelerate would step it once per process) but registered; the
    # weights are left to policy/ (policy.save), which resume loads the policy from: no second copy.
    run_state = _RunState(accelerator, counters, {"sampling": sampling, "shuffling": shuffling}, collector, cfg.seed)
    accelerator.register_for_checkpointing(scheduler, run_state)
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / ACCELERATE_STATE))  # fills counters, generators, envs
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    if resume and main:
        _truncate_samples(run_dir / "samples.jsonl", counters["update"])
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                           resume_step=counters["update"] if resume else None,
                           wandb_project=cfg.wandb_project, wandb_run=cfg.wandb_run) if main else None

    reference = policy.reference if ppo.kl_coef > 0 else None
    bar = tqdm(total=cfg.total_updates, initial=counters["update"],
               desc=f"{ppo.advantage if grouped else 'ppo'} {task.name}",
               disable=not (progress and main))
    nan_streak = 0  # non-finite minibatches in a row, across updates
    scope = contextlib.ExitStack()  # what the run changes in the process, undone in `finally`
    scope.enter_context(cpu_threads(policy))
    try:
        for update in range(counters["update"], cfg.total_updates):
            # 1. collect num_steps x num_envs transitions with the current policy (group runs: one
            #    episode per env from this update's group starts, at most num_steps steps each)
            t0 = time.perf_counter()
            policy.eval()
            sample_kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             generator=sampling, invalid_action_penalty=ppo.invalid_action_penalty,
                             reference=reference)
            if grouped:
                stats = collector.collect_groups(policy, buffer, update=update, **sample_kw)
            else:
                last_value, stats = collector.collect(policy, buffer, **sample_kw)
            collect_seconds = time.perf_counter() - t0

            # 2. advantages, then PPO epochs over shuffled minibatches
            if grouped:
                buffer.advantages, buffer.returns, group_stds = group_advantages(buffer, ppo)
            else:
                buffer.advantages, buffer.returns = rollout_advantages(buffer, last_value, ppo)
            t1 = time.perf_counter()
            try:
                result = ppo_update(model, optimizer, accelerator, buffer, ppo, shuffling,
                                    max_nan_skips=cfg.max_nan_skips, nan_streak=nan_streak)
            except TrainingDiverged as err:
                raise TrainingDiverged(_diverged(f"{err} (update {update + 1})", run_dir)) from None
            nan_streak = result.nan_streak
            counters["nan_skipped"] += result.nan_skipped
            scheduler.step()
            # Weights that blew up (a finite loss can still take a ruinous step) must not become "the
            # last good checkpoint": an update that writes one scores a minibatch first. Other updates
            # are caught by the next rollout, whose sampler refuses non-finite scores (NonFiniteLogits).
            counters["update"] = update + 1
            last = counters["update"] == cfg.total_updates
            saving = bool(cfg.checkpoint_every and counters["update"] % cfg.checkpoint_every == 0) or last
            if saving and not _weights_finite(accelerator, policy, result.last_batch, ppo):
                raise TrainingDiverged(_diverged(
                    f"the weights after update {update + 1} give a non-finite loss; they were not saved", run_dir))
            update_seconds = time.perf_counter() - t1

            # 3. metrics, gathered over ranks (the only other place ranks meet)
            done = collector.pop_finished()
            mine = _RolloutReport(done.returns, done.lengths, done.wins, stats.steps, stats.invalid,
                                  stats.response_tokens, stats.generate_seconds, collect_seconds,
                                  group_stds if grouped else [], stats.cut)
            reports = accelerator.gather_for_metrics([mine], use_gather_object=True)
            returns = [x for r in reports for x in r.returns]
            lengths = [x for r in reports for x in r.lengths]
            wins = [x for r in reports for x in r.wins]
            steps = sum(r.steps for r in reports)
            tokens = sum(r.response_tokens for r in reports)
            counters["env_steps"] += steps
            metrics: dict[str, Any] = {_LOSS_METRICS[k]: v for k, v in result.losses.items()}
            metrics.update({
                M.EPISODES: len(returns),
                M.SUCCESS_RATE: float(np.mean(wins)) if wins else None,
                M.EPISODIC_RETURN: float(np.mean(returns)) if returns else None,
                M.EPISODIC_LENGTH: float(np.mean(lengths)) if lengths else None,
                M.INVALID_ACTION_RATE: sum(r.invalid for r in reports) / max(steps, 1),
                M.RESPONSE_LENGTH: tokens / max(steps, 1),
                M.ENV_STEPS: counters["env_steps"],
                M.ENV_STEPS_PER_SECOND: steps / max(max(r.collect_seconds for r in reports), 1e-9),
                M.TOKENS_PER_SECOND: tokens / max(max(r.generate_seconds for r in reports), 1e-9),
                M.UPDATE_SECONDS: update_seconds,
                M.PPO_EPOCHS: result.epochs,
                M.LEARNING_RATE: optimizer.param_groups[0]["lr"],
                M.NAN_SKIPPED: counters["nan_skipped"],
            })
            if grouped:  # no value function: no value loss nor explained variance to show
                metrics.pop(M.VALUE_LOSS, None)
                stds = [x for r in reports for x in r.group_return_stds]
                metrics[M.GROUP_RETURN_STD] = float(np.mean(stds))
                metrics[M.EPISODES_CUT] = sum(r.cut for r in reports)
            else:
                metrics[M.EXPLAINED_VARIANCE] = explained_variance(buffer.values.flatten(), buffer.returns.flatten())
            if main and cfg.eval_every and counters["update"] % cfg.eval_every == 0:
                metrics.update(_held_out(task, policy, cfg))
            if main:
                logger.log(counters["update"], metrics)
                _write_samples(run_dir, counters["update"], buffer, cfg.log_samples,
                               images=counters["update"] == cfg.total_updates)
                bar.update(1)
                if metrics[M.SUCCESS_RATE] is not None:
                    bar.set_postfix(success=f"{metrics[M.SUCCESS_RATE]:.2f}")

            if callback is not None:
                callback(RankUpdate(counters["update"], rank, accelerator.num_processes,
                                    len(done.returns), stats.steps, policy))

            # 4. checkpoint: every K updates and at the end
            if saving:
                _checkpoint(accelerator, run_dir, counters["update"], cfg.keep_checkpoints, policy, run_state)
    except NonFiniteLogits:  # a rollout or held-out evaluation sampled from weights no checkpoint holds
        raise TrainingDiverged(_diverged(
            f"the weights after update {counters['update']} sample from non-finite scores", run_dir)) from None
    finally:
        scope.close()
        bar.close()
        collector.close()
        if logger is not None:
            logger.close()

    final = run_dir / "final"
    if main:
        policy.save(final)
        plot_learning_curve(run_dir / M.METRICS_FILE, run_dir / "learning_curve.png",
                            keys=(M.SUCCESS_RATE, M.EPISODIC_RETURN, M.INVALID_ACTION_RATE))
    accelerator.wait_for_everyone()
    return final


# --- the update: advantages, then epochs over minibatches -------------------------------------------


def rollout_advantages(buffer: RolloutBuffer, last_value: Tensor, ppo: PPOConfig) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns of a full buffer, [T, N] each; ``last_value`` is V(s_T), [N].

    With ``ppo.normalize_advantages`` the advantages are normalised over the whole rollout, as the
    paper's code does, so every minibatch of every epoch sees the same targets; the returns (the
    value target) stay the raw advantages + values.
    """
    advantages, returns = gae(buffer.rewards, buffer.values, buffer.terminated, buffer.truncated, last_value,
                              buffer.final_values, gamma=ppo.gamma, lam=ppo.gae_lambda)
    if ppo.normalize_advantages:
        advantages = normalize_advantages(advantages.flatten()).view_as(advantages)
    return advantages, returns


def group_advantages(buffer: RolloutBuffer, ppo: PPOConfig) -> tuple[Tensor, Tensor, list[float]]:
    """Group-relative advantages of a rollout of whole episodes (``Collector.collect_groups``).

    The real transitions (``buffer.mask``) are laid out flat with their episode, step index, group
    and state id, and handed to ``vlmrl.algorithms.group``: GRPO and RLOO give every step its
    episode's advantage; GiGPO adds ``ppo.gigpo_step_weight`` times the step-level one over
    identical states, its returns-to-go discounted by ``ppo.gamma``. ``ppo.normalize_group_std``
    divides by the group's std; ``ppo.normalize_advantages`` (a GAE setting) is not applied: a group
    whose returns are all equal keeps advantage 0. An episode cut at ``num_steps`` counts the
    rewards it collected (no bootstrap: there is no value function).

    Returns:
        advantages [T, N] (0 on padding), returns [T, N] (zeros: a placeholder, there is no value
        target), and the population std of the episode returns of each group (the
        ``charts/group_return_std`` metric is their mean).
    """
    real = buffer.mask.flatten()
    rewards = buffer.rewards.flatten()[real]
    _, episode = torch.unique(buffer.episode.flatten()[real], return_inverse=True)  # 0..E-1
    num_episodes = int(episode.max()) + 1
    group = torch.zeros(num_episodes, dtype=torch.long).scatter_(0, episode, buffer.group.flatten()[real])
    returns = episode_returns(rewards, episode, num_episodes)
    if ppo.advantage == "gigpo":
        adv = gigpo_advantages(rewards, episode, buffer.step_index.flatten()[real], group,
                               buffer.state.flatten()[real], gamma=ppo.gamma, step_weight=ppo.gigpo_step_weight,
                               normalize_std=ppo.normalize_group_std)
    elif ppo.advantage == "grpo":
        adv = grpo_advantages(returns, group, normalize_std=ppo.normalize_group_std)[episode]
    elif ppo.advantage == "rloo":
        adv = rloo_advantages(returns, group)[episode]
    else:
        raise ValueError(f"group_advantages: ppo.advantage {ppo.advantage!r} is not a group estimator")
    advantages = torch.zeros(buffer.num_steps * buffer.num_envs)
    advantages[real] = adv.to(advantages.dtype)
    stds = [float(returns[group == g].std(unbiased=False)) for g in torch.unique(group).tolist()]
    shape = (buffer.num_steps, buffer.num_envs)
    return advantages.view(shape), torch.zeros(shape), stds


def make_optimizer(policy: VLMPolicy, ppo: PPOConfig) -> torch.optim.AdamW:
    """AdamW over the policy's trainable parameters (a group estimator's policy has no value head).

    With ``ppo.value_lr`` the value head's parameters form a second group at that rate (group 0 is
    the rest of the policy, at ``ppo.lr``)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    head = [] if ppo.value_lr is None or policy.value_head is None else \
        [p for p in policy.value_head.parameters() if p.requires_grad]
    if not head:
        return torch.optim.AdamW(trainable, lr=ppo.lr, eps=ppo.adam_eps, weight_decay=ppo.weight_decay)
    in_head = {id(p) for p in head}
    groups = [{"params": [p for p in trainable if id(p) not in in_head]}, {"params": head, "lr": ppo.value_lr}]
    return torch.optim.AdamW(groups, lr=ppo.lr, eps=ppo.adam_eps, weight_decay=ppo.weight_decay)


def ppo_update(model, optimizer, accelerator, buffer: RolloutBuffer, ppo: PPOConfig, generator: torch.Generator,
               *, max_nan_skips: int, nan_streak: int = 0) -> UpdateStats:
    """One PPO update: ``ppo.epochs`` passes over ``buffer`` in shuffled minibatches (SB3's ``train()``).

    Args:
        model: the policy as ``accelerator.prepare`` returned it (DDP-wrapped when there are ranks).
        optimizer: its optimizer (``make_optimizer``), prepared with it.
        accelerator: built with ``gradient_accumulation_steps=ppo.grad_accum_steps``.
        buffer: a full rollout with its ``advantages`` and ``returns`` set (``rollout_advantages``).
        ppo: loss weights, clipping, epochs, minibatch size, accumulation, target_kl.
        generator: draws each epoch's order.
        max_nan_skips: raise TrainingDiverged at this many non-finite minibatches in a row, counting on
            from the ``nan_streak`` that ended the previous update.

    The optimizer steps after every ``ppo.grad_accum_steps`` minibatches and after the last one of each
    epoch, so no gradient is left over for the next epoch or update. The epochs stop early once the
    mean approx_kl over ranks exceeds ``ppo.target_kl`` (every rank runs the same number).
    """
    k = ppo.grad_accum_steps
    if accelerator.gradient_accumulation_steps != k:
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} minibatches "
                         f"and ppo.grad_accum_steps is {k}: build it with gradient_accumulation_steps={k}")
    params = [p for group in optimizer.param_groups for p in group["params"]]  # what the optimizer steps
    stats = UpdateStats(nan_streak=nan_streak)
    sums: dict[str, float] = {}
    model.train()
    for epoch in range(1, ppo.epochs + 1):
        stats.epochs = epoch
        batches = list(buffer.minibatches(ppo.minibatch_size, generator))
        epoch_kl: list[float] = []
        for i, mb in enumerate(batches):
            stats.last_batch = mb
            group = min(k, len(batches) - i // k * k)  # minibatches accumulated with this one (short at the end)
            out = _minibatch_step(model, optimizer, accelerator, params, mb, ppo, stats,
                                  sync=(i + 1) % k == 0 or i + 1 == len(batches), scale=k / group)
            if out is None:
                stats.nan_skipped += 1
                stats.nan_streak += 1
                if stats.nan_streak >= max(max_nan_skips, 1):
                    raise TrainingDiverged(f"{stats.nan_streak} minibatches in a row had a non-finite loss or gradient")
                continue
            stats.nan_streak = 0
            stats.minibatches += 1
            for field in _LOSS_METRICS:
                sums[field] = sums.get(field, 0.0) + float(getattr(out, field).detach())
            epoch_kl.append(float(out.approx_kl))
        # Early stop once the policy has moved far from the one that collected the data (decided on
        # the mean over ranks, so every rank runs the same number of epochs).
        if ppo.target_kl is not None and _rank_mean(accelerator, epoch_kl) > ppo.target_kl:
            break
    stats.losses = {field: total / stats.minibatches for field, total in sums.items()}
    return stats


def _minibatch_step(model, optimizer, accelerator, params, mb: RolloutBatch, ppo: PPOConfig, stats: UpdateStats,
                    *, sync: bool, scale: float) -> PPOLoss | None:
    """Forward, loss and backward of one minibatch, and with ``sync`` the clipped optimizer step.

    Returns the loss terms, or None when the loss or the gradient norm is non-finite: nothing steps
    then, and ``zero_grad`` drops the group's gradients (accelerate makes it a no-op until the group's
    last minibatch, so a skip before that drops only this one). Every rank decides alike (all-reduced
    flag, all-reduced gradients), or DDP's all-reduce would wait forever. ``scale`` weighs the loss
    (accelerate divides it by grad_accum_steps): k / len(group), so a short group is a mean too.
    Adds the forward+backward time and the optimizer step to ``stats``.
    """
    with _accumulate(accelerator, model, sync):
        start = time.perf_counter()
        out = _loss(model(mb.images, mb.prompts, mb.response_ids, legal_actions=mb.legal_actions), mb, ppo)
        if not _all_finite(accelerator, out.loss):
            optimizer.zero_grad()
            return None
        accelerator.backward(out.loss if scale == 1.0 else out.loss * scale)
        stats.forward_backward_seconds += time.perf_counter() - start
        if not accelerator.sync_gradients:
            return out
        norm = accelerator.clip_grad_norm_(params, ppo.max_grad_norm)  # a tensor; DeepSpeed: a float or None
        if norm is not None and not math.isfinite(float(norm)):
            optimizer.zero_grad()
            return None
        optimizer.step()
        optimizer.zero_grad()
        stats.optimizer_steps += 1
        return out


def _accumulate(accelerator, model, sync: bool):
    """``accelerator.accumulate(model)`` that syncs (gradient all-reduce, optimizer step) exactly when ``sync``.

    Left alone, accelerate syncs on every k-th call since it was built and restarts the count only at
    the end of a DataLoader it prepared, which the buffer is not: an epoch of 3 minibatches with k = 2
    would carry half a group into the next epoch or update (and a resumed run, whose checkpoint holds
    no gradients, would differ). So its counter is set: ``accumulate`` adds one and syncs on a multiple of k.
    """
    accelerator.step = accelerator.gradient_accumulation_steps - 1 if sync else 0
    return accelerator.accumulate(model)


def _loss(ev, mb: RolloutBatch, ppo: PPOConfig) -> PPOLoss:
    """The PPO loss of the policy's evaluation ``ev`` of ``mb`` (its tensors moved to ``ev``'s device).

    A group estimator has no value function: its value loss is off (weight 0, and exactly 0, since
    the value is compared with itself, detached), so no gradient reaches the value head."""
    dev = ev.values.device
    if ppo.advantage != "gae":
        value = ev.values.detach()
        return ppo_loss(ev.action_logprob, mb.old_logprob.to(dev), mb.advantages.to(dev), value, value, value,
                        clip=ppo.clip, value_clip=None, value_coef=0.0, entropy=ev.entropy, ent_coef=ppo.ent_coef,
                        ref_logprob=None if mb.ref_logprob is None else mb.ref_logprob.to(dev),
                        kl_coef=ppo.kl_coef)
    return ppo_loss(ev.action_logprob, mb.old_logprob.to(dev), mb.advantages.to(dev), ev.values,
                    mb.old_value.to(dev), mb.returns.to(dev), clip=ppo.clip, value_clip=ppo.value_clip,
                    value_coef=ppo.value_coef, entropy=ev.entropy, ent_coef=ppo.ent_coef,
                    ref_logprob=None if mb.ref_logprob is None else mb.ref_logprob.to(dev), kl_coef=ppo.kl_coef)


# --- helpers ----------------------------------------------------------------------------------------


def _rank_mean(accelerator, values: list[float]) -> float:
    mean = torch.tensor([float(np.mean(values)) if values else 0.0], device=accelerator.device)
    return float(accelerator.reduce(mean, "mean"))


def _held_out(task, policy, cfg: TrainConfig) -> dict[str, float]:
    """Held-out success of the current policy (rank 0 only), logged as eval/*."""
    from vlmrl.evaluate import ModelPolicy, evaluate

    agent = ModelPolicy(policy, task, cfg.cot, cfg.temperature, cfg.seed, cfg.max_new_tokens)
    r = evaluate(task, agent, cfg.eval_episodes, seed=cfg.seed, num_envs=min(cfg.eval_episodes, 32),
                 env_kwargs=cfg.env_kwargs, progress=False, history_length=cfg.history_length,
                 env_workers=cfg.env_workers, env_timeout_s=cfg.env_timeout_s)
    return {M.EVAL_SUCCESS_RATE: r.success_rate, M.EVAL_SUCCESS_CI95_LOW: r.success_ci95[0],
            M.EVAL_SUCCESS_CI95_HIGH: r.success_ci95[1], M.EVAL_EPISODIC_RETURN: r.mean_return,
            M.EVAL_INVALID_ACTION_RATE: r.invalid_action_rate}


class _RunState:
    """What accelerate does not checkpoint itself: counters, and each rank's own generators and envs
    (registered with ``register_for_checkpointing``).

    accelerate writes registered objects from the main process only, so ``gather`` (every rank,
    before ``save_state``) collects every rank's part into ``state_dict``, and ``load_state_dict``
    keeps this rank's. The global RNGs are captured too, although accelerate saves them per rank:
    its loader swallows any error (logged at info level), so a failed restore would go unnoticed.
    """

    def __init__(self, accelerator, counters: dict[str, int], generators: dict[str, torch.Generator],
                 collector: Collector, seed: int):
        self.accelerator, self.counters, self.generators = accelerator, counters, generators
        self.collector, self.seed = collector, seed
        self._ranks: list[dict[str, Any]] | None = None

    def gather(self) -> None:
        from accelerate.utils import gather_object

        mine = {"rng": capture_rng_state(self.generators), "envs": self.collector.state()}
        self._ranks = gather_object([mine])

    def state_dict(self) -> dict[str, Any]:
        if self._ranks is None:
            raise RuntimeError("_RunState.gather() must run on every rank before save_state")
        state = {"counters": dict(self.counters), "ranks": self._ranks}
        self._ranks = None  # a later save gathers afresh
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(state["ranks"]) != world:
            raise UserError(f"the checkpoint was written by {len(state['ranks'])} processes and this run has "
                            f"{world}: resume with the same number of processes")
        self.counters.update(state["counters"])
        mine = state["ranks"][rank]
        restore_rng_state(mine["rng"], self.generators)
        self.collector.load_state(mine["envs"], self.seed, rank, self.counters["update"])


def _checkpoint(accelerator, run_dir: Path, step: int, keep: int, policy, run_state: _RunState) -> None:
    """Atomic checkpoint written by every rank: ``accelerate/`` (optimizer, schedule, RNGs, envs,
    counters) and, from rank 0, ``policy/`` (the weights, a folder ``VLMPolicy.load`` reads)."""
    run_state.gather()
    token = _broadcast(f"{os.getpid()}-{uuid.uuid4().hex[:8]}" if accelerator.is_main_process else None)

    def write(folder: Path) -> None:
        accelerator.save_state(str(folder / ACCELERATE_STATE))
        if accelerator.is_main_process:
            policy.save(folder / "policy")

    save_checkpoint(run_dir, step, write, keep=keep, ranks=accelerator, token=token)


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (one all-reduce)."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1).to(accelerator.device)
    return int(accelerator.reduce(flag, "sum").item()) == accelerator.num_processes


@torch.no_grad()
def _weights_finite(accelerator, policy, mb: RolloutBatch, ppo: PPOConfig) -> bool:
    """Whether the current weights give a finite PPO loss (without the KL term) on ``mb`` on every
    rank (no RNG drawn)."""
    was_training = policy.training
    policy.eval()
    try:
        out = _loss(policy(mb.images, mb.prompts, mb.response_ids, legal_actions=mb.legal_actions),
                    mb._replace(ref_logprob=None), ppo)
    finally:
        policy.train(was_training)
    return _all_finite(accelerator, out.loss)


def _diverged(what: str, run_dir: Path) -> str:
    kept = latest_checkpoint(run_dir, clean=False)
    where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint had been written yet"
    return f"{what}; stopped: {where}. Lower ppo.lr (or raise max_nan_skips) and start again"


def _truncate_samples(path: Path, max_update: int) -> None:
    """On resume, drop the samples of updates after the checkpoint (they are collected again)."""
    filter_jsonl(path, lambda row: isinstance(row.get("update"), int) and row["update"] <= max_update)


def _write_samples(run_dir: Path, update: int, buffer: RolloutBuffer, n: int, images: bool = False) -> None:
    """A few transcripts per update (response, reward) for people to read; with ``images``, also
    PNGs of the observation beside its prompt, response and reward (written for the last update)."""
    if n <= 0:
        return
    from vlmrl.render import compose

    rewards, valid = buffer.rewards.flatten(), buffer.valid.flatten()
    with open(run_dir / "samples.jsonl", "a") as f:
        for i in range(min(n, len(buffer))):
            f.write(json.dumps({"update": update, "response": buffer.response_texts[i],
                                "reward": float(rewards[i]), "valid": bool(valid[i])}) + "\n")
            if images:
                (run_dir / "samples").mkdir(exist_ok=True)
                text = (f"PROMPT\n{buffer.prompts[i]}\n\nRESPONSE\n{buffer.response_texts[i]}\n\n"
                        f"REWARD {float(rewards[i]):g}{'' if valid[i] else ' (unparsable: random action)'}")
                compose(buffer.images[i], text).save(run_dir / "samples" / f"update{update}-{i}.png")
