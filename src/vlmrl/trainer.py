"""PPO fine-tuning of a VLM agent: collect -> advantages -> update -> log -> save. Reads top to bottom.

One process or many (``accelerate launch``): every rank steps its own envs for a fixed number of
steps and meets the others only inside the update (gradient all-reduce) and at logging, so ranks
whose rollouts take different times never time out a collective while collecting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmrl.algorithms import explained_variance, ppo_loss
from vlmrl.checkpoint import capture_rng_state, latest_checkpoint, restore_rng_state, save_checkpoint
from vlmrl.config import TrainConfig, save_config
from vlmrl.errors import UserError
from vlmrl.metrics import MetricsLogger, plot_learning_curve
from vlmrl.rollout import RolloutBuffer
from vlmrl.rollout.collect import Collector
from vlmrl.tasks import get_task

ACCELERATE_STATE = "accelerate"  # the folder of a checkpoint that accelerator.save_state writes


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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          callback: Callable[[RankUpdate], None] | None = None) -> Path:
    """Run PPO as configured; return the folder of the final policy (``<out_dir>/final``).

    ``callback``, if given, runs on every rank after every update, before the checkpoint.
    """
    from accelerate import Accelerator

    from vlmrl.policy.model import VLMPolicy, cpu_threads
    from vlmrl.sft import resolve_model

    ppo = cfg.ppo
    # cpu=True on a host without CUDA: otherwise accelerate ignores the ranks torchrun started and
    # every process trains alone (DistributedType.NO); with it they join one gloo group.
    accelerator = Accelerator(gradient_accumulation_steps=ppo.grad_accum_steps, cpu=not torch.cuda.is_available())
    rank, main = accelerator.process_index, accelerator.is_main_process
    run_dir = Path(cfg.out_dir)
    random.seed(cfg.seed * 1000 + rank)
    torch.manual_seed(cfg.seed * 1000 + rank)
    np.random.seed(cfg.seed * 1000 + rank)
    task = get_task(cfg.task)

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
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it or choose a new --out")
    source = str(checkpoint / "policy") if checkpoint else str(resolve_model(cfg.model))

    # --- policy, optimizer, learning-rate schedule -----------------------------------------------
    policy_cfg = cfg.policy_config()
    if policy_cfg.device is None:  # each rank loads onto its own device, not all onto cuda:0
        policy_cfg = dataclasses.replace(policy_cfg, device=str(accelerator.device))
    policy = VLMPolicy.load(source, policy_cfg)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ppo.lr, eps=ppo.adam_eps, weight_decay=ppo.weight_decay)
    span = ppo.lr_schedule_updates or cfg.total_updates

    def lr_factor(update: int) -> float:
        if ppo.lr_schedule == "constant":
            return 1.0
        progress_ = min(update, span) / span
        end = ppo.end_lr / ppo.lr
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader to take the micro-batch size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = ppo.minibatch_size
    model, optimizer = accelerator.prepare(policy, optimizer)
    policy = accelerator.unwrap_model(model)  # sampling and saving go around the DDP wrapper

    collector = Collector(task, cfg.num_envs, cfg.seed, cfg.cot, rank, env_kwargs=cfg.env_kwargs)
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
    bar = tqdm(total=cfg.total_updates, initial=counters["update"], desc=f"ppo {task.name}",
               disable=not (progress and main))
    nan_in_a_row = 0
    scope = contextlib.ExitStack()  # what the run changes in the process, undone in `finally`
    scope.enter_context(cpu_threads(policy))
    try:
        for update in range(counters["update"], cfg.total_updates):
            # 1. collect num_steps x num_envs transitions with the current policy
            t0 = time.perf_counter()
            policy.eval()
            last_value, stats = collector.collect(
                policy, buffer, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, generator=sampling,
                invalid_action_penalty=ppo.invalid_action_penalty, reference=reference,
            )
            collect_seconds = time.perf_counter() - t0
            buffer.compute_advantages(last_value, gamma=ppo.gamma, lam=ppo.gae_lambda)

            # 2. PPO epochs over shuffled minibatches, gradients accumulated then clipped
            t1 = time.perf_counter()
            model.train()
            sums: dict[str, float] = {}
            batches = 0
            for epochs_run in range(1, ppo.epochs + 1):
                epoch_kl: list[float] = []
                for mb in buffer.minibatches(ppo.minibatch_size, shuffling, normalize=ppo.normalize_advantages):
                    with accelerator.accumulate(model):
                        ev = model(mb.images, mb.prompts, mb.response_ids)
                        dev = ev.values.device
                        out = ppo_loss(
                            ev.action_logprob, mb.old_logprob.to(dev), mb.advantages.to(dev), ev.values,
                            mb.old_value.to(dev), mb.returns.to(dev), clip=ppo.clip, value_clip=ppo.value_clip,
                            value_coef=ppo.value_coef, entropy=ev.entropy, ent_coef=ppo.ent_coef,
                            ref_logprob=None if mb.ref_logprob is None else mb.ref_logprob.to(dev),
                            kl_coef=ppo.kl_coef,
                        )
                        # A non-finite loss or gradient norm skips the minibatch (no step). Every
                        # rank decides alike (all-reduced flag, all-reduced gradients), or DDP's
                        # all-reduce would wait forever.
                        finite = _all_finite(accelerator, out.loss)
                        if finite:
                            accelerator.backward(out.loss)
                            if accelerator.sync_gradients:
                                norm = accelerator.clip_grad_norm_(params, ppo.max_grad_norm)
                                finite = norm is None or bool(torch.isfinite(norm))  # None: DeepSpeed clips
                        if not finite:
                            optimizer.zero_grad()
                            counters["nan_skipped"] += 1
                            nan_in_a_row += 1
                            if nan_in_a_row >= max(cfg.max_nan_skips, 1):
                                raise TrainingDiverged(_diverged(
                                    f"{nan_in_a_row} minibatches in a row had a non-finite loss or gradient "
                                    f"(update {update + 1})", run_dir))
                            continue
                        nan_in_a_row = 0
                        optimizer.step()
                        optimizer.zero_grad()
                    for k in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "kl_ref"):
                        sums[k] = sums.get(k, 0.0) + float(getattr(out, k).detach())
                    batches += 1
                    epoch_kl.append(float(out.approx_kl))
                # Early stop once the policy has moved far from the one that collected the data
                # (decided on the mean over ranks, so every rank runs the same number of epochs).
                if ppo.target_kl is not None and _rank_mean(accelerator, epoch_kl) > ppo.target_kl:
                    break
            scheduler.step()
            # Weights that blew up (a finite loss can still take a ruinous step) would sample NaNs in
            # the next rollout and must not become "the last good checkpoint": score one minibatch.
            if not _weights_finite(accelerator, policy, mb, ppo):
                raise TrainingDiverged(_diverged(
                    f"the weights after update {update + 1} give a non-finite loss; they were not saved", run_dir))
            update_seconds = time.perf_counter() - t1
            counters["update"] = update + 1

            # 3. metrics, gathered over ranks (the only other place ranks meet)
            done = collector.pop_finished()
            gathered = accelerator.gather_for_metrics(
                [(done.returns, done.lengths, done.wins, stats.steps, stats.invalid, stats.response_tokens,
                  stats.generate_seconds, collect_seconds)], use_gather_object=True)
            returns = [r for g in gathered for r in g[0]]
            lengths = [n for g in gathered for n in g[1]]
            wins = [w for g in gathered for w in g[2]]
            steps = sum(g[3] for g in gathered)
            counters["env_steps"] += steps
            metrics: dict[str, Any] = {f"losses/{k}": v / max(batches, 1) for k, v in sums.items()}
            metrics.update({
                "charts/episodes": len(returns),
                "charts/success_rate": float(np.mean(wins)) if wins else None,
                "charts/episodic_return": float(np.mean(returns)) if returns else None,
                "charts/episodic_length": float(np.mean(lengths)) if lengths else None,
                "charts/invalid_action_rate": sum(g[4] for g in gathered) / max(steps, 1),
                "charts/response_length": sum(g[5] for g in gathered) / max(steps, 1),
                "charts/env_steps": counters["env_steps"],
                "charts/env_steps_per_second": steps / max(max(g[7] for g in gathered), 1e-9),
                "charts/tokens_per_second": sum(g[5] for g in gathered) / max(max(g[6] for g in gathered), 1e-9),
                "charts/update_seconds": update_seconds,
                "charts/ppo_epochs": epochs_run,
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/nan_skipped": counters["nan_skipped"],
                "losses/explained_variance": explained_variance(buffer.values.flatten(), buffer.returns.flatten()),
            })
            if main and cfg.eval_every and counters["update"] % cfg.eval_every == 0:
                metrics.update(_held_out(task, policy, cfg))
            if main:
                logger.log(counters["update"], metrics)
                _write_samples(run_dir, counters["update"], buffer, cfg.log_samples,
                               images=counters["update"] == cfg.total_updates)
                bar.update(1)
                if metrics["charts/success_rate"] is not None:
                    bar.set_postfix(success=f"{metrics['charts/success_rate']:.2f}")

            if callback is not None:
                callback(RankUpdate(counters["update"], rank, accelerator.num_processes,
                                    len(done.returns), stats.steps, policy))

            # 4. checkpoint: every K updates and at the end
            last = counters["update"] == cfg.total_updates
            if (cfg.checkpoint_every and counters["update"] % cfg.checkpoint_every == 0) or last:
                _checkpoint(accelerator, run_dir, counters["update"], cfg.keep_checkpoints, policy, run_state)
    finally:
        scope.close()
        bar.close()
        collector.close()
        if logger is not None:
            logger.close()

    final = run_dir / "final"
    if main:
        policy.save(final)
        plot_learning_curve(run_dir / "metrics.jsonl", run_dir / "learning_curve.png",
                            keys=("charts/success_rate", "charts/episodic_return", "charts/invalid_action_rate"))
    accelerator.wait_for_everyone()
    return final


def _rank_mean(accelerator, values: list[float]) -> float:
    mean = torch.tensor([float(np.mean(values)) if values else 0.0], device=accelerator.device)
    return float(accelerator.reduce(mean, "mean"))


def _held_out(task, policy, cfg: TrainConfig) -> dict[str, float]:
    """Held-out success of the current policy (rank 0 only), logged as eval/*."""
    from vlmrl.evaluate import ModelPolicy, evaluate

    agent = ModelPolicy(policy, task, cfg.cot, cfg.temperature, cfg.seed, cfg.max_new_tokens)
    r = evaluate(task, agent, cfg.eval_episodes, seed=cfg.seed, num_envs=min(cfg.eval_episodes, 32),
                 env_kwargs=cfg.env_kwargs, progress=False)
    return {"eval/success_rate": r.success_rate, "eval/success_ci95_low": r.success_ci95[0],
            "eval/success_ci95_high": r.success_ci95[1], "eval/episodic_return": r.mean_return,
            "eval/invalid_action_rate": r.invalid_action_rate}


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
def _weights_finite(accelerator, policy, mb, ppo) -> bool:
    """Whether the current weights give a finite PPO loss on ``mb`` on every rank (no RNG drawn)."""
    was_training = policy.training
    policy.eval()
    try:
        ev = policy(mb.images, mb.prompts, mb.response_ids)
        dev = ev.values.device
        out = ppo_loss(ev.action_logprob, mb.old_logprob.to(dev), mb.advantages.to(dev), ev.values,
                       mb.old_value.to(dev), mb.returns.to(dev), clip=ppo.clip, value_clip=ppo.value_clip,
                       value_coef=ppo.value_coef, entropy=ev.entropy, ent_coef=ppo.ent_coef)
    finally:
        policy.train(was_training)
    return _all_finite(accelerator, out.loss)


def _diverged(what: str, run_dir: Path) -> str:
    kept = latest_checkpoint(run_dir, clean=False)
    where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint had been written yet"
    return f"{what}; stopped: {where}. Lower ppo.lr (or raise max_nan_skips) and start again"


def _truncate_samples(path: Path, max_update: int) -> None:
    """On resume, drop the samples of updates after the checkpoint (they are collected again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn line from a crash
        if isinstance(row, dict) and isinstance(row.get("update"), int) and row["update"] <= max_update:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


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
