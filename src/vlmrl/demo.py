"""`vlmrl demo`: the whole method on a laptop CPU, on NumberLine, in a few minutes.

1. build the tiny VLM offline (cached after the first run);
2. SFT it on a deliberately imperfect expert (the demonstrated actions are random, as the paper's
   SFT start that won only 24.8% of NumberLine);
3. evaluate it on held-out episodes;
4. PPO on the environment's reward;
5. evaluate again, and print a before / after table with 95% confidence intervals.

The recipe is a file, ``configs/recipes/numberline.toml`` (tables [sft], [train], [eval]); every README
figure names the recipe file that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vlmrl.config import EvalConfig, PPOConfig, TrainConfig, load_config, read_recipe
from vlmrl.errors import UserError

TASK = "NumberLine"
# configs/recipes beside the package (a clone or an editable install)
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def recipe_file(task: str) -> Path:
    """The shipped recipe of a task, ``configs/recipes/<task>.toml``."""
    path = RECIPES / f"{task.casefold()}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES.glob("*.toml")) if RECIPES.is_dir() else []
        raise UserError(f"no recipe file {path} for {task}: pass recipe= a .toml file with [sft], [train] and "
                        f"[eval] tables (shipped: {', '.join(shipped) or 'none found; run from a clone'})")
    return path


def load_recipe(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """``{"sft": dict, "train": dict, "ppo": PPOConfig, "policy": PolicyConfig, "eval": EvalConfig}``
    from a recipe; every table is checked now (unknown keys, types, ranges), not when it is used."""
    tables = read_recipe(source)
    train = tables.get("train", {})
    fixed = {"task": TASK, "model": "-", "out_dir": "-"}  # placeholders: the run sets these
    cfg = load_config(TrainConfig, train, {k: v for k, v in fixed.items() if k not in train})
    from vlmrl.sft import SFTConfig

    sft = tables.get("sft", {})
    load_config(SFTConfig, sft)  # the same strict keys and types as the other tables
    plain = {k: v for k, v in train.items() if k not in ("ppo", "policy")}
    return {"sft": sft, "train": plain, "ppo": cfg.ppo, "policy": cfg.policy,
            "eval": load_config(EvalConfig, tables.get("eval", {}))}


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, episodes: int | None = None, cot: bool = True,
             progress: bool = True, sft: dict[str, Any] | None = None, train_kw: dict[str, Any] | None = None,
             ppo: PPOConfig | None = None, task: str = TASK, model: str = "tiny",
             recipe: str | Path | dict[str, Any] | None = None, parallel: bool | None = None) -> dict[str, Any]:
    """Run the five steps; print the table and return it as a dict (also written to demo.json).

    ``recipe`` defaults to the task's file under configs/recipes; ``sft``, ``train_kw`` and ``ppo``
    change it (benchmarks pass their overrides); ``episodes`` defaults to the recipe's [eval].

    ``parallel`` (None: when this process may use two CPUs or more) evaluates the SFT policy in a
    second process while PPO trains: the tiny model runs on one thread, so PPO leaves a core idle.
    The evaluation is seeded on its own, so the printed figures are the same either way.
    """
    from vlmrl.policy.presets import resolve_model
    from vlmrl.sft import SFTConfig, run_sft
    from vlmrl.tasks import get_task

    from vlmrl.trainer import train

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: pass --out with a new folder (nothing there is overwritten)")
    task = get_task(task)
    rec = load_recipe(recipe if recipe is not None else recipe_file(task.name))
    sft = {**rec["sft"], **(sft or {})}
    train_kw = {**rec["train"], **(train_kw or {})}
    ev = rec["eval"]
    episodes = episodes or ev.episodes or 500
    times: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name: str, t0: float) -> None:
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {name} done in {times[name]:.0f} s", flush=True)

    t0 = time.perf_counter()
    model = resolve_model(model, task.name)
    stage("build tiny VLM", t0)

    t0 = time.perf_counter()
    sft_cfg = SFTConfig(task=task.name, model=str(model), out_dir=str(out / "sft"), cot=cot, seed=seed,
                        progress=progress, **sft)
    sft_dir = run_sft(sft_cfg)
    stage("SFT", t0)

    held_out = functools.partial(_held_out, task=task, cot=cot, ev=ev, seed=seed, episodes=episodes,
                                 max_new_tokens=train_kw["max_new_tokens"])
    cfg = TrainConfig(task=task.name, model=str(sft_dir), out_dir=str(out / "ppo"), seed=seed, cot=cot,
                      ppo=ppo or rec["ppo"], policy=rec["policy"], **train_kw)
    beside = _second_process(task) if (parallel if parallel is not None else _cpus() >= 2) else None
    with beside or contextlib.nullcontext():
        t0 = time.perf_counter()
        if beside is not None:
            pending = beside.submit(_timed, held_out, sft_dir, "SFT", progress=False)
        else:
            before = held_out(sft_dir, "SFT", progress=progress)
            stage("evaluate SFT", t0)

        t0 = time.perf_counter()
        final = train(cfg, progress=progress)
        stage("PPO", t0)
        if beside is not None:
            before, times["evaluate SFT"] = pending.result()
            print(f"[demo] evaluate SFT (in a second process, beside PPO) took {times['evaluate SFT']:.0f} s", flush=True)

    t0 = time.perf_counter()
    after = held_out(final, "SFT+PPO", progress=progress)
    stage("evaluate SFT+PPO", t0)

    times["total"] = round(time.perf_counter() - t_start, 1)
    table = _table(task.name, before, after)
    print("\n" + table)
    print(f"\nlearning curve: {out / 'ppo' / 'learning_curve.png'}")
    print(f"total wall time: {times['total']:.0f} s")
    summary = {"task": task.name, "cot": cot, "seed": seed, "episodes": episodes, "before": before.to_json(),
               "after": after.to_json(), "seconds": times, "sft": dataclasses.asdict(sft_cfg),
               "train": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _held_out(path: Path, name: str, *, task: Any, cot: bool, ev: EvalConfig, seed: int, episodes: int,
              max_new_tokens: int, progress: bool):
    """The policy in ``path`` on the held-out episodes (an ``EvalResult``)."""
    from vlmrl.evaluate import ModelPolicy, evaluate

    policy = ModelPolicy.load(str(path), task, cot=cot, temperature=ev.temperature, seed=seed,
                              max_new_tokens=max_new_tokens, name=name)
    return evaluate(task, policy, episodes, seed=seed, num_envs=ev.num_envs, progress=progress)


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args, **kwargs), round(time.perf_counter() - t0, 1)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _second_process(task: Any) -> ProcessPoolExecutor | None:
    """One worker process (spawned: this one runs torch threads), or None when the task cannot be sent
    to it (a task class defined in ``__main__`` or a closure): the evaluation then runs here."""
    try:
        pickle.dumps(task)
    except Exception:  # noqa: BLE001  (whatever pickling raises, the serial path is right)
        return None
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def _table(task: str, before, after) -> str:
    rows = [f"| {task}, held-out | success % (95% CI) | mean return | invalid % | episodes |",
            "|---|---|---|---|---|"]
    for name, r in (("after SFT (imperfect expert)", before), ("after SFT + PPO", after)):
        lo, hi = r.success_ci95
        rows.append(f"| {name} | {100 * r.success_rate:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | "
                    f"{r.mean_return:.2f} | {100 * r.invalid_action_rate:.1f} | {r.episodes} |")
    return "\n".join(rows)
