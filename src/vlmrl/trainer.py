"""PPO fine-tuning of a VLM agent: collect -> advantages -> update -> log -> save. Reads top to bottom.

One process or many (``accelerate launch``): every rank steps its own envs for a fixed number of
steps and meets the others only inside the update (gradient all-reduce) and at logging, so ranks
whose rollouts take different times never time out a collective while collecting.
"""

from __future__ import annotations

import json
import math
import time
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


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run PPO as configured; return the folder of the final policy (``<out_dir>/final``)."""
    from accelerate import Accelerator

    from vlmrl.policy.model import VLMPolicy
    from vlmrl.sft import resolve_model

    ppo = cfg.ppo
    accelerator = Accelerator(gradient_accumulation_steps=ppo.grad_accum_steps)
    rank, main = accelerator.process_index, accelerator.is_main_process
    run_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed * 1000 + rank)
    np.random.seed(cfg.seed * 1000 + rank)
    task = get_task(cfg.task)

    # --- where to start from ---------------------------------------------------------------------
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir}; start without --resume")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it or choose a new --out")
    source = str(checkpoint / "policy") if checkpoint else str(resolve_model(cfg.model))

    # --- policy, optimizer, learning-rate schedule -----------------------------------------------
    policy = VLMPolicy.load(source, cfg.policy_config())
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
    model, optimizer = accelerator.prepare(policy, optimizer)
    policy = accelerator.unwrap_model(model)  # sampling and saving go around the DDP wrapper

    collector = Collector(task, cfg.num_envs, cfg.seed, cfg.cot, rank)
    buffer = RolloutBuffer(cfg.num_steps, cfg.num_envs)
    sampling = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
    shuffling = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 2)
    generators = {"sampling": sampling, "shuffling": shuffling}
    counters = {"update": 0, "env_steps": 0, "nan_skipped": 0}

    if checkpoint is not None:
        state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        counters = state["counters"]
        restore_rng_state(state["rng"][rank], generators)
        collector.load_state(state["envs"][rank], cfg.seed, rank, counters["update"])
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                           resume_step=counters["update"] if checkpoint else None,
                           wandb_project=cfg.wandb_project, wandb_run=cfg.wandb_run) if main else None

    reference = policy.reference if ppo.kl_coef > 0 else None
    bar = tqdm(total=cfg.total_updates, initial=counters["update"], desc=f"ppo {task.name}",
               disable=not (progress and main))
    nan_in_a_row = 0
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
            for _ in range(ppo.epochs):
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
                        # Every rank must skip together, or DDP's all-reduce would wait forever.
                        finite = accelerator.reduce(torch.isfinite(out.loss).float().reshape(1), "sum")
                        if int(finite.item()) < accelerator.num_processes:
                            counters["nan_skipped"] += 1
                            nan_in_a_row += 1
                            optimizer.zero_grad()
                            if nan_in_a_row >= max(cfg.max_nan_skips, 1):
                                raise TrainingDiverged(
                                    f"{nan_in_a_row} minibatches in a row had a non-finite loss (update "
                                    f"{update + 1}); stopped. The last good checkpoint in {run_dir} is kept: "
                                    "lower ppo.lr or raise ppo.max_grad_norm's strictness, then --resume"
                                )
                            continue
                        nan_in_a_row = 0
                        accelerator.backward(out.loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(params, ppo.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()
                    for k in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "kl_ref"):
                        sums[k] = sums.get(k, 0.0) + float(getattr(out, k))
                    batches += 1
            scheduler.step()
            update_seconds = time.perf_counter() - t1
            counters["update"] = update + 1

            # 3. metrics, gathered over ranks (the only other place ranks meet)
            done = collector.pop_finished()
            gathered = accelerator.gather_for_metrics(
                [(done.returns, done.lengths, stats.steps, stats.invalid, stats.response_tokens,
                  stats.generate_seconds, collect_seconds)], use_gather_object=True)
            returns = [r for g in gathered for r in g[0]]
            lengths = [n for g in gathered for n in g[1]]
            steps = sum(g[2] for g in gathered)
            counters["env_steps"] += steps
            metrics: dict[str, Any] = {f"losses/{k}": v / max(batches, 1) for k, v in sums.items()}
            metrics.update({
                "charts/episodes": len(returns),
                "charts/success_rate": float(np.mean([r > 0 for r in returns])) if returns else None,
                "charts/episodic_return": float(np.mean(returns)) if returns else None,
                "charts/episodic_length": float(np.mean(lengths)) if lengths else None,
                "charts/invalid_action_rate": sum(g[3] for g in gathered) / max(steps, 1),
                "charts/response_length": sum(g[4] for g in gathered) / max(steps, 1),
                "charts/env_steps": counters["env_steps"],
                "charts/env_steps_per_second": steps / max(max(g[6] for g in gathered), 1e-9),
                "charts/tokens_per_second": sum(g[4] for g in gathered) / max(max(g[5] for g in gathered), 1e-9),
                "charts/update_seconds": update_seconds,
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/nan_skipped": counters["nan_skipped"],
                "losses/explained_variance": explained_variance(buffer.values.flatten(), buffer.returns.flatten()),
            })
            if main:
                logger.log(counters["update"], metrics)
                _write_samples(run_dir, counters["update"], buffer, cfg.log_samples)
                bar.update(1)
                if metrics["charts/success_rate"] is not None:
                    bar.set_postfix(success=f"{metrics['charts/success_rate']:.2f}")

            # 4. checkpoint: every K updates and at the end
            last = counters["update"] == cfg.total_updates
            if (cfg.checkpoint_every and counters["update"] % cfg.checkpoint_every == 0) or last:
                _checkpoint(accelerator, run_dir, cfg, policy, optimizer, scheduler, counters, generators, collector)
    finally:
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


def _checkpoint(accelerator, run_dir, cfg, policy, optimizer, scheduler, counters, generators, collector) -> None:
    """Atomic checkpoint: policy, optimizer, schedule, counters, every rank's RNG and env states."""
    rng = accelerator.gather_for_metrics([capture_rng_state(generators)], use_gather_object=True)
    envs = accelerator.gather_for_metrics([collector.state()], use_gather_object=True)
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            policy.save(folder / "policy")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "counters": dict(counters), "rng": rng, "envs": envs}, folder / "trainer.pt")

        save_checkpoint(run_dir, counters["update"], write, keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def _write_samples(run_dir: Path, update: int, buffer: RolloutBuffer, n: int) -> None:
    """A few transcripts per update (prompt, response, reward) for people to read."""
    if n <= 0:
        return
    rewards = buffer.rewards.flatten()
    with open(run_dir / "samples.jsonl", "a") as f:
        for i in range(min(n, len(buffer))):
            f.write(json.dumps({"update": update, "response": buffer.response_texts[i],
                                "reward": float(rewards[i]), "valid": bool(buffer.valid.flatten()[i])}) + "\n")
