"""Speed of the tiny VLM on this machine: rollouts (batched vs a per-sample loop) and the PPO update.

    python benchmarks/throughput.py                      # the --model tiny preset, NumberLine
    python benchmarks/throughput.py --model runs/demo/sft --envs 1 8 32 --minibatch-sizes 16 64

Rollout: env steps/s and response tokens/s of ``Collector.collect`` (one batched ``generate`` for all
envs per step, the log-prob taken from the sampled tokens) at each ``--envs``, against a per-sample
loop shaped like the paper's code: one env at a time, ``generate`` at batch 1, then a second forward
pass (``VLMPolicy.evaluate``) for the action log-prob and value, then ``env.step``.

Update: the trainer's own ``vlmrl.trainer.ppo_update`` (its loss, accumulation, clipping, AdamW and
non-finite checks, through accelerate) over the rollout collected at the largest ``--envs``, as
samples/s, and the achieved FLOP/s of forward+backward: matmul FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` over an untimed update on the same minibatches, divided by
the forward+backward time the update measures, against a dense fp32 ``torch.matmul`` peak measured in
the same run on the same threads.

Same settings as ``vlmrl demo`` (``configs/recipes/numberline.toml``) unless overridden. Every figure is a
best-effort wall-clock time: on a shared machine compare runs only with the load average printed.
When other jobs share the cores, ``--threads 1`` is the fair setting: the tiny model's small matmuls on
two contended OpenMP threads ran about 10x slower than on one (measured at load average 7 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmrl.policy  # noqa: F401  (registers the tiny model's processor)
from vlmrl.config import PolicyConfig, PPOConfig
from vlmrl.demo import load_recipe, recipe_file

_DEMO = load_recipe(recipe_file("NumberLine"))  # the demo's recipe file
PPO, TRAIN = _DEMO["ppo"], _DEMO["train"]
from vlmrl.errors import UserError
from vlmrl.metrics import load_average, machine_line
from vlmrl.policy.model import VLMPolicy
from vlmrl.rollout import RolloutBuffer
from vlmrl.rollout.collect import Collector
from vlmrl.tasks import Task, get_task
from vlmrl.tasks.parsing import parse_action
from vlmrl.trainer import make_optimizer, ppo_update, rollout_advantages

ROLLOUT_TARGET = 10.0  # batched at 32 envs vs the per-sample loop, env steps/s
FLOP_TARGET = 0.30  # forward+backward FLOP/s as a fraction of the measured matmul peak


# --- the machine ------------------------------------------------------------------------------------


def machine() -> str:
    """Date, CPU, cores, torch threads and version, load average: the line printed above every table."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return machine_line(f"torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}")


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best dense matmul FLOP/s over ``repeats`` products of two [n, n] matrices (2 n^3 FLOPs each)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool and kernel selection
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# --- rollouts -----------------------------------------------------------------------------------------


@dataclass
class RolloutResult:
    mode: str  # "batched" or "per-sample loop"
    envs: int
    env_steps: int
    response_tokens: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / self.seconds


def _cold_caches(policy: VLMPolicy) -> None:
    """Every timed rollout starts with empty input and boundary caches, so the order of the rows in
    the table does not favour the later ones (within a rollout both loops reuse them alike)."""
    policy.input_cache.clear()
    policy.boundary_cache.clear()


def batched_rollout(policy: VLMPolicy, task: Task, num_envs: int, num_steps: int, *, temperature: float,
                    max_new_tokens: int, seed: int = 0) -> tuple[RolloutResult, RolloutBuffer, torch.Tensor]:
    """``num_steps`` steps of ``num_envs`` envs through the trainer's ``Collector`` (one batched
    generate per step, no second forward pass). Returns the timing, the filled buffer and V(s_T)."""
    _cold_caches(policy)
    collector = Collector(task, num_envs, seed, cot=True)
    buffer = RolloutBuffer(num_steps, num_envs)
    generator = torch.Generator().manual_seed(seed)
    try:
        t0 = time.perf_counter()
        last_value, stats = collector.collect(policy, buffer, temperature=temperature, top_p=1.0,
                                              max_new_tokens=max_new_tokens, generator=generator)
        seconds = time.perf_counter() - t0
    finally:
        collector.close()
    return RolloutResult("batched", num_envs, stats.steps, stats.response_tokens, seconds), buffer, last_value


