"""Env steps per second: the envs stepped in this process vs in worker processes (``env_workers``).

    export ALFWORLD_DATA=../shared/data/alfworld OMP_NUM_THREADS=1
    python benchmarks/envs.py --task ALFWorld --num-envs 8 --workers 0 2 4 --steps 30

For each worker count (0: the serial pool, in this process) the script builds the env pool the
Collector and evaluate() use (``vlmrl.rollout.pool``), resets every env from the Collector's
training seeds, then takes ``--steps`` steps of all envs with uniformly random legal actions (from
one seeded generator), resetting an env whose episode ended, as a rollout does. Reported per
worker count: the start (pool built and every env reset once, seconds) and env steps per second over
the steps (episode-end resets included). No model runs: this is the env side of a rollout alone.
Every configuration plays the same transitions (same seed): the ``check`` column is a digest of
the rewards and episode ends, equal across the rows or the script says so.

Wall-clock figures on a shared machine: compare rows only with the load averages printed beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

# This file's folder comes first on sys.path when it runs as a script, where benchmarks/alfworld.py
# would shadow the alfworld package (in the worker processes too, which inherit sys.path).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np

from vlmrl.metrics import load_average, machine_line
from vlmrl.rollout.pool import make_env_pool
from vlmrl.tasks import get_task


def run(task, num_envs: int, workers: int, steps: int, seed: int, env_kwargs: dict) -> dict:
    # here, not at the top: each worker imports this script again (forkserver), and collect brings torch
    from vlmrl.rollout.collect import training_seed

    t0 = time.perf_counter()
    pool = make_env_pool(task, num_envs, env_kwargs, workers)
    try:
        infos = {i: info for i, (_, info) in pool.reset(
            {i: (training_seed(seed, 0, i), None) for i in range(num_envs)}).items()}
        start = time.perf_counter() - t0
        rng = np.random.default_rng(seed)
        digest = hashlib.sha256()
        episodes = 0
        t1 = time.perf_counter()
        for _ in range(steps):
            actions = {i: int(rng.integers(len(task.legal_actions(infos[i])))) for i in range(num_envs)}
            ended = {}
            for i, (_, reward, terminated, truncated, info) in sorted(pool.step(actions).items()):
                infos[i] = info
                digest.update(f"{i}:{float(reward)!r}:{bool(terminated)}:{bool(truncated)};".encode())
                if terminated or truncated:
                    ended[i] = (None, None)  # the next episode continues the env's own np_random
            episodes += len(ended)
            for i, (_, info) in pool.reset(ended).items():
                infos[i] = info
        seconds = time.perf_counter() - t1
    finally:
        pool.close()
    return {"workers": workers, "start_seconds": start, "seconds": seconds, "env_steps": steps * num_envs,
            "steps_per_second": steps * num_envs / seconds, "episodes": episodes,
            "check": digest.hexdigest()[:10], "load": load_average()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ALFWorld")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4],
                        help="worker counts to measure; 0: the envs in this process (serial)")
    parser.add_argument("--steps", type=int, default=30, help="steps of all envs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default=None, help="env_kwargs.split (ALFWorld: train, valid_seen, valid_unseen)")
    args = parser.parse_args(argv)
    if args.num_envs < 1 or args.steps < 1 or min(args.workers) < 0:
        parser.error("--num-envs and --steps must be >= 1, --workers >= 0")
    task = get_task(args.task)
    env_kwargs = {"split": args.split} if args.split else {}

    print(f"machine: {machine_line(f'Python {platform.python_version()}')}")
    print(f"task {task.name}, {args.num_envs} envs, {args.steps} steps of all envs, random legal actions, "
          f"seed {args.seed}\n")
    print("| workers | start (s) | env steps | seconds | env steps/s | episodes ended | check | load average after |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for workers in args.workers:
        r = run(task, args.num_envs, workers, args.steps, args.seed, env_kwargs)
        rows.append(r)
        print(f"| {workers or 'serial'} | {r['start_seconds']:.1f} | {r['env_steps']} | {r['seconds']:.1f} | "
              f"{r['steps_per_second']:.2f} | {r['episodes']} | {r['check']} | {r['load']} |", flush=True)
    serial = next((r for r in rows if r["workers"] == 0), None)
    if serial is not None:
        for r in rows:
            if r["workers"]:
                print(f"{r['workers']} workers: {r['steps_per_second'] / serial['steps_per_second']:.2f}x serial")
    same = len({r["check"] for r in rows}) == 1
    print("same transitions in every configuration" if same else "TRANSITIONS DIFFER between configurations")
    print(f"machine after: load average {load_average()}")
    return rows


if __name__ == "__main__":
    main()
