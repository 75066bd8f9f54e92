"""Smoke tests: both benchmark scripts run end to end with a tiny budget and print their tables.

The scripts live outside the package (benchmarks/), so they are loaded from their files and their
``main(argv)`` is called in-process. torch runs on one thread here: the suite shares 2 cores with other
jobs, and tiny matmuls on two contended OpenMP threads are many times slower than on one.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from vlmrl import demo
from vlmrl.errors import UserError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_throughput_runs_and_reports_every_figure(tiny_model, tmp_path, capsys, one_thread):
    throughput = load_script("throughput")
    out = tmp_path / "speed.json"
    summary = throughput.main(["--model", tiny_model, "--envs", "1", "2", "--env-steps", "2", "--baseline-steps", "2",
                               "--max-new-tokens", "4", "--minibatch-sizes", "1", "2", "--epochs", "1",
                               "--peak-size", "128", "--json", str(out)])
    printed = capsys.readouterr().out
    for text in ("machine:", "load average", "| per-sample loop | 2 | 2 |", "| batched | 1 | 2 |", "| batched | 2 | 2 |",
                 "% of peak", "peak:", "target: batched at 2 envs"):
        assert text in printed, text
    rollout = summary["rollout"]
    assert [(r["mode"], r["envs"], r["env_steps"]) for r in rollout] == [
        ("per-sample loop", 2, 2), ("batched", 1, 2), ("batched", 2, 2)]
    for r in rollout:  # every step samples 1..max_new_tokens tokens
        assert r["env_steps"] <= r["response_tokens"] <= 4 * r["env_steps"] and r["seconds"] > 0
    # one timed epoch over the 2-env rollout (1 step x 2 envs) per minibatch size
    assert [(u["minibatch_size"], u["samples"]) for u in summary["update"]] == [(1, 2), (2, 2)]
    for u in summary["update"]:
        assert u["flops"] > 0 and 0 < u["fraction_of_peak"] < 1 and u["encode_seconds"] < u["fwd_bwd_seconds"]
    # the same two samples cost the same counted FLOPs however they are batched (up to padding)
    a, b = (u["flops"] for u in summary["update"])
    assert 0.8 < a / b <= 1.0
    assert json.loads(out.read_text())["speedup"] == pytest.approx(summary["speedup"])
    assert torch.get_num_threads() == 1  # main leaves the thread count as it found it


def test_matmul_peak_is_a_plausible_rate(one_thread):
    peak = load_script("throughput").matmul_peak(n=128, repeats=2)
    assert 1e8 < peak < 1e13  # FLOP/s of one CPU thread, far from 0 and from a miscount by 1e3


def test_learning_table_runs_both_cot_modes(tiny_model, tmp_path, capsys, one_thread):
    learning = load_script("learning")
    out = tmp_path / "table"
    summary = learning.main(["--tasks", "NumberLine", "--budget", "0.01", "--episodes", "2", "--model", tiny_model,
                             "--out", str(out), "--quiet", "--set", "train.num_envs=2", "train.num_steps=1",
                             "train.max_new_tokens=6", "train.tensorboard=false", "sft.batch_size=4",
                             "ppo.minibatch_size=2", "ppo.grad_accum_steps=1"])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| NumberLine |")]
    assert len(rows) == 2 and "| yes | 89.4 |" in rows[0] and "| no | 26.9 |" in rows[1]
    assert ">= 95%" in rows[0] and "min |" in rows[0]
    runs = summary["runs"]
    assert [r["cot"] for r in runs] == [True, False]
    for run in runs:
        assert run["sft"]["steps"] == 3 and run["sft"]["episodes"] == 3  # ceil(300 * 0.01)
        assert run["train"]["total_updates"] == 1 and run["train"]["num_envs"] == 2
        assert run["before"]["episodes"] == run["after"]["episodes"] == 2
    assert summary["baselines"]["NumberLine"]["expert"]["success_rate"] == 1.0
    assert (out / "NumberLine-cot" / "ppo" / "final" / "config.json").is_file()
    assert json.loads((out / "learning.json").read_text())["table"] == summary["table"]
    # runs made apart (e.g. one task per process) print as one table again
    merged = learning.main(["--merge", str(out)])
    assert merged["table"] == summary["table"]
    with pytest.raises(learning.UserError, match="learning.json not found"):
        learning.main(["--merge", str(tmp_path)])


def test_learning_recipes_reuse_the_demo_and_reject_bad_input(tmp_path):
    learning = load_script("learning")
    nl = learning.recipe("NumberLine")
    shipped = demo.load_recipe(demo.recipe_file("NumberLine"))  # the demo's own file
    assert nl["sft"] == shipped["sft"] and nl["train"] == shipped["train"] and nl["ppo"] == shipped["ppo"]
    assert all(learning.recipe(t)["file"].endswith(f"{t.casefold()}.toml") for t in learning.PAPER)
    scaled = learning.scale(nl, 0.5)
    assert scaled["sft"]["steps"] == -(-nl["sft"]["steps"] // 2) and scaled["train"]["total_updates"] == -(-nl["train"]["total_updates"] // 2)
    assert learning.apply_overrides(nl, ["ppo.lr=0.001"])["ppo"].lr == 0.001
    with pytest.raises(UserError, match="section.key=value"):
        learning.apply_overrides(nl, ["train.num_env=8"])
    with pytest.raises(UserError, match="budget"):
        learning.scale(nl, 0)
    # --recipe: one task's run from another file (a shipped variant here)
    gigpo = learning.recipe("Blackjack", demo.RECIPES / "blackjack-gigpo.toml")
    assert gigpo["ppo"].advantage == "gigpo" and gigpo["file"].endswith("blackjack-gigpo.toml")
    with pytest.raises(SystemExit):  # argparse's one line: --recipe is one task's file
        learning.main(["--tasks", "NumberLine", "EZPoints", "--recipe", gigpo["file"], "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="not found"):
        learning.main(["--tasks", "Blackjack", "--recipe", str(tmp_path / "none.toml"), "--out", str(tmp_path / "r")])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        learning.main(["--tasks", "NumberLine", "--out", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def test_learning_table_over_seeds_runs_one_process_per_seed(tiny_model, tmp_path, capsys):
    learning = load_script("learning")
    out = tmp_path / "seeds"
    summary = learning.main(["--tasks", "NumberLine", "--cot", "on", "--seeds", "0", "1", "--jobs", "2",
                             "--recipe", str(demo.RECIPES / "numberline.toml"),
                             "--budget", "0.01", "--episodes", "3", "--model", tiny_model, "--out", str(out),
                             "--set", "train.num_envs=2", "train.num_steps=1", "train.max_new_tokens=6",
                             "train.tensorboard=false", "sft.batch_size=4", "ppo.minibatch_size=2",
                             "ppo.grad_accum_steps=1"])
    printed = capsys.readouterr().out
    # each seed ran as its own process, into its own folder, with its own seed
    parts = summary["per_seed"]
    assert [p["seed"] for p in parts] == [0, 1]
    for seed, part in zip((0, 1), parts):
        assert json.loads((out / f"seed-{seed}" / "learning.json").read_text())["seed"] == seed
        assert (out / f"seed-{seed}" / "NumberLine-cot" / "ppo" / "final" / "config.json").is_file()
        assert "NumberLine, CoT on" in (out / f"seed-{seed}.log").read_text()
        assert json.loads((out / f"seed-{seed}" / "NumberLine-cot" / "demo.json").read_text())["seed"] == seed
        assert part["runs"][0]["recipe"] == str((demo.RECIPES / "numberline.toml").resolve())  # --recipe reached it
    # one row over the seeds: mean (min-max) of the per-seed figures
    after = [100 * p["runs"][0]["after"]["success_rate"] for p in parts]
    row = next(line for line in printed.splitlines() if line.startswith("| NumberLine | yes | 0 1 |"))
    assert f"| {sum(after) / 2:.1f} ({min(after):.1f}-{max(after):.1f}) |" in row
    assert ">= 95%: met on" in row and "/2 seeds" in row
    # then one row per seed with its Wilson interval
    for seed, part in zip((0, 1), parts):
        run = part["runs"][0]
        lo, hi = run["after"]["success_ci95"]
        assert f"| NumberLine | yes | {seed} | " in printed
        assert f"{100 * run['after']['success_rate']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})" in printed
    assert json.loads((out / "learning.json").read_text())["table"] == summary["table"]
    # the seed folders merged by hand give the same table; a run given twice is refused
    merged = learning.main(["--merge", str(out / "seed-0"), str(out / "seed-1")])
    assert merged["table"] == summary["table"] == learning.main(["--merge", str(out)])["table"]
    with pytest.raises(UserError, match="appears twice: NumberLine CoT on seed 0"):
        learning.main(["--merge", str(out), str(out / "seed-0")])


def test_agreement_tells_misreads_from_wrong_decisions(tiny_model, capsys, one_thread):
    import numpy as np

    from vlmrl.tasks import get_task

    agreement = load_script("agreement")
    task = get_task("Blackjack")
    env = task.make_env()
    _, info = env.reset(seed=3)
    words = task.legal_actions(info)
    best = task.expert_action(info)
    right = task.response(info, best)
    wrong_total = right.replace(f'"your total": "{info["player_sum"]}"', '"your total": "99"')
    replies = [right, task.response(info, 1 - best), wrong_total.replace(f'"action": "{words[best]}"',
                                                                         f'"action": "{words[1 - best]}"'), "no json"]
    counts, wrong = agreement.Counter(), agreement.Counter()
    actions = agreement.tally(task, [info] * 4, replies, np.random.default_rng(0), counts, wrong, [True, True, True, False])
    assert actions[:3] == [best, 1 - best, 1 - best] and 0 <= actions[3] <= 1
    assert (counts["steps"], counts["read"], counts["agree"]) == (3, 2, 1)
    assert (counts["read, disagree"], counts["misread, disagree"], counts["read your total"]) == (1, 1, 2)
    assert sum(wrong.values()) == 2 and {r for (_, _, r) in wrong} == {True, False}
    # end to end on a policy folder: every figure is a rate over the counted steps
    assert agreement.main(["Blackjack", str(tiny_model), "--episodes", "3", "--num-envs", "3",
                           "--first-steps", "1", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "3 steps counted (the first 1 of each episode's steps)" in out and "misread, disagree" in out
