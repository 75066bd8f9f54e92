"""Does the tiny VLM learn to read NumberLine images, and how fast on a CPU?

Builds a tiny model (``--arch``, ``--set key=value`` overrides of ``TinySize``), fine-tunes it with
``vlmrl.sft.run_sft`` and reports, with wall times:
  - reading accuracy: both numbers exactly right in the generated answer, on held-out reset images;
  - episode success at a sampling temperature, through ``vlmrl.evaluate.evaluate``.

    python benchmarks/reading.py --preset              # `vlmrl sft NumberLine --model tiny` as the CLI runs it
    python benchmarks/reading.py --set initializer_range=0.02 --steps 400 --eval-every 50

Measured on 2 CPU cores shared with other jobs (load average 4-10), Qwen2-VL tiny, 84 px, batch 16,
lr 1e-3 unless noted; "reads" = first step at which 100 held-out images were all read right:
  init std 0.02 (HF default), 4 seeds    reads at 250-300 steps
  init std 0.08, 3 seeds                 reads at 100 steps
  init std 0.15 (the preset), 3 seeds    reads at 50-75 steps; 200 steps in ~50 s
  init 0.02 with lr 5e-4 / 2e-3 / 3e-3   40% / 24% / 46% after 250-400 steps
  init 0.02 at 56 px (4 image tokens)    3% after 250 steps
  init 0.02 at 112 px (16 image tokens)  reads at 350 steps
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import torch

import vlmrl.policy  # noqa: F401
from vlmrl.evaluate import evaluate
from vlmrl.seeds import held_out_seed
from vlmrl.policy.tiny import TINY_PRESET, build_tiny_vlm
from vlmrl.config import PolicyConfig
from vlmrl.policy.model import VLMPolicy
from vlmrl.sft import SFTConfig, run_sft
from vlmrl.tasks import get_task


def _field(text: str, name: str) -> str | None:
    m = re.search(rf'"{name}":\s*"([^"]*)"', text)
    return m.group(1) if m else None


def reading_accuracy(policy, n: int = 500, temperature: float = 0.0, batch: int = 100, seed: int = 0) -> float:
    """Fraction of ``n`` held-out NumberLine images whose answer names both numbers exactly."""
    task = get_task("NumberLine")
    env = task.make_env()
    right = 0
    for start in range(0, n, batch):
        obs, infos = zip(*(env.reset(seed=held_out_seed(seed, i)) for i in range(start, min(n, start + batch))))
        answers = policy.generate(obs, [task.prompt(i) for i in infos], temperature, max_new_tokens=32, seed=seed + start).texts
        for text, info in zip(answers, infos):
            right += _field(text, "current number") == str(info["current"]) and _field(text, "target number") == str(info["target"])
    env.close()
    return right / n


class SampledPolicy:
    """A ``TextPolicy`` for ``vlmrl.evaluate``: the model's answers sampled at ``temperature``."""

    def __init__(self, policy, task, temperature: float, seed: int = 0):
        self.policy, self.task, self.temperature = policy, task, temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.name = f"model@T={temperature}"

    def act(self, observations, infos):
        prompts = [self.task.prompt(i) for i in infos]
        return self.policy.generate(observations, prompts, self.temperature, max_new_tokens=32, seed=self.generator).texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=TINY_PRESET["arch"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TinySize override (int or float)")
    p.add_argument("--preset", action="store_true", help="model 'tiny' (built fresh by run_sft), ignores --arch/--set")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--random-action-fraction", type=float, default=0.0)
    p.add_argument("--no-cot", action="store_true")
    p.add_argument("--eval-every", type=int, default=0, help="reading accuracy (greedy, 100 images) every N steps")
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--episodes-eval", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the whole script (1: see SFTConfig.threads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="vlmrl-reading-"))
    t0 = time.perf_counter()
    if args.preset:  # built inside run_sft, into a fresh cache, so its cost is counted
        os.environ["VLMRL_CACHE"] = str(work / "cache")
        model_path = "tiny"
    else:
        overrides = {k: float(v) if "." in v else int(v) for k, v in (s.split("=", 1) for s in args.set)}
        preset = {k: v for k, v in TINY_PRESET.items() if k != "arch"}
        model_path = str(build_tiny_vlm(work / "model", arch=args.arch, seed=args.seed, **{**preset, **overrides}))
    t_build = time.perf_counter() - t0

    cfg = SFTConfig(task="NumberLine", model=model_path, out_dir=str(work / "sft"), random_action_fraction=args.random_action_fraction,
                    cot=not args.no_cot, seed=args.seed, progress=False)
    for name, value in (("steps", args.steps), ("episodes", args.episodes), ("batch_size", args.batch_size), ("lr", args.lr),
                        ("warmup_steps", args.warmup)):
        if value is not None:
            setattr(cfg, name, value)
    t1 = time.perf_counter()
    pause = [0.0]

    def on_step(step, policy):
        if args.eval_every and step % args.eval_every == 0:
            t = time.perf_counter()
            train_s = t - t1 - pause[0]
            acc = reading_accuracy(policy, n=100, seed=7)
            pause[0] += time.perf_counter() - t  # evaluation time is not training time
            print(f"  step {step:4d}  train {train_s:6.1f}s  reading {100 * acc:5.1f}%", flush=True)

    out = run_sft(cfg, callback=on_step)
    t_sft = time.perf_counter() - t1 - pause[0]
    print(f"build {t_build:.1f}s  sft {t_sft:.1f}s  total {t_build + t_sft:.1f}s  (load avg {open('/proc/loadavg').read().split()[0]})")
    print((out / "sft_summary.json").read_text())

    policy = VLMPolicy.load(out, PolicyConfig(finetune="none"))
    t2 = time.perf_counter()
    for temp in (0.0, args.temperature):
        acc = reading_accuracy(policy, n=args.eval_images, temperature=temp)
        print(f"reading accuracy T={temp}: {100 * acc:.1f}% of {args.eval_images} held-out images")
    task = get_task("NumberLine")
    result = evaluate(task, SampledPolicy(policy, task, args.temperature), args.episodes_eval, num_envs=50, progress=False)
    print(result.table())
    print(f"eval {time.perf_counter() - t2:.1f}s")


if __name__ == "__main__":
    main()
