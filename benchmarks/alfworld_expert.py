"""ALFWorld text engine: the walkthrough expert's win rate and the env's reset / step times.

    export ALFWORLD_DATA=../shared/data/alfworld
    python benchmarks/alfworld_expert.py --split valid_unseen --games 20

With ``--detour P`` the agent takes a random admissible "go to", "look" or "examine" command instead
of the expert's with probability P (while the expert has one), which checks that the expert survives
detours that only move the agent.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from vlmrl.tasks.alfworld import TASK, ALFWorldEnv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="valid_unseen")
    ap.add_argument("--games", type=int, default=20, help="games drawn without replacement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detour", type=float, default=0.0, help="probability of a harmless detour")
    args = ap.parse_args()

    env = ALFWorldEnv(split=args.split)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(env.games), size=min(args.games, len(env.games)), replace=False)
    resets, steps, wins, returns, lengths = [], [], [], [], []
    by_type: dict[str, list[bool]] = collections.defaultdict(list)
    lost_expert = 0
    for k, i in enumerate(picks):
        t = time.perf_counter()
        _, info = env.reset(seed=args.seed + k, options={"game": int(i)})
        resets.append(time.perf_counter() - t)
        total, done = 0.0, False
        while not done:
            if info["expert_action"] is None:
                lost_expert += 1
                break
            action = TASK.expert_action(info)
            detours = [
                j
                for j, c in enumerate(info["admissible_commands"])
                if c.startswith(("go to ", "examine ")) or c == "look"
            ]
            if detours and rng.random() < args.detour:
                action = int(rng.choice(detours))
            t = time.perf_counter()
            _, reward, terminated, truncated, info = env.step(action)
            steps.append(time.perf_counter() - t)
            total += reward
            done = terminated or truncated
        wins.append(info["won"])
        by_type[info["task_type"]].append(info["won"])
        returns.append(total)
        lengths.append(info["steps"])
    env.close()

    n = len(wins)
    print(f"split {args.split}, {n} games, seed {args.seed}, detour probability {args.detour}")
    print(f"expert wins {sum(wins)}/{n} ({np.mean(wins):.1%}); expert lost {lost_expert} times")
    print(f"mean return {np.mean(returns):.2f}, mean length {np.mean(lengths):.1f} steps")
    print(f"reset {np.mean(resets):.2f} s mean (max {np.max(resets):.2f}); step {np.mean(steps) * 1e3:.0f} ms mean")
    for task_type, won in sorted(by_type.items()):
        print(f"  {task_type}: {sum(won)}/{len(won)}")


if __name__ == "__main__":
    main()
