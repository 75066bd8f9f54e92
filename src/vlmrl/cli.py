"""The `vlmrl` command: eval | render (and the training commands as they land).

Bad input ends with one line on stderr and exit code 2, never a traceback (`vlmrl.errors.UserError`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vlmrl.errors import UserError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _make_policy(name: str, task, seed: int, cot: bool, args: argparse.Namespace):
    from vlmrl.evaluate import ExpertPolicy, RandomPolicy

    if name == "random":
        return RandomPolicy(task, seed=seed)
    if name == "expert":
        return ExpertPolicy(task, cot=cot)
    from vlmrl.evaluate import ModelPolicy  # noqa: PLC0415  (imports torch and transformers)

    return ModelPolicy.load(name, task, cot=cot, temperature=args.temperature, seed=seed)


def cmd_eval(args: argparse.Namespace) -> int:
    from vlmrl.evaluate import evaluate, write_json
    from vlmrl.tasks import get_task

    task = get_task(args.task)
    env_kwargs = {"split": args.split} if args.split else {}
    policy = _make_policy(args.policy, task, args.seed, not args.no_cot, args)
    result = evaluate(
        task, policy, args.episodes, seed=args.seed, num_envs=args.num_envs, env_kwargs=env_kwargs,
        progress=not args.quiet,
    )
    print(result.table())
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from vlmrl.render import render_episode
    from vlmrl.tasks import get_task

    paths = render_episode(get_task(args.task), args.seed, args.out, steps=args.steps, cot=not args.no_cot)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="play held-out seeded episodes and report success with a 95% CI")
    p.add_argument("task", help="NumberLine, EZPoints, Points24, Blackjack or ALFWorld")
    p.add_argument("--policy", default="expert", help="random, expert, or a policy folder (from sft/train)")
    p.add_argument("--episodes", type=_positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-envs", type=_positive_int, default=16, help="episodes played at once (one batch)")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature of model policies")
    p.add_argument("--no-cot", action="store_true", help="action-only prompt (the paper's ablation)")
    p.add_argument("--split", default=None, help="ALFWorld split, e.g. valid_unseen")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("render", help="write observation PNGs with the prompt beside them")
    p.add_argument("task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=_positive_int, default=4)
    p.add_argument("--no-cot", action="store_true")
    p.set_defaults(func=cmd_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"vlmrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
