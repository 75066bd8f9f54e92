"""The `vlmrl` command: demo | sft | train | eval | render.

Bad input ends with one line on stderr and exit code 2, never a traceback (`vlmrl.errors.UserError`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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

    return ModelPolicy.load(name, task, cot=cot, temperature=args.temperature, seed=seed,
                            max_new_tokens=args.max_new_tokens)


def cmd_eval(args: argparse.Namespace) -> int:
    from vlmrl.evaluate import evaluate, write_json
    from vlmrl.tasks import get_task

    task = get_task(args.task)
    env_kwargs = {"split": args.split} if args.split else {}
    # ALFWorld's splits are fixed sets of games: play each once (the first --episodes of them)
    once = task.name.startswith("ALFWorld")
    episodes = args.episodes if args.episodes or once else 100
    policy = _make_policy(args.policy, task, args.seed, not args.no_cot, args)
    result = evaluate(
        task, policy, episodes, seed=args.seed, num_envs=args.num_envs, env_kwargs=env_kwargs,
        progress=not args.quiet, each_game_once=once,
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


def cmd_sft(args: argparse.Namespace) -> int:
    from vlmrl.checkpoint import latest_checkpoint
    from vlmrl.sft import SFTConfig, check_resume_settings, finished, run_sft, saved_config
    from vlmrl.tasks import get_task

    # SFTConfig field -> (option dest, default of a new run). The options default to None so that
    # --resume can tell a setting given on the command line from one left out.
    options = {
        "model": ("model", "tiny"), "episodes": ("episodes", 400), "random_action_fraction": ("random_fraction", 0.0),
        "expert_only": ("expert_only", False), "lr": ("lr", 1e-3), "batch_size": ("batch_size", 16),
        "steps": ("steps", 0), "seed": ("seed", 0), "finetune": ("finetune", "full"),
        "checkpoint_every": ("checkpoint_every", 0), "image_size": ("image_size", None),
    }
    given = {field: getattr(args, dest) for field, (dest, _) in options.items() if getattr(args, dest) is not None}
    if args.task is not None:
        given["task"] = get_task(args.task).name
    if args.split is not None:
        given["env_kwargs"] = {"split": args.split}
    if args.no_cot:
        given["cot"] = False
    if args.resume:  # the run's own settings; any given here must agree with them
        cfg = saved_config(args.out)
        check_resume_settings(cfg, given)
        ckpt = latest_checkpoint(Path(args.out) / "checkpoints", clean=False)
        where = "(it had finished: nothing to do)" if finished(args.out) else f"from {ckpt.name}" if ckpt else "from step 0 (no checkpoint yet)"
        print(f"vlmrl sft: resuming {args.out} {where}", flush=True)
    else:
        if args.task is None:
            raise UserError("sft needs a TASK, e.g. `vlmrl sft NumberLine --out runs/sft` (or --resume to continue a run)")
        cfg = SFTConfig(**{field: default for field, (_, default) in options.items()} | given, out_dir=args.out)
    out = run_sft(cfg, resume=args.resume)
    print(f"saved the SFT policy to {out}; evaluate it with: vlmrl eval {cfg.task} --policy {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vlmrl.config import TrainConfig, load_config, parse_overrides
    from vlmrl.tasks import get_task
    from vlmrl.trainer import TrainingDiverged, train

    overrides = parse_overrides(args.set or [])
    for key, value in (("task", args.task), ("model", args.model), ("out_dir", args.out),
                       ("total_updates", args.updates), ("num_envs", args.num_envs),
                       ("num_steps", args.num_steps), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    if args.no_cot:
        overrides["cot"] = False
    if args.split:
        overrides["env_kwargs.split"] = args.split
    source = args.config
    if args.resume and source is None and args.out and (Path(args.out) / "config.json").is_file():
        source = str(Path(args.out) / "config.json")  # continue with the run's own settings
    cfg = load_config(TrainConfig, source, overrides)
    cfg.task = get_task(cfg.task).ref  # a user's task keeps its import path, so --resume finds it
    if not cfg.model and not args.resume:
        raise UserError("train needs --model: a folder from `vlmrl sft` (or any HF VLM folder, or 'tiny')")
    try:
        final = train(cfg, resume=args.resume, progress=not args.quiet)
    except TrainingDiverged as e:  # not bad input (exit 2), but still one line and no traceback
        print(f"vlmrl: training diverged: {e}", file=sys.stderr)
        return 1
    print(f"saved the trained policy to {final}; metrics in {cfg.out_dir}/metrics.jsonl, "
          f"learning curve {cfg.out_dir}/learning_curve.png")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlmrl.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, episodes=args.episodes, cot=not args.no_cot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="tiny VLM: SFT on an imperfect expert, PPO, before/after table (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=_positive_int, default=500, help="held-out episodes per evaluation")
    p.add_argument("--no-cot", action="store_true", help="the action-only ablation")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sft", help="supervised fine-tuning on the task expert's demonstrations")
    p.add_argument("task", nargs="?", default=None, help="the task (optional with --resume: the run's own)")
    p.add_argument("--model", default=None, help="a Hugging Face VLM folder, or 'tiny' (built offline; the default)")
    p.add_argument("--episodes", type=_positive_int, default=None,
                   help="demonstration episodes, default 400 (ALFWorld: distinct games of the split)")
    p.add_argument("--out", required=True, help="run folder (a new one, unless --resume): sft_config.json, checkpoints/, the final model")
    p.add_argument("--random-fraction", type=float, default=None,
                   help="probability of a random action per demonstration step (an imperfect start; default 0)")
    p.add_argument("--expert-only", action="store_true", default=None,
                   help="learn only the expert's answers (random actions just take detours)")
    p.add_argument("--split", default=None, help="ALFWorld split of the demonstration games, e.g. train")
    p.add_argument("--no-cot", action="store_true")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default 16")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 0: 3 epochs)")
    p.add_argument("--finetune", default=None, choices=("full", "lora"), help="default full")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a resumable checkpoint every this many steps (default 0: none)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize observations to this many pixels square (Qwen processors; a multiple of patch x merge)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--resume", action="store_true",
                   help="continue the killed run in --out from its newest checkpoint (from the start if it has "
                        "none) with its saved settings, to the same weights as an uninterrupted run; settings "
                        "given as well must equal the saved ones")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="PPO fine-tuning from a policy folder (usually an SFT result)")
    p.add_argument("task", nargs="?", default=None)
    p.add_argument("--model", default=None, help="policy folder to start from (e.g. from vlmrl sft)")
    p.add_argument("--out", default=None, help="run folder: config, metrics, checkpoints, final policy")
    p.add_argument("--config", default=None, help="a .json/.toml/.yaml file of TrainConfig fields")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. ppo.lr=1e-4 num_envs=8")
    p.add_argument("--updates", type=_positive_int, default=None, help="total PPO updates")
    p.add_argument("--num-envs", type=_positive_int, default=None)
    p.add_argument("--num-steps", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cot", action="store_true", help="action-only prompt (the paper's ablation)")
    p.add_argument("--split", default=None, help="ALFWorld split of the training games (env_kwargs.split)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="play held-out seeded episodes and report success with a 95%% CI")
    p.add_argument("task", help="NumberLine, EZPoints, Points24, Blackjack, ALFWorld, a registered name, "
                                "or your own Task as module:attr (e.g. my_tasks:TASK)")
    p.add_argument("--policy", default="expert", help="random, expert, or a policy folder (from sft/train)")
    p.add_argument("--episodes", type=_positive_int, default=None,
                   help="held-out episodes (default 100; ALFWorld: each game of the split once, or the first N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-envs", type=_positive_int, default=16, help="episodes played at once (one batch)")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature of model policies")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="longest response sampled from a model policy (default: the policy's own, 256)")
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