@torch.no_grad()
def per_sample_rollout(policy: VLMPolicy, task: Task, num_envs: int, env_steps: int, *, temperature: float,
                       max_new_tokens: int, seed: int = 0) -> RolloutResult:
    """The structure of the paper's rollout: for each env in turn, sample its response at batch 1,
    score it again with a second forward pass (action log-prob and value), parse, step the env."""
    _cold_caches(policy)
    envs = [task.make_env() for _ in range(num_envs)]
    state = [env.reset(seed=seed * 1000 + i) for i, env in enumerate(envs)]
    generator = torch.Generator().manual_seed(seed)
    parse_rng = np.random.default_rng(seed)
    tokens = 0
    policy.eval()
    try:
        t0 = time.perf_counter()
        for k in range(env_steps):
            i = k % num_envs
            obs, info = state[i]
            prompt = task.prompt(info, True)
            gen = policy.generate([obs], [prompt], temperature=temperature, max_new_tokens=max_new_tokens,
                                  seed=generator)
            ids = [gen.response_ids[0, : int(gen.lengths[0])].tolist()]
            scored = policy.score([obs], [prompt], ids)  # the second forward pass
            float(scored.action_logprob[0]), float(scored.values[0])  # used as the paper stores them
            parsed = parse_action(gen.texts[0], task.legal_actions(info), parse_rng)
            obs, _, terminated, truncated, info = envs[i].step(parsed.action)
            state[i] = envs[i].reset() if terminated or truncated else (obs, info)
            tokens += int(gen.lengths[0])
        seconds = time.perf_counter() - t0
    finally:
        for env in envs:
            env.close()
    return RolloutResult("per-sample loop", num_envs, env_steps, tokens, seconds)


# --- the PPO update -------------------------------------------------------------------------------


@dataclass
class UpdateResult:
    minibatch_size: int
    samples: int  # samples processed in the timed epochs
    seconds: float  # the whole ppo_update: forward, backward, finite checks, clipping, optimizer steps
    fwd_bwd_seconds: float  # evaluate (input encoding included) + loss + its finite check + backward
    encode_seconds: float  # the input encoding alone (processor, padding), timed apart
    flops: float  # matmul FLOPs of forward+backward over the timed epochs, counted
    peak: float  # measured dense matmul FLOP/s

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds

    @property
    def flops_per_second(self) -> float:
        return self.flops / self.fwd_bwd_seconds

    @property
    def fraction_of_peak(self) -> float:
        return self.flops_per_second / self.peak

    @property
    def fraction_of_peak_model_only(self) -> float:
        """Counting only the model's own time (forward+backward minus input encoding)."""
        return self.flops / max(self.fwd_bwd_seconds - self.encode_seconds, 1e-9) / self.peak


def time_update(policy: VLMPolicy, buffer: RolloutBuffer, ppo: PPOConfig, minibatch_size: int, epochs: int,
                peak: float, seed: int = 0) -> UpdateResult:
    """Time one ``ppo_update`` of ``epochs`` epochs over ``buffer``, as the trainer runs it (it trains
    the weights: call on a policy loaded for the benchmark).

    A first, untimed update runs under ``FlopCounterMode`` (it is also the warm-up); both draw their
    minibatches from a generator seeded alike, so the timed update does exactly the FLOPs counted.
    target_kl is off, so that both run every epoch.
    """
    from accelerate import Accelerator

    ppo = replace(ppo, minibatch_size=minibatch_size, epochs=epochs, target_kl=None)
    accelerator = Accelerator(gradient_accumulation_steps=ppo.grad_accum_steps, cpu=not torch.cuda.is_available())
    model, optimizer = accelerator.prepare(policy, make_optimizer(policy, ppo))

    def update():  # a NaN here makes the figure meaningless: stop at the first
        return ppo_update(model, optimizer, accelerator, buffer, ppo, torch.Generator().manual_seed(seed),
                          max_nan_skips=1)

    counter = FlopCounterMode(display=False)
    with counter:
        update()
    t0 = time.perf_counter()
    stats = update()
    seconds = time.perf_counter() - t0

    # The encoding alone (image processor, chat template, padding), on the same minibatches.
    encode_seconds = 0.0
    order = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(stats.epochs):
            for mb in buffer.minibatches(minibatch_size, order):
                t1 = time.perf_counter()
                policy.encode(mb.images, mb.prompts, mb.response_ids)
                encode_seconds += time.perf_counter() - t1
    return UpdateResult(minibatch_size, stats.epochs * len(buffer), seconds, stats.forward_backward_seconds,
                        encode_seconds, counter.get_total_flops(), peak)


