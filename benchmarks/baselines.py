"""Random and expert success on the card tasks over held-out seeded episodes (issue: the card tasks).

    python benchmarks/baselines.py --episodes 1000

Prints one markdown table; every figure comes from `vlmrl.evaluate.evaluate`, the same code path as
`vlmrl eval TASK --policy {random,expert}`.
"""

from __future__ import annotations

import argparse
import time

from vlmrl.evaluate import ExpertPolicy, RandomPolicy, evaluate
from vlmrl.tasks import CARD_TASKS, get_task


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(CARD_TASKS))
    args = parser.parse_args(argv)

    print(f"{args.episodes} held-out episodes per row, seed {args.seed}\n")
    print("| task | policy | success % (95% CI) | mean return | invalid % | mean length | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.tasks:
        task = get_task(name)
        for policy in (RandomPolicy(task, seed=args.seed), ExpertPolicy(task)):
            t0 = time.perf_counter()
            r = evaluate(task, policy, args.episodes, seed=args.seed, progress=False)
            lo, hi = r.success_ci95
            print(f"| {r.task} | {r.policy} | {100 * r.success_rate:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | "
                  f"{r.mean_return:.2f} | {100 * r.invalid_action_rate:.1f} | {r.mean_episode_length:.2f} | "
                  f"{time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
