"""Smoke test of benchmarks/estimators.py: PPO vs a group estimator, with and without memory, at a tiny
budget on NumberLine, through its one-process-per-seed path; and its refusals of bad input.

The script lives outside the package, so it is loaded from its file and ``main(argv)`` is called
in-process (the seed itself runs in a child process, as it does for users).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmrl.errors import UserError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "estimators.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_estimators", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_estimators_share_one_sft_per_memory_and_report_their_env_steps(tiny_model, tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "est"
    # 6 envs: GRPO's groups of 4 take 4 of them; 0.02 x 1200 env steps = 2 PPO updates of 6 envs x 2 steps
    summary = bench.main(["--tasks", "NumberLine", "--memory", "0", "1", "--seeds", "0", "--estimators", "ppo",
                          "grpo", "--budget", "0.02", "--env-steps", "1200", "--episodes", "4", "--model",
                          tiny_model, "--out", str(out), "--set", "train.num_envs=6", "train.num_steps=2",
                          "train.max_new_tokens=8", "train.tensorboard=false", "sft.batch_size=4",
                          "ppo.minibatch_size=4", "ppo.grad_accum_steps=1"])
    printed = capsys.readouterr().out
    budget = 24
    header = next(line for line in printed.splitlines() if line.startswith("| task | K | seeds |"))
    for column in ("env-step budget", "SFT start", "PPO (GAE)", "GRPO", "env steps, PPO (GAE)", "env steps, GRPO"):
        assert f"| {column} |" in header, column
    assert "| GiGPO |" not in header
    assert "machine: " in printed and "command: python benchmarks/estimators.py --tasks NumberLine" in printed
    cells = summary["cells"]
    for cell in cells:  # a row over the seeds, then the seed's own row with its intervals
        start, (ppo, grpo) = cell["before"]["success_rate"], (cell["arms"][e] for e in ("ppo", "grpo"))
        rows = [line for line in printed.splitlines() if line.startswith(f"| NumberLine | {cell['memory']} | 0 | ")]
        assert len(rows) == 2
        assert rows[0].startswith(f"| NumberLine | {cell['memory']} | 0 | {budget} | {100 * start:.1f} (")
        assert rows[0].endswith(f"| {ppo['env_steps']} | {grpo['env_steps']} |")
        lo, hi = ppo["after"]["success_ci95"]
        assert f"| {100 * ppo['after']['success_rate']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) |" in rows[1]
        assert rows[1].endswith(f"| {ppo['env_steps']} / {grpo['env_steps']} |")
    assert [(c["task"], c["memory"], c["seed"]) for c in cells] == [("NumberLine", 0, 0), ("NumberLine", 1, 0)]
    seed_dir = out / "seed-0"
    # one SFT per (task, K), with that K, and every estimator trained from it
    assert sorted(p.parent.name for p in seed_dir.rglob("sft_config.json")) == ["sft", "sft"]
    for cell in cells:
        cell_dir = seed_dir / f"NumberLine-K{cell['memory']}"
        sft = json.loads((cell_dir / "sft" / "sft_config.json").read_text())
        assert sft["history_length"] == cell["memory"] and sft["steps"] == 6  # ceil(300 * 0.02)
        assert cell["before"]["episodes"] == 4 and cell["budget_env_steps"] == budget
        for estimator, advantage in (("ppo", "gae"), ("grpo", "grpo")):
            run = json.loads((cell_dir / estimator / "config.json").read_text())
            assert Path(run["model"]) == cell_dir / "sft" and run["history_length"] == cell["memory"]
            assert run["ppo"]["advantage"] == advantage and run["num_envs"] % run["ppo"]["group_size"] == 0
            assert cell["arms"][estimator]["after"]["episodes"] == 4
        assert run["ppo"]["value_lr"] is None and run["ppo"]["group_size"] == 4  # the GRPO run
        # GRPO (--group-updates matched): 24 env steps over 4 envs x min(2 steps, the SFT start's mean length)
        length = cell["before"]["mean_episode_length"]
        assert [(cell["arms"][e]["num_envs"], cell["arms"][e]["total_updates"]) for e in ("ppo", "grpo")] == \
            [(6, 2), (4, int(24 // (4 * min(2, max(1.0, length)))))]
        # PPO uses exactly its budget, the group estimator about as much (its episodes end early)
        assert cell["arms"]["ppo"]["env_steps"] == budget
        assert 0 < cell["arms"]["grpo"]["env_steps"] <= 2 * budget
    assert "NumberLine K=1 seed 0 grpo" in (out / "seed-0.log").read_text()
    assert json.loads((out / "estimators.json").read_text())["table"] == summary["table"]
    # the seed folder merged again gives the same table; a run given twice is refused
    assert bench.main(["--merge", str(seed_dir)])["table"] == summary["table"]
    with pytest.raises(UserError, match="appears twice: NumberLine K=0 seed 0"):
        bench.main(["--merge", str(out), str(seed_dir)])


def test_group_arms_are_matched_to_the_env_step_budget():
    """A group update takes num_envs x min(num_steps, L) env steps for episodes of mean length L: matched
    arms get the budget over that; unmatched ones PPO's number of updates."""
    bench = load_script()
    rec = bench.recipe("Blackjack")  # 64 envs x 4 steps, 120 updates: 30,720 env steps
    steps = bench.env_budget(rec["train"], None, 1.0)
    assert steps == 30720
    assert bench.arm(rec, "ppo", steps, 4, 1.5)[0]["total_updates"] == 120  # PPO's steps are fixed
    assert bench.arm(rec, "gigpo", steps, 4)[0]["total_updates"] == 120
    assert bench.arm(rec, "gigpo", steps, 4, 1.5)[0]["total_updates"] == 320  # 30720 // (64 x 1.5)
    assert bench.arm(rec, "grpo", steps, 4, 9.0)[0]["total_updates"] == 120  # cut at num_steps = 4
    assert bench.arm(rec, "grpo", steps, 4, 0.5)[0]["total_updates"] == 480  # at least one step an episode


