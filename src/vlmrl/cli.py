"""The `vlmrl` command: demo | sft | train | eval | render.

The options of sft, train and eval are generated from their config dataclasses (``SFTConfig``,
``TrainConfig``, ``EvalConfig`` in ``vlmrl.config``): every field is an option with the dataclass's
own default (``--num-envs``, ``--ppo.lr``, ``--policy.finetune``; ``--no-cot`` for a bool), and
``--config FILE`` (a config or a recipe under configs/recipes) and ``--set key=value`` work the same
way for all three. Bad input ends with one line on stderr and exit code 2, never a traceback
(``vlmrl.errors.UserError``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from vlmrl.config import (
    RUN_OWNED_POLICY_FIELDS,
    EvalConfig,
    SFTConfig,
    TrainConfig,
    add_config_arguments,
    check_unchanged,
    given_overrides,
    load_config,
    parse_overrides,
)
from vlmrl.errors import UserError

# short names kept from before the options were generated (README commands use them)
ALIASES = {
    "sft": {"out_dir": ["--out"], "random_action_fraction": ["--random-fraction"]},
    "train": {"out_dir": ["--out"], "total_updates": ["--updates"]},
    "eval": {},
}
# what a resumed training run may change: where it writes, how far it goes, and how many processes
# step its envs (the transitions are the same either way)
RESUMABLE = ("out_dir", "total_updates", "env_workers", "env_timeout_s")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line sets: ``--set`` pairs, the generated options, the task and ``--split``."""
    out = parse_overrides(args.set or [])
    out.update(given_overrides(args))
    if getattr(args, "task", None) is not None:
        from vlmrl.tasks import get_task

        out["task"] = get_task(args.task).ref  # a user's own task keeps its import path
    if getattr(args, "split", None):
        out["env_kwargs.split"] = args.split
    return out


# --- commands ----------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from vlmrl.evaluate import evaluate, make_policy, write_json
    from vlmrl.tasks import get_task

    if args.task is None and args.config is None:
        raise UserError("eval needs a TASK, e.g. `vlmrl eval NumberLine --policy expert`")
    cfg = load_config(EvalConfig, args.config, _overrides(args), section="eval")
    task = get_task(cfg.task)
    # ALFWorld's splits are fixed sets of games: play each once (the first --episodes of them)
    once = task.name.startswith("ALFWorld")
    episodes = cfg.episodes if cfg.episodes or once else 100
    policy = make_policy(cfg.policy, task, cfg)
    result = evaluate(task, policy, episodes, seed=cfg.seed, num_envs=cfg.num_envs, env_workers=cfg.env_workers,
                      env_timeout_s=cfg.env_timeout_s,
                      env_kwargs=cfg.env_kwargs, progress=not args.quiet, each_game_once=once,
                      history_length=cfg.history_length)
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
    from vlmrl.sft import check_resume_settings, finished, run_sft, saved_config

    given = _overrides(args)
    out = given.get("out_dir")
    if out is None:
        raise UserError("sft needs --out: the run folder (a new one, or the run to continue with --resume)")
    if args.resume:  # the run's own settings; any given here must agree with them
        cfg = saved_config(out)
        check_resume_settings(cfg, given)
        ckpt = latest_checkpoint(Path(out) / "checkpoints", clean=False)
        where = ("(it had finished: nothing to do)" if finished(out) else
                 f"from {ckpt.name}" if ckpt else "from step 0 (no checkpoint yet)")
        print(f"vlmrl sft: resuming {out} {where}", flush=True)
    else:
        if "task" not in given and args.config is None:
            raise UserError("sft needs a TASK, e.g. `vlmrl sft NumberLine --out runs/sft` (or --resume to continue a run)")
        cfg = load_config(SFTConfig, args.config, given, section="sft")
    result = run_sft(cfg, resume=args.resume)
    print(f"saved the SFT policy to {result}; evaluate it with: vlmrl eval {cfg.task} --policy {result}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vlmrl.trainer import TrainingDiverged, train

    given = _overrides(args)
    out = given.get("out_dir")
    if args.resume:
        saved = Path(out or "") / "config.json"
        if out is None or not saved.is_file():
            raise UserError(f"train --resume: {out or '(no --out)'} holds no run (no config.json): start it without --resume, or pass the run's own --out")
        cfg = load_config(TrainConfig, saved)  # continue with the run's own settings
        check_unchanged("train", cfg, given, free=RESUMABLE)
        cfg = load_config(TrainConfig, saved, {k: v for k, v in given.items() if k in RESUMABLE})
    else:
        cfg = load_config(TrainConfig, args.config, given, section="train")
        if not cfg.model:
            raise UserError("train needs --model: a folder from `vlmrl sft`, a Hugging Face VLM folder or Hub id, or 'tiny'")
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

    run_demo(out_dir=args.out, seed=args.seed, episodes=args.episodes, cot=not args.no_cot, recipe=args.recipe)
    return 0


# --- the parser --------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"a .toml/.json/.yaml file of these settings, or a recipe (configs/recipes/*.toml: its [{stage}] table)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides in config-key form, e.g. ppo.lr=1e-4 num_envs=8")
    p.add_argument("--split", default=None, help="shortcut for env_kwargs.split (ALFWorld: train, valid_seen, valid_unseen)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    task_help = "a task name (NumberLine, EZPoints, Points24, Blackjack, ALFWorld, FrozenLake) or your own Task as module:attr"

    p = sub.add_parser("demo", help="tiny VLM: SFT on an imperfect expert, PPO, before/after table (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=_positive_int, default=None,
                   help="held-out episodes per evaluation (default: the recipe's, 500)")
    p.add_argument("--no-cot", action="store_true", help="the action-only ablation")
    p.add_argument("--recipe", default=None, metavar="FILE", help="default: configs/recipes/numberline.toml")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sft", help="supervised fine-tuning on the task expert's demonstrations")
    p.add_argument("task", nargs="?", default=None, help=task_help + " (optional with --resume: the run's own)")
    _common(p, "sft")
    p.add_argument("--resume", action="store_true",
                   help="continue the killed run in --out from its newest checkpoint, exactly (settings from its sft_config.json)")
    add_config_arguments(p, SFTConfig, ALIASES["sft"], skip=("task",))
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="PPO fine-tuning from a policy folder (usually an SFT result)")
    p.add_argument("task", nargs="?", default=None, help=task_help)
    _common(p, "train")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (settings from its config.json; --updates may grow)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, TrainConfig, ALIASES["train"],
                         skip=("task", *(f"policy.{name}" for name in RUN_OWNED_POLICY_FIELDS)))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="play held-out seeded episodes and report success with a 95%% CI")
    p.add_argument("task", nargs="?", default=None, help=task_help)
    _common(p, "eval")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, EvalConfig, ALIASES["eval"], skip=("task",))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("render", help="write observation PNGs with the prompt beside them")
    p.add_argument("task", help=task_help)
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
