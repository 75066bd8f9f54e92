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

import dataclasses
import json
import time
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
             recipe: str | Path | dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the five steps; print the table and return it as a dict (also written to demo.json).

    ``recipe`` defaults to the task's file under configs/recipes; ``sft``, ``train_kw`` and ``ppo``
    change it (benchmarks pass their overrides); ``episodes`` defaults to the recipe's [eval].
    """
    from vlmrl.evaluate import ModelPolicy, evaluate
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

    def held_out(path: Path, name: str):
        policy = ModelPolicy.load(str(path), task, cot=cot, temperature=ev.temperature, seed=seed,
                                  max_new_tokens=train_kw["max_new_tokens"], name=name)
        return evaluate(task, policy, episodes, seed=seed, num_envs=ev.num_envs, progress=progress)

    t0 = time.perf_counter()
    before = held_out(sft_dir, "SFT")
    stage("evaluate SFT", t0)

    t0 = time.perf_counter()
    cfg = TrainConfig(task=task.name, model=str(sft_dir), out_dir=str(out / "ppo"), seed=seed, cot=cot,
                      ppo=ppo or rec["ppo"], policy=rec["policy"], **train_kw)
    final = train(cfg, progress=progress)
    stage("PPO", t0)

    t0 = time.perf_counter()
    after = held_out(final, "SFT+PPO")
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


def _table(task: str, before, after) -> str:
    rows = [f"| {task}, held-out | success % (95% CI) | mean return | invalid % | episodes |",
            "|---|---|---|---|---|"]
    for name, r in (("after SFT (imperfect expert)", before), ("after SFT + PPO", after)):
        lo, hi = r.success_ci95
        rows.append(f"| {name} | {100 * r.success_rate:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | "
                    f"{r.mean_return:.2f} | {100 * r.invalid_action_rate:.1f} | {r.episodes} |")
    return "\n".join(rows)