def test_estimators_refuse_bad_input(tmp_path, monkeypatch):
    bench = load_script()

    def ran(*args, **kwargs):  # input let through would start hours of training
        raise AssertionError("bad input was not refused")

    monkeypatch.setattr(bench, "run_seed", ran)
    monkeypatch.setattr(bench, "run_seeds", ran)
    base = ["--out", str(tmp_path / "new"), "--seed", "0"]
    for argv, message in (
        (["--tasks", "ALFWorld"], "use benchmarks/alfworld.py"),
        (["--tasks", "FrozenLake"], "choose card tasks"),
        (["--estimators", "ppo", "a2c"], "unknown estimator"),
        (["--memory", "-1"], "--memory"),
        (["--tasks", "NumberLine", "NumberLine"], "each value once"),
        (["--tasks", "NumberLine", "numberline"], "NumberLine is given twice"),
        (["--group-size", "1"], "--group-size must be >= 2"),
        (["--budget", "0"], "--budget must be > 0"),
        (["--set", "ppo.advantage=rloo"], "sets it for each run"),
        (["--set", "sft.history_length=3"], "sets it for each run"),
        (["--set", "train.num_env=8"], "num_env"),
        (["--tasks", "NumberLine", "--group-size", "64", "--budget", "0.02"], "exceeds the budget"),  # 64 envs > 32
    ):
        with pytest.raises(UserError, match=message):
            bench.main(argv + base)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        bench.main(["--tasks", "NumberLine", "--out", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "x").read_text() == "keep me" and not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="estimators.json not found"):
        bench.main(["--merge", str(tmp_path)])
    # run as a script: one line on stderr and exit 2, no traceback
    done = subprocess.run([sys.executable, str(SCRIPT), "--estimators", "a2c", "--out", str(tmp_path / "new")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.startswith("estimators.py: error: unknown estimator(s) a2c")
    assert len(done.stderr.strip().splitlines()) == 1
