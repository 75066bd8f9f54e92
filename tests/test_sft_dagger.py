"""DAgger in `vlmrl sft` (``dagger_rounds`` > 0): the tiny model plays NumberLine, the expert labels the
states it visited, the labels join the demonstrations and SFT goes on; seeded, and resumable exactly.

Every label is checked against a fresh env replayed with the actions the policy took, so the test
relies on nothing the implementation computes about the states.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmrl.cli import main
from vlmrl.errors import UserError
from vlmrl.seeds import HELD_OUT_SEED_BASE, demo_seed
from vlmrl.sft import (
    CONFIG_FILE,
    DAGGER_FILE,
    LOSSES_FILE,
    SFTConfig,
    dagger_round,
    dagger_seed,
    load_policy,
    run_sft,
)
from vlmrl.tasks import get_task
from vlmrl.tasks.base import Memory, observation_image

TASK = get_task("NumberLine")
# 4 SFT steps, then 2 rounds of 3 episodes each followed by 3 steps: 10 steps, checkpoints at 4, 6, 8
# (action-only answers and short responses keep it fast; the labels' test writes CoT answers)
SETTINGS = {"episodes": 2, "steps": 4, "batch_size": 4, "warmup_steps": 2, "lr": 3e-3, "random_action_fraction": 1.0,
            "seed": 1, "history_length": 2, "cot": False, "dagger_rounds": 2, "dagger_episodes": 3, "dagger_steps": 3,
            "dagger_num_envs": 2, "dagger_max_new_tokens": 10, "dagger_temperature": 1.0, "checkpoint_every": 2,
            "progress": False}


@pytest.fixture(scope="module")
def model(tiny_numberline, tmp_path_factory) -> Path:
    """The tiny NumberLine model with attention dropout: a resume that did not restore the torch RNG
    would end on other weights."""
    path = tmp_path_factory.mktemp("dagger-model") / "model"
    shutil.copytree(tiny_numberline, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    """A DAgger run never interrupted."""
    return run_sft(SFTConfig(model=str(model), out_dir=str(tmp_path_factory.mktemp("dagger") / "run"), **SETTINGS))


def _replay(seed: int, actions: list[int], history_length: int, cot: bool = True):
    """(image, prompt, expert's response, expert's action, action taken) per state of the episode,
    from a fresh env stepped with ``actions``; and whether it ended there."""
    env = TASK.make_env()
    obs, info = env.reset(seed=seed)
    memory = Memory(TASK, history_length)
    rows, ended = [], False
    for action in actions:
        assert not ended, "the episode went on after its end"
        seen = memory.view(info)
        expert = TASK.expert_action(info)
        rows.append((observation_image(obs), TASK.prompt(seen, cot), TASK.response(seen, expert, cot), expert, action))
        memory.record(info, TASK.legal_actions(info)[action])
        obs, _, terminated, truncated, info = env.step(action)
        ended = terminated or truncated
    env.close()
    return rows, ended


def _summary(out: Path) -> dict:
    s = json.loads((out / "sft_summary.json").read_text())
    del s["seconds"], s["config"]["out_dir"]  # this process's timing, the folder's name
    return s


def _same_run(out: Path, reference: Path) -> None:
    mine, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for name in (LOSSES_FILE, DAGGER_FILE):
        assert json.loads((out / name).read_text()) == json.loads((reference / name).read_text())
    assert _summary(out) == _summary(reference)


def test_labels_are_the_experts_actions_on_the_states_the_policy_visited(tiny_numberline):
    # CoT answers; 3 envs for 5 episodes: slots are refilled
    cfg = SFTConfig(**{**SETTINGS, "cot": True, "dagger_max_new_tokens": 24, "dagger_episodes": 5, "dagger_num_envs": 3})
    policy = load_policy(tiny_numberline)
    demos, episodes = dagger_round(policy, TASK, cfg, round_index=2)
    # seeded: the round's own seeds, after the demonstrations' and round 1's, below the held-out range
    assert [e.seed for e in episodes] == [demo_seed(1, 2 + 5 + j) for j in range(5)] == [dagger_seed(cfg, 2, j) for j in range(5)]
    assert max(e.seed for e in episodes) < HELD_OUT_SEED_BASE
    expected = []
    for e in episodes:
        rows, ended = _replay(e.seed, e.actions, cfg.history_length)
        assert ended or len(e.actions) == 100
        expected += rows
    # one label per visited state (NumberLine's expert answers everywhere), in episode order, built like
    # a demonstration: the expert's action with its CoT thoughts, the memory holding the policy's actions
    assert len(demos) == len(expected) == sum(len(e.actions) for e in episodes)
    for d, (image, prompt, response, _, _) in zip(demos, expected):
        assert (d.image == image).all() and d.prompt == prompt and d.response == response and d.expert
    assert all('"thoughts": "' in d.response for d in demos) and any("Your last 2 steps" in d.prompt for d in demos)
    # the untrained policy strays from the expert, so these really are the policy's states
    assert any(expert != taken for *_, expert, taken in expected)
    # the same weights and settings play the same round
    again, replayed = dagger_round(policy, TASK, cfg, round_index=2)
    assert replayed == episodes and [(d.prompt, d.response) for d in again] == [(d.prompt, d.response) for d in demos]


def test_the_aggregate_grows_by_each_rounds_labeled_steps(reference):
    summary = _summary(reference)
    rounds = summary["dagger"]["rounds"]
    played = json.loads((reference / DAGGER_FILE).read_text())
    assert [r["round"] for r in rounds] == [1, 2] and len(played) == 2
    size = summary["demonstrations"]
    for r, episodes in zip(rounds, played):
        labeled = wins = 0
        for e in episodes:
            rows, _ = _replay(e["seed"], e["actions"], SETTINGS["history_length"], cot=False)
            labeled += len(rows)
            wins += e["success"]
        assert r["episodes"] == len(episodes) == SETTINGS["dagger_episodes"]
        assert r["labeled_steps"] == labeled == r["visited_steps"] and r["success_rate"] == wins / len(episodes)
        assert r["aggregate"] == size + labeled and r["sft_steps"] == SETTINGS["dagger_steps"]
        size = r["aggregate"]
    assert summary["dagger"]["aggregate"] == size
    assert summary["steps"] == 4 + 2 * 3 == len(json.loads((reference / LOSSES_FILE).read_text()))


def test_same_seed_same_run_and_plain_sft_is_its_first_phase(model, reference, tmp_path):
    again = run_sft(SFTConfig(model=str(model), out_dir=str(tmp_path / "again"), **SETTINGS))
    _same_run(again, reference)
    # dagger_rounds 0 is plain SFT: the DAgger run's first 4 steps are exactly it
    plain = run_sft(SFTConfig(model=str(model), out_dir=str(tmp_path / "plain"), **{**SETTINGS, "dagger_rounds": 0}))
    assert json.loads((plain / LOSSES_FILE).read_text()) == json.loads((reference / LOSSES_FILE).read_text())[:4]
    assert "dagger" not in _summary(plain) and not (plain / DAGGER_FILE).exists()


@pytest.mark.parametrize("step", [4, 8])  # the end of the first phase (round 1 still to play); mid round 2
def test_resume_from_a_checkpoint_is_exact(reference, tmp_path, step):
    """What a kill after ``step`` leaves: the config and that checkpoint. From checkpoint-8 the
    aggregate is rebuilt by replaying both rounds' recorded actions."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / CONFIG_FILE, out / CONFIG_FILE)
    shutil.copytree(reference / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")
    steps: list[int] = []
    cfg = dataclasses.replace(SFTConfig(**json.loads((reference / CONFIG_FILE).read_text())), out_dir=str(out))
    run_sft(cfg, resume=True, callback=lambda s, _: steps.append(s))
    assert steps == list(range(step + 1, 11))
    _same_run(out, reference)


def test_resume_refuses_a_record_that_no_longer_replays(reference, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / CONFIG_FILE, out / CONFIG_FILE)
    ckpt = out / "checkpoints" / "checkpoint-8"
    shutil.copytree(reference / "checkpoints" / "checkpoint-8", ckpt)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    state["dagger_episodes"][0][0]["actions"] = state["dagger_episodes"][0][0]["actions"][:1]  # cut short
    torch.save(state, ckpt / "trainer_state.pt")
    cfg = dataclasses.replace(SFTConfig(**json.loads((reference / CONFIG_FILE).read_text())), out_dir=str(out))
    with pytest.raises(UserError, match="went past its recorded actions"):
        run_sft(cfg, resume=True)


@pytest.mark.parametrize("changes, message", [
    ({"dagger_rounds": -1}, "dagger_rounds must be >= 0"),
    ({"dagger_episodes": 0}, "dagger_episodes must be >= 1"),
    ({"dagger_steps": -2}, "dagger_steps must be >= 0"),
    ({"dagger_temperature": -0.5}, "dagger_temperature must be >= 0"),
    ({"dagger_num_envs": 0}, "dagger_num_envs must be >= 1"),
    ({"dagger_max_new_tokens": 0}, "dagger_max_new_tokens must be >= 1"),
    # the policy's episodes would run past the seed's block of reset seeds
    ({"episodes": 999_000, "dagger_rounds": 2, "dagger_episodes": 500}, r"episodes \+ dagger_rounds \* dagger_episodes must be < 1,000,000"),
])
def test_bad_settings_are_one_line_user_errors(changes, message):
    with pytest.raises(UserError, match=message) as err:
        SFTConfig(**changes)
    assert "\n" not in str(err.value)


def test_a_task_without_an_expert_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="vlmrl sft --dagger-rounds needs an expert and task 'GridNoExpert' has none"):
        run_sft(SFTConfig(task="own_task.grid_task:NO_EXPERT", out_dir=str(out), dagger_rounds=1))
    assert not out.exists()


def test_cli_runs_dagger_and_refuses_bad_values(tiny_numberline, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "NumberLine", "--model", tiny_numberline, "--out", str(out), "--episodes", "2", "--steps", "2",
            "--batch-size", "4", "--no-cot", "--dagger-rounds", "1", "--dagger-episodes", "2", "--dagger-steps", "2",
            "--dagger-max-new-tokens", "8", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    (r,) = summary["dagger"]["rounds"]
    assert r["episodes"] == 2 and r["labeled_steps"] > 0 and summary["steps"] == 4
    assert summary["dagger"]["aggregate"] == summary["demonstrations"] + r["labeled_steps"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--dagger-rounds", "-1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmrl:")]
    assert len(err) == 1 and "dagger_rounds must be >= 0" in err[0]
