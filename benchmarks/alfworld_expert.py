"""ALFWorld text engine: an expert's win rate and steps per task type, and the env's reset / step times.

    export ALFWORLD_DATA=../shared/data/alfworld OMP_NUM_THREADS=1
    python benchmarks/alfworld_expert.py --split valid_unseen --games 30 --expert handcoded
    python benchmarks/alfworld_expert.py --games 17 --expert handcoded --task-type pick_two_obj_and_place

``--expert walkthrough`` follows the game's stored walkthrough; ``--expert handcoded`` alfworld's
searching expert (see ``vlmrl.tasks.alfworld``). Games are drawn without replacement with ``--seed``;
an episode ends when won, at ``--max-steps`` (50, the env's limit), or where the expert has no
admissible command ("expert lost").

With ``--detour P`` the agent takes a random admissible "go to", "look" or "examine" command instead
of the expert's with probability P (while the expert has one), which checks that the expert survives
detours that only move the agent.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

# This file's folder comes first on sys.path when it runs as a script, where the benchmark
# alfworld.py beside it would shadow the alfworld package: take it off before anything imports it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np

from vlmrl.tasks.alfworld import EXPERTS, TASK, TASK_TYPES, ALFWorldEnv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="valid_unseen")
    ap.add_argument("--games", type=int, default=20, help="games drawn without replacement")
    ap.add_argument("--expert", choices=EXPERTS, default="walkthrough")
    ap.add_argument("--task-type", choices=TASK_TYPES, action="append", help="only these types (repeatable)")
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detour", type=float, default=0.0, help="probability of a harmless detour")
    args = ap.parse_args()

    env = ALFWorldEnv(split=args.split, task_types=args.task_type, expert=args.expert, max_steps=args.max_steps)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(env.games), size=min(args.games, len(env.games)), replace=False)
    resets, steps, wins, returns, lengths = [], [], [], [], []
    by_type: dict[str, list[tuple[bool, int]]] = collections.defaultdict(list)
    lost_expert = 0
    start = time.perf_counter()
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
        by_type[info["task_type"]].append((info["won"], info["steps"]))
        returns.append(total)
        lengths.append(info["steps"])
    env.close()

    n = len(wins)
    won_lengths = [s for s, w in zip(lengths, wins) if w]
    print(f"split {args.split}, {n} games, expert {args.expert}, seed {args.seed}, step limit {args.max_steps}, "
          f"detour probability {args.detour}; {time.perf_counter() - start:.0f} s")
    print(f"expert wins {sum(wins)}/{n} ({np.mean(wins):.1%}); expert lost {lost_expert} times")
    print(f"mean return {np.mean(returns):.2f}, mean length {np.mean(lengths):.1f} steps "
          f"({np.mean(won_lengths) if won_lengths else float('nan'):.1f} in won games)")
    print(f"reset {np.mean(resets):.2f} s mean (max {np.max(resets):.2f}); step {np.mean(steps) * 1e3:.0f} ms mean")
    for task_type, games in sorted(by_type.items()):
        won = [w for w, _ in games]
        mean_won = np.mean([s for w, s in games if w]) if any(won) else float("nan")
        print(f"  {task_type:<32} {sum(won)}/{len(won)} won ({np.mean(won):.0%}), "
              f"{np.mean([s for _, s in games]):.1f} steps mean ({mean_won:.1f} in won games)")


if __name__ == "__main__":
    main()
