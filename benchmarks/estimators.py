"""PPO vs GRPO vs GiGPO on the card tasks, each with and without memory, at equal env-step budgets.

    python benchmarks/estimators.py --out runs/estimators                  # the full table (hours)
    python benchmarks/estimators.py --tasks EZPoints --memory 0 --seeds 0 --budget 0.2 --out runs/quick
    python benchmarks/estimators.py --merge runs/est-ez runs/est-bj         # folders of either kind

For each task, memory length K (``history_length``: the prompt carries the episode's last K steps) and
seed, one SFT run from the task's recipe (configs/recipes/<task>.toml, [sft] table, with K) is evaluated
once on held-out episodes; then every estimator trains from that same SFT folder (SFT does not depend on
the estimator) with the recipe's [train] settings and K, and is evaluated on the same held-out episodes
(the recipe's [eval]: 500 at temperature 0.2). Estimators (``ppo.advantage``):

- ``ppo``: GAE with the recipe's value head (its value_lr and warm-up);
- ``grpo``, ``rloo``, ``gigpo``: no value head (value_lr null), ``--group-size`` G episodes a group from
  one start, num_envs rounded down to a multiple of G. GiGPO needs the task's state key.

Equal budgets: for an env-step budget N (default: the recipe's num_envs * num_steps * total_updates,
rounded down to whole PPO updates) the PPO arm gets ``N // (num_envs * num_steps)`` updates, each of
exactly num_envs * num_steps env steps. A group update plays one episode per env cut at num_steps, so it
takes at most that (Blackjack's 1-2 step hands: far fewer). With ``--group-updates matched`` (the
default) a group arm gets ``N // (num_envs * min(num_steps, L))`` updates, L the SFT start's mean
held-out episode length, so that its env steps come out near N; ``recipe`` gives it PPO's number of
updates (at most PPO's env steps: on Blackjack about a third). The table reports the env steps each arm
really took (the last ``charts/env_steps`` of its metrics.jsonl) beside the budget.

``--budget`` F multiplies the SFT steps, demonstration episodes and the env-step budget (1 = the recipe);
``--set section.key=value`` overrides any recipe entry for every task (sections: sft, train, ppo, eval).
Every seed runs as its own process of this script (``--seed S --out <out>/seed-S``, one torch thread,
at most ``--jobs`` at a time); rows print as the mean with the min-max over the seeds, then every seed
with 95% Wilson intervals. Everything is written to ``<out>/estimators.json``. ALFWorld is not run
here: see benchmarks/alfworld.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmrl import demo, metrics
from vlmrl.config import read_recipe
from vlmrl.errors import UserError
from vlmrl.tasks import CARD_TASKS, get_task

# --estimators name -> (ppo.advantage, column title)
ESTIMATORS = {"ppo": ("gae", "PPO (GAE)"), "grpo": ("grpo", "GRPO"), "rloo": ("rloo", "RLOO"),
              "gigpo": ("gigpo", "GiGPO")}
SCRIPT = "benchmarks/estimators.py"
# SFTConfig / TrainConfig fields each run sets itself, not the recipe
RUN_SET = ("task", "model", "out_dir", "seed", "cot", "history_length", "progress")


# --- settings ------------------------------------------------------------------------------------------


def recipe(task: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The task's shipped recipe (``vlmrl.demo.load_recipe``), for a card task only, with ``--set``
    entries ``section.key=value`` (sections sft, train, ppo, eval; value read as JSON, else as text)."""
    if task.casefold().removeprefix("vlmrl/").removesuffix("-v0") == "alfworld":
        raise UserError("ALFWorld is not part of this benchmark: use benchmarks/alfworld.py")
    name = get_task(task).name
    if name not in CARD_TASKS:
        raise UserError(f"no estimator benchmark for {task!r}: choose card tasks from {', '.join(CARD_TASKS)}")
    tables = read_recipe(demo.recipe_file(name))
    for item in overrides:
        key, eq, text = item.partition("=")
        section, _, field = key.partition(".")
        if not eq or not field or section not in ("sft", "train", "ppo", "eval"):
            raise UserError(f"--set {item!r}: write section.key=value with section sft, train, ppo or eval "
                            "(e.g. train.num_envs=8)")
        if key in ("ppo.advantage", "ppo.group_size") or (section in ("sft", "train") and field in RUN_SET):
            raise UserError(f"--set {key}: this script sets it for each run (--estimators, --group-size, "
                            "--memory, --seeds, --model, --out)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        where = tables.setdefault("train", {}).setdefault("ppo", {}) if section == "ppo" else \
            tables.setdefault(section, {})
        where[field] = value
    return demo.load_recipe(tables)  # checks every key, type and range, the overrides' too


def scale_sft(sft: dict[str, Any], budget: float) -> dict[str, Any]:
    """The [sft] table with steps and demonstration episodes times ``budget`` (each >= 1)."""
    return {**sft, **{key: max(1, math.ceil(sft[key] * budget)) for key in ("episodes", "steps")}}


def env_budget(train: dict[str, Any], env_steps: int | None, budget: float) -> int:
    """The env-step budget: ``env_steps`` (None: the recipe's) times ``budget``, rounded down to whole
    PPO updates (at least one), so that the PPO arm uses exactly the budget."""
    per_update = train["num_envs"] * train["num_steps"]
    wanted = env_steps if env_steps is not None else per_update * train["total_updates"]
    return per_update * max(1, int(wanted * budget) // per_update)


def arm(rec: dict[str, Any], estimator: str, steps: int, group_size: int,
        episode_length: float | None = None) -> tuple[dict[str, Any], Any]:
    """(``[train]`` settings, PPOConfig) of one estimator under an env-step budget of ``steps``.

    A group update plays one episode per env, cut at num_steps: it takes num_envs x num_steps env
    steps at most, and num_envs x min(num_steps, L) for episodes of mean length L. With
    ``episode_length`` L (the SFT start's, ``--group-updates matched``) a group arm gets as many
    updates as that expected size allows; without it, as many as the PPO arm (at most its env steps).
    """
    train, ppo = dict(rec["train"]), rec["ppo"]
    advantage = ESTIMATORS[estimator][0]
    if advantage != "gae":
        # groups of G envs share a start; the recipe's value head has nothing to learn without GAE
        train["num_envs"] = max(group_size, train["num_envs"] // group_size * group_size)
        ppo = dataclasses.replace(ppo, advantage=advantage, group_size=group_size, value_lr=None)
    per_update = train["num_envs"] * train["num_steps"]
    if per_update > steps:
        raise UserError(f"--group-size {group_size}: one {estimator} update of {train['num_envs']} envs x "
                        f"{train['num_steps']} steps exceeds the budget of {steps} env steps: raise --env-steps")
    train["total_updates"] = steps // per_update
    if advantage != "gae" and episode_length is not None:
        expected = train["num_envs"] * min(train["num_steps"], max(1.0, episode_length))
        train["total_updates"] = max(1, int(steps // expected))
    return train, ppo


def check(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every input checked before anything runs; the recipes by task name."""
    for flag, values in (("--tasks", args.tasks), ("--memory", args.memory), ("--estimators", args.estimators),
                         ("--seeds", args.seeds or [])):
        if len(set(values)) != len(values):
            raise UserError(f"{flag}: give each value once")
    unknown = [e for e in args.estimators if e not in ESTIMATORS]
    if unknown:
        raise UserError(f"unknown estimator(s) {', '.join(unknown)}: choose from {', '.join(ESTIMATORS)}")
    if min(args.memory) < 0:
        raise UserError("--memory: history lengths are >= 0 (0: no memory)")
    for flag, value, least in (("--group-size", args.group_size, 2), ("--episodes", args.episodes, 1),
                               ("--env-steps", args.env_steps, 1), ("--jobs", args.jobs, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if args.budget <= 0:
        raise UserError(f"--budget must be > 0, got {args.budget}")
    recipes = {}
    for task in args.tasks:
        rec = recipe(task, args.set)
        name = get_task(task).name
        if name in recipes:
            raise UserError(f"--tasks: {name} is given twice")
        if "gigpo" in args.estimators and not get_task(name).has_state_key:
            raise UserError(f"gigpo needs a state key and {name} has none: leave gigpo out for it")
        steps = env_budget(rec["train"], args.env_steps, args.budget)
        for estimator in args.estimators:
            arm(rec, estimator, steps, args.group_size)  # a budget too small for one update fails here
        recipes[name] = rec
    return recipes


# --- one seed --------------------------------------------------------------------------------------


def held_out(path: Path, name: str, task: Any, memory: int, ev: Any, seed: int, episodes: int,
             max_new_tokens: int, progress: bool) -> dict[str, Any]:
    """The policy in ``path`` on the held-out episodes of ``seed``, with the memory it trained with."""
    from vlmrl.evaluate import ModelPolicy, evaluate

    policy = ModelPolicy.load(str(path), task, cot=True, temperature=ev.temperature, seed=seed,
                              max_new_tokens=max_new_tokens, name=name)
    return evaluate(task, policy, episodes, seed=seed, num_envs=ev.num_envs, progress=progress,
                    history_length=memory).to_json()


def run_cell(task_name: str, memory: int, rec: dict[str, Any], args: argparse.Namespace, out: Path,
             model: str, cells: list[dict[str, Any]], save: Any) -> None:
    """One SFT with memory ``memory``, evaluated, then every estimator from it, each evaluated; the
    cell joins ``cells`` at once and ``save()`` runs after every stage, so a crash keeps what was done."""
    from vlmrl.config import TrainConfig
    from vlmrl.sft import SFTConfig, run_sft
    from vlmrl.trainer import train

    task, seed, progress = get_task(task_name), args.seed, not args.quiet
    episodes = args.episodes or rec["eval"].episodes or 500
    steps = env_budget(rec["train"], args.env_steps, args.budget)
    tokens = rec["train"]["max_new_tokens"]
    sft = scale_sft(rec["sft"], args.budget)
    cell: dict[str, Any] = {"task": task.name, "memory": memory, "seed": seed, "budget_env_steps": steps,
                            "episodes": episodes, "arms": {}}
    cells.append(cell)
    t0 = time.perf_counter()
    cfg = SFTConfig(task=task.name, model=model, out_dir=str(out / "sft"), cot=True, seed=seed,
                    history_length=memory, progress=progress, **sft)
    sft_dir = run_sft(cfg)
    cell["before"] = held_out(sft_dir, "SFT", task, memory, rec["eval"], seed, episodes, tokens, progress)
    cell["sft"] = {"dir": str(sft_dir), "steps": cfg.steps, "episodes": cfg.episodes,
                   "seconds": round(time.perf_counter() - t0, 1)}
    save()
    for estimator in args.estimators:
        t0 = time.perf_counter()
        length = cell["before"]["mean_episode_length"] if args.group_updates == "matched" else None
        train_kw, ppo = arm(rec, estimator, steps, args.group_size, length)
        cfg = TrainConfig(task=task.name, model=str(sft_dir), out_dir=str(out / estimator), seed=seed, cot=True,
                          history_length=memory, ppo=ppo, policy=rec["policy"], **train_kw)
        final = train(cfg, progress=progress)
        used = metrics.read_metrics(out / estimator / metrics.METRICS_FILE)[-1][metrics.ENV_STEPS]
        after = held_out(final, estimator, task, memory, rec["eval"], seed, episodes, tokens, progress)
        cell["arms"][estimator] = {"advantage": ppo.advantage, "group_size": ppo.group_size,
                                   "num_envs": cfg.num_envs, "num_steps": cfg.num_steps,
                                   "total_updates": cfg.total_updates, "env_steps": used, "after": after,
                                   "dir": str(final), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[estimators] {task.name} K={memory} seed {seed} {estimator}: {100 * after['success_rate']:.1f}% "
              f"(SFT {100 * cell['before']['success_rate']:.1f}%), {used}/{steps} env steps", flush=True)
        save()


def run_seed(args: argparse.Namespace, recipes: dict[str, dict[str, Any]], out: Path, header: dict[str, Any]
             ) -> dict[str, Any]:
    """Every (task, K) cell of one seed, in this process; ``<out>/estimators.json`` after every stage."""
    from vlmrl.policy.presets import resolve_model

    cells: list[dict[str, Any]] = []
    part = {**header, "seed": args.seed, "cells": cells}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "estimators.json").write_text(json.dumps(part, indent=2) + "\n")

    for task, rec in recipes.items():
        model = str(resolve_model(args.model, task))
        for memory in args.memory:
            print(f"[estimators] {task} K={memory} seed {args.seed} ...", flush=True)
            run_cell(task, memory, rec, args, out / f"{task}-K{memory}", model, cells, save)
    part["table"] = tables([part])["table"]
    save()
    return part


# --- the tables --------------------------------------------------------------------------------------


def _mean_range(values: list[float], digits: int = 1) -> str:
    """``mean (min-max)``."""
    return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _steps(values: list[int]) -> str:
    """Env steps over seeds: the number when they agree, else mean (min-max)."""
    return str(values[0]) if len(set(values)) == 1 else _mean_range(values, 0)


def _ci(result: dict[str, Any]) -> str:
    """Success % with its 95% Wilson interval."""
    n = result["episodes"]
    lo, hi = metrics.wilson_interval(round(result["success_rate"] * n), n)
    return f"{100 * result['success_rate']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"


def tables(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary table (one row per task and K: mean (min-max) over seeds) and the per-seed table,
    from single-seed summaries; a (task, K, seed) given twice is refused."""
    cells = [c for p in parts for c in p["cells"] if c.get("arms") is not None and "before" in c]
    keys = [(c["task"], c["memory"], c["seed"]) for c in cells]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UserError("the same run appears twice: " + ", ".join(f"{t} K={k} seed {s}" for t, k, s in twice))
    order = {t: i for i, t in enumerate(CARD_TASKS)}
    cells.sort(key=lambda c: (order.get(c["task"], len(order)), c["memory"], c["seed"]))
    names = [e for e in ESTIMATORS if any(e in c["arms"] for c in cells)]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["task"], c["memory"]), []).append(c)

    titles = [ESTIMATORS[e][1] for e in names]
    rows = ["| task | K | seeds | env-step budget | SFT start | " + " | ".join(titles) + " | " +
            " | ".join(f"env steps, {t}" for t in titles) + " |",
            "|---" * (5 + 2 * len(names)) + "|"]
    for (task, memory), group in groups.items():
        def success(e: str, group=group) -> str:
            values = [100 * c["arms"][e]["after"]["success_rate"] for c in group if e in c["arms"]]
            return _mean_range(values) if values else "-"

        def used(e: str, group=group) -> str:
            values = [c["arms"][e]["env_steps"] for c in group if e in c["arms"]]
            return _steps(values) if values else "-"

        rows.append(f"| {task} | {memory} | {' '.join(str(c['seed']) for c in group)} | "
                    f"{_steps([c['budget_env_steps'] for c in group])} | "
                    f"{_mean_range([100 * c['before']['success_rate'] for c in group])} | " +
                    " | ".join(map(success, names)) + " | " + " | ".join(map(used, names)) + " |")
    seeds = ["| task | K | seed | SFT start (95% CI) | " + " | ".join(f"{t} (95% CI)" for t in titles) +
             " | env steps (" + " / ".join(titles) + ") |",
             "|---" * (5 + len(names)) + "|"]
    for c in cells:
        arms = c["arms"]
        seeds.append(f"| {c['task']} | {c['memory']} | {c['seed']} | {_ci(c['before'])} | " +
                     " | ".join(_ci(arms[e]["after"]) if e in arms else "-" for e in names) + " | " +
                     " / ".join(str(arms[e]["env_steps"]) if e in arms else "-" for e in names) + " |")
    text = ("Success % on held-out episodes, mean (min-max) over seeds; env steps: those each arm took.\n\n" +
            "\n".join(rows) + "\n\nPer seed (95% Wilson intervals):\n\n" + "\n".join(seeds))
    return {"cells": cells, "seeds": sorted({c["seed"] for c in cells}), "table": text}


def merge(folders: list[str]) -> dict[str, Any]:
    """One table from the ``estimators.json`` of earlier runs (one seed or several each)."""
    parts: list[dict[str, Any]] = []
    for folder in folders:
        path = Path(folder) / "estimators.json"
        if not path.is_file():
            raise UserError(f"--merge: {path} not found (give folders written by this script)")
        summary = json.loads(path.read_text())
        parts += summary.get("per_seed", [summary])
    merged = tables(parts)
    print(merged["table"])
    for line in sorted({p["machine"] for p in parts if "machine" in p}):
        print(f"machine: {line}")
    return {**merged, "per_seed": parts}


def run_seeds(args: argparse.Namespace, out: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Every seed as its own process of this script (``metrics.run_seed_processes``: ``--seed S --out
    <out>/seed-S``, one torch thread, at most ``args.jobs`` at a time); then the tables over the seeds."""
    common = ["--tasks", *args.tasks, "--memory", *map(str, args.memory), "--estimators", *args.estimators,
              "--group-size", str(args.group_size), "--group-updates", args.group_updates, "--budget",
              str(args.budget), "--model", args.model, "--threads", "1", "--quiet"]
    common += ["--episodes", str(args.episodes)] if args.episodes else []
    common += ["--env-steps", str(args.env_steps)] if args.env_steps else []
    common += ["--set", *args.set] if args.set else []
    metrics.run_seed_processes(__file__, common, args.seeds, args.jobs, out, "estimators")
    parts = [json.loads((out / f"seed-{s}" / "estimators.json").read_text()) for s in args.seeds]
    summary = {**header, **tables(parts), "per_seed": parts}
    (out / "estimators.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + summary["table"])
    print(f"\nmachine: {header['machine']}\ncommand: {header['command']}")
    return summary


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["EZPoints", "Blackjack"])
    parser.add_argument("--memory", type=int, nargs="+", default=[0, 2], metavar="K",
                        help="history lengths: the prompt carries the episode's last K steps (0: none)")
    parser.add_argument("--estimators", nargs="+", default=["ppo", "grpo", "gigpo"],
                        help=f"from {', '.join(ESTIMATORS)} (ppo: GAE with the recipe's value head)")
    parser.add_argument("--group-size", type=int, default=4, help="G, episodes a group (group estimators)")
    parser.add_argument("--env-steps", type=int, default=None,
                        help="env-step budget of every arm (default: the recipe's envs x steps x updates)")
    parser.add_argument("--group-updates", choices=("matched", "recipe"), default="matched",
                        help="updates of a group arm: matched (default): the env-step budget over num_envs x "
                             "the SFT start's mean held-out episode length (at most num_steps), so its env steps "
                             "match PPO's; recipe: as many updates as PPO (at most PPO's env steps)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplies SFT steps, demonstration episodes and the env-step budget (1: the recipe)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="held-out evaluation episodes per figure (default: the recipe's [eval], 500)")
    parser.add_argument("--model", default="tiny", help="'tiny' (the preset) or a model folder to start from")
    parser.add_argument("--out", default="runs/estimators", help="a new folder")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                       help="each seed run as its own process; rows print as mean (min-max) and per seed")
    seeds.add_argument("--seed", type=int, default=None, help="one seed, in this process (what --seeds runs)")
    parser.add_argument("--jobs", type=int, default=2, help="seed processes at a time (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe entry for every task, e.g. train.num_envs=8 ppo.lr=1e-4")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="run nothing: print one table from the estimators.json of earlier runs")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if args.merge:
        return merge(args.merge)
    recipes = check(args)
    args.tasks = list(recipes)  # canonical names: the children and the folders use them
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: pass --out with a new folder (nothing there is overwritten)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    how = (f"1 thread a seed, {args.jobs} seed process(es) at a time" if args.seed is None
           else f"{threads} thread(s)")
    header = {"machine": metrics.machine_line(f"torch {torch.__version__} with {how}"),
              "command": f"python {SCRIPT} {shlex.join(given)}".rstrip(), "budget": args.budget,
              "group_size": args.group_size, "group_updates": args.group_updates, "estimators": args.estimators}
    for task, rec in recipes.items():
        steps = env_budget(rec["train"], args.env_steps, args.budget)
        plans = ", ".join(f"{e} {t['total_updates']} x {t['num_envs']} envs x {t['num_steps']} steps"
                          + (" at most" if e != "ppo" else "")
                          for e in args.estimators for t in [arm(rec, e, steps, args.group_size)[0]])
        if args.group_updates == "matched" and any(e != "ppo" for e in args.estimators):
            plans += "; group arms: updates from the SFT start's mean episode length, to match the budget"
        print(f"[estimators] {task}: budget {steps} env steps a run ({plans})", flush=True)
    if args.seed is None:
        return run_seeds(args, out, header)
    part = run_seed(args, recipes, out, header)
    print("\n" + part["table"] + f"\n\nmachine: {header['machine']}\ncommand: {header['command']}")
    return part


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"estimators.py: error: {err}", file=sys.stderr)
        sys.exit(2)
