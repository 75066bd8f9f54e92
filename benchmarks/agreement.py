"""Where a policy's choices part from the expert's: misread states or wrong decisions?

For a task with an expert and CoT state fields (the card tasks), plays held-out episodes with a
policy folder and, at every step, compares the reply with the truth:
  - read: every state field of the reply (``task.state_fields``) equals ``task.read_state(info)``;
  - agree: the parsed action is the expert's (``task.expert_action(info)``).
A step where the policy read the state right but chose otherwise is a decision error, which more
RL (or a KL to the expert-trained start) can fix; a misread one needs better reading (longer SFT,
the vision tower). The most frequent disagreeing states (``task.state_key``) are listed.

    python benchmarks/agreement.py Blackjack runs/bj/ppo/final --episodes 2000 --seed 7

Episode i resets with ``held_out_seed(seed, i)`` (the same deals as ``vlmrl eval --seed``), and the
replies are sampled at ``--temperature`` from a generator seeded with ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def field_value(text: str, name: str) -> str | None:
    """The string value of JSON key ``name`` in a (possibly malformed) reply, or None."""
    m = re.search(r'"' + re.escape(name) + r'"\s*:\s*"([^"]*)"', text)
    return m.group(1) if m else None


def tally(task: Any, infos: list[dict], replies: list[str], rng: np.random.Generator, counts: Counter,
          wrong: Counter, counted: list[bool]) -> list[int]:
    """Count one batch of steps into ``counts`` (and disagreeing state keys into ``wrong``), those
    marked in ``counted``; the actions of all."""
    from vlmrl.tasks.parsing import parse_action

    actions = []
    names = [name for name, _ in task.state_fields]
    for info, text, count in zip(infos, replies, counted):
        words = task.legal_actions(info)
        parsed = parse_action(text, words, rng)
        actions.append(parsed.action)
        if not count:
            continue
        right = [" ".join((field_value(text, n) or "").split()) == " ".join(t.split())
                 for n, t in zip(names, task.read_state(info))]
        read = all(right)
        for n, ok in zip(names, right):
            counts[f"read {n}"] += ok
        agree = parsed.action == task.expert_action(info)
        counts["steps"] += 1
        counts["invalid"] += not parsed.valid
        counts["read"] += read
        counts["agree"] += agree
        counts["read, disagree"] += read and not agree
        counts["misread, disagree"] += (not read) and not agree
        if not agree:
            wrong[(task.state_key(info), words[parsed.action], read)] += 1
    return actions


def run(task_name: str, policy_dir: str, episodes: int, seed: int, num_envs: int, temperature: float,
        top: int, first_steps: int | None = None, max_new_tokens: int = 64) -> dict[str, Any]:
    """The counts over ``episodes`` held-out episodes (only each one's first ``first_steps`` steps
    where given: Blackjack's first step is always a two-card hand)."""
    import torch

    from vlmrl.evaluate import ModelPolicy
    from vlmrl.errors import UserError
    from vlmrl.seeds import held_out_seed
    from vlmrl.tasks import get_task
    from vlmrl.tasks.base import episode_success

    task = get_task(task_name)
    if not task.has_expert or not task.state_fields:
        raise UserError(f"agreement: task {task.name!r} needs an expert and CoT state fields")
    torch.set_num_threads(1)
    policy = ModelPolicy.load(policy_dir, task, cot=True, temperature=temperature, seed=seed,
                              max_new_tokens=max_new_tokens)
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    wrong: Counter = Counter()
    won = 0
    for start in range(0, episodes, num_envs):
        envs = [task.make_env() for _ in range(min(num_envs, episodes - start))]
        state = [list(e.reset(seed=held_out_seed(seed, start + k))) + [0.0] for k, e in enumerate(envs)]
        live = list(range(len(envs)))
        step = 0
        while live:
            replies = policy.act([state[k][0] for k in live], [state[k][1] for k in live])
            counted = [first_steps is None or step < first_steps] * len(live)
            actions = tally(task, [state[k][1] for k in live], replies, rng, counts, wrong, counted)
            step += 1
            still = []
            for k, a in zip(live, actions):
                obs, reward, terminated, truncated, info = envs[k].step(a)
                state[k] = [obs, info, state[k][2] + float(reward)]
                if terminated or truncated:
                    won += episode_success(info, state[k][2])
                else:
                    still.append(k)
            live = still
        for e in envs:
            e.close()
    n = counts["steps"]
    result = {
        "task": task.name, "policy": policy_dir, "episodes": episodes, "seed": seed, "temperature": temperature,
        "first_steps": first_steps, "success_rate": won / episodes, "steps": n,
        "rates": {k: counts[k] / n for k in ("read", *(f"read {f}" for f, _ in task.state_fields), "agree",
                                             "invalid", "read, disagree", "misread, disagree")},
        "disagreements": [{"state": str(s), "chose": w, "read right": r, "steps": c}
                          for (s, w, r), c in wrong.most_common(top)],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task")
    p.add_argument("policy", help="a policy folder written by vlmrl sft / train")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--num-envs", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--first-steps", type=int, default=None,
                   help="count only each episode's first N steps (Blackjack 1: the two-card hands)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=12, help="disagreeing states listed")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.num_envs < 1 or (args.first_steps is not None and args.first_steps < 1):
        p.error("--episodes, --num-envs and --first-steps must be >= 1")
    r = run(args.task, args.policy, args.episodes, args.seed, args.num_envs, args.temperature, args.top,
            args.first_steps, args.max_new_tokens)
    which = f"the first {args.first_steps} of each episode's steps" if args.first_steps else "every step"
    print(f"{r['task']} {r['policy']}: {r['episodes']} episodes, {r['steps']} steps counted ({which}), "
          f"success {100 * r['success_rate']:.1f}%")
    for k, v in r["rates"].items():
        print(f"  {k:<18} {100 * v:5.1f}% of steps")
    print("  most frequent disagreements (state key, chosen word, read right): steps")
    for d in r["disagreements"]:
        print(f"    {d['state']:<22} {d['chose']:<8} {str(d['read right']):<5} {d['steps']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vlmrl.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:
        print(f"agreement.py: error: {err}", file=sys.stderr)
        sys.exit(2)