# --- tables ---------------------------------------------------------------------------------------


def rollout_table(rows: list[RolloutResult], baseline: RolloutResult) -> str:
    lines = ["| rollout | envs | env steps | seconds | env steps/s | response tokens/s | vs per-sample loop |",
             "|---|---|---|---|---|---|---|"]
    for r in [baseline, *rows]:
        lines.append(f"| {r.mode} | {r.envs} | {r.env_steps} | {r.seconds:.1f} | {r.steps_per_second:.2f} | "
                     f"{r.tokens_per_second:.0f} | {r.steps_per_second / baseline.steps_per_second:.1f}x |")
    return "\n".join(lines)


def update_table(rows: list[UpdateResult]) -> str:
    lines = ["| PPO update | minibatch | samples | samples/s | fwd+bwd s | of which encoding s | "
             "GFLOP (fwd+bwd) | GFLOP/s | % of peak | % of peak, model only |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| epochs over the rollout | {r.minibatch_size} | {r.samples} | {r.samples_per_second:.1f} | "
                     f"{r.fwd_bwd_seconds:.2f} | {r.encode_seconds:.2f} | {r.flops / 1e9:.2f} | "
                     f"{r.flops_per_second / 1e9:.2f} | {100 * r.fraction_of_peak:.2f} | "
                     f"{100 * r.fraction_of_peak_model_only:.2f} |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------


def _load(model: str, temperature: float, max_new_tokens: int) -> VLMPolicy:
    from vlmrl.policy.presets import resolve_model

    config = PolicyConfig(finetune="full", train_vision=False, temperature=temperature,
                          max_new_tokens=max_new_tokens, thought_weight=PPO.thought_weight)
    return VLMPolicy.load(str(resolve_model(model)), config)


def _build_variant(overrides: list[str], out: Path) -> str:
    """A tiny model with ``TinySize`` overrides (``key=value``), built into ``out``."""
    from vlmrl.policy.tiny import TINY_PRESET, build_tiny_vlm

    sizes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        sizes[key] = json.loads(value)
    return str(build_tiny_vlm(out, **{**TINY_PRESET, **sizes}))


def _warm_up(policy: VLMPolicy, task: Task) -> None:
    """One untimed pass of every call both rollouts make, at batch 1 and 2: the first call of each
    shape pays one-time costs (thread pool, allocator, kernel choice) that neither side should carry."""
    env = task.make_env()
    obs, info = env.reset(seed=0)
    env.close()
    for n in (1, 2):
        gen = policy.generate([obs] * n, [task.prompt(info)] * n, max_new_tokens=4, seed=0)
        ids = [gen.response_ids[i, : int(gen.lengths[i])].tolist() for i in range(n)]
        with torch.no_grad():
            policy.score([obs] * n, [task.prompt(info)] * n, ids)
        policy.values([obs] * n, [task.prompt(info)] * n)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (the preset) or a model / policy folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="build a tiny variant with these TinySize fields instead, e.g. hidden_size=256")
    parser.add_argument("--task", default="NumberLine")
    parser.add_argument("--envs", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--env-steps", type=int, default=TRAIN["num_envs"] * TRAIN["num_steps"],
                        help="at least this many env steps per batched measurement, rounded up to whole steps "
                             "(default: one rollout of vlmrl demo)")
    parser.add_argument("--baseline-steps", type=int, default=32, help="env steps of the per-sample loop")
    parser.add_argument("--max-new-tokens", type=int, default=TRAIN["max_new_tokens"])
    parser.add_argument("--temperature", type=float, default=TRAIN["temperature"])
    parser.add_argument("--minibatch-sizes", nargs="+", type=int, default=[PPO.minibatch_size, 64])
    parser.add_argument("--epochs", type=int, default=PPO.epochs, help="timed PPO epochs per minibatch size")
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the [n, n] fp32 matmul peak")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.envs + args.minibatch_sizes + [args.env_steps, args.baseline_steps, args.epochs]) < 1:
        parser.error("--envs, --env-steps, --baseline-steps, --minibatch-sizes and --epochs must be >= 1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # leave the process as it was (the smoke test runs in-process)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    task = get_task(args.task)
    with tempfile.TemporaryDirectory() as tmp:
        model = _build_variant(args.set, Path(tmp) / "model") if args.set else args.model
        policy = _load(model, args.temperature, args.max_new_tokens)
    parameters = sum(p.numel() for p in policy.parameters())
    print(f"machine: {machine()}")
    print(f"model: {model if not args.set else 'tiny ' + ' '.join(args.set)} ({parameters / 1e6:.2f}M parameters), "
          f"task {task.name}, max {args.max_new_tokens} new tokens at temperature {args.temperature}\n", flush=True)

    kw = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    _warm_up(policy, task)

    baseline = per_sample_rollout(policy, task, max(args.envs), args.baseline_steps, **kw)
    rows, buffer, last_value = [], None, None
    for n in args.envs:
        result, buf, last = batched_rollout(policy, task, n, math.ceil(args.env_steps / n), **kw)
        rows.append(result)
        if n == max(args.envs):
            buffer, last_value = buf, last
    print(rollout_table(rows, baseline) + "\n", flush=True)

    buffer.advantages, buffer.returns = rollout_advantages(buffer, last_value, PPO)
    peak_before = matmul_peak(args.peak_size)
    updates = [time_update(policy, buffer, PPO, size, args.epochs, peak_before, seed=args.seed)
               for size in args.minibatch_sizes]
    peak = max(peak_before, matmul_peak(args.peak_size))  # the better of two, so the fraction is not flattered
    for u in updates:
        u.peak = peak
    print(update_table(updates))
    print(f"\npeak: {peak / 1e9:.1f} GFLOP/s (dense fp32 torch.matmul of [{args.peak_size}]^2 matrices, best of "
          f"two runs of 5, {torch.get_num_threads()} threads); PPO settings from configs/recipes/numberline.toml "
          f"(grad_accum_steps {PPO.grad_accum_steps}); rollout of {len(buffer)} samples")

    at = [r for r in rows if r.envs == max(args.envs)][0]
    speedup = at.steps_per_second / baseline.steps_per_second
    best_fraction = max(u.fraction_of_peak for u in updates)
    print(f"target: batched at {at.envs} envs >= {ROLLOUT_TARGET:.0f}x the per-sample loop: {speedup:.1f}x "
          f"({'met' if speedup >= ROLLOUT_TARGET else 'MISSED'})")
    print(f"target: forward+backward >= {100 * FLOP_TARGET:.0f}% of peak: {100 * best_fraction:.2f}% "
          f"({'met' if best_fraction >= FLOP_TARGET else 'MISSED'})")
    print(f"machine after: load average {load_average()}")

    summary = {
        "machine": machine(), "model": model, "parameters": parameters, "task": task.name,
        "rollout": [asdict(r) | {"steps_per_second": r.steps_per_second, "tokens_per_second": r.tokens_per_second}
                    for r in [baseline, *rows]],
        "update": [asdict(u) | {"samples_per_second": u.samples_per_second, "flops_per_second": u.flops_per_second,
                                "fraction_of_peak": u.fraction_of_peak} for u in updates],
        "peak_flops_per_second": peak, "speedup": speedup,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"throughput.py: error: {err}", file=sys.stderr)
        sys.exit(2)
