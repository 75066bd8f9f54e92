"""ALFWorld's handcoded (searching) expert on the real text engine: wins, admissible commands only,
recovery after the agent's own detours, seeding, and the walkthrough fallback of demonstrations.

Games are valid_unseen ones named by folder; a game load costs 1-3 s (a reset of the loaded game
again about 0.1 s), so the tests share one env and few games. Skipped with a message without the
game files (ALFWORLD_DATA) or the alfworld package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vlmrl.errors import UserError
from vlmrl.tasks.alfworld import TASK, ALFWorldEnv
from vlmrl.tasks.demos import collect_demonstrations

_DATA = os.environ.get("ALFWORLD_DATA")
needs_data = pytest.mark.skipif(
    not _DATA or not os.path.isdir(os.path.join(_DATA, "json_2.1.1")) or importlib.util.find_spec("alfworld") is None,
    reason="ALFWorld games not available: set ALFWORLD_DATA (e.g. ../shared/data/alfworld) and "
    "pip install 'vlmrl[alfworld]'",
)

PICK_TWO = "pick_two_obj_and_place-Pillow-None-Sofa-219"  # two pillows on the sofa
LOOK = "look_at_obj_in_light-AlarmClock-None-DeskLamp-308"
HEAT = "pick_heat_then_place_in_recep-Apple-None-Fridge-10"
PICK = "pick_and_place_simple-Mug-None-Desk-308"  # walkthrough 4 commands, the expert searches 5


def game_index(env, folder: str) -> int:
    return next(i for i, g in enumerate(env.unwrapped.games) if f"/{folder}/" in g)


def follow_expert(env, info, limit: int = 50):
    """Play the expert's commands, checking each is admissible; (commands, last reward, info)."""
    commands, reward = [], 0.0
    for _ in range(limit):
        command = info["expert_action"]
        assert command in info["admissible_commands"], command
        commands.append(command)
        _, reward, terminated, truncated, info = env.step(TASK.expert_action(info))
        if terminated or truncated:
            break
    return commands, reward, info


@pytest.fixture(scope="module")
def env():
    e = ALFWorldEnv(split="valid_unseen", expert="handcoded")
    yield e
    e.close()


# --- options (no game files needed) -----------------------------------------------------------------
def test_bad_expert_options_are_user_errors():
    with pytest.raises(UserError, match="unknown ALFWorld expert 'planner': choose one of walkthrough, handcoded"):
        ALFWorldEnv(expert="planner")
    with pytest.raises(UserError, match="replan_expert"):
        ALFWorldEnv(expert="handcoded", replan_expert=True)


@needs_data
def test_bad_reset_expert_options_are_user_errors():
    env = ALFWorldEnv(split="valid_unseen", num_games=1)  # nothing is loaded before the options are checked
    assert env.expert == "walkthrough" and env.fallback_expert is None
    with pytest.raises(UserError, match="unknown ALFWorld expert 'oracle'"):
        env.reset(options={"expert": "oracle"})
    with pytest.raises(UserError, match="made with expert='handcoded'"):
        env.reset(options={"expert": "handcoded"})
    with pytest.raises(UserError, match="only 'game', 'expert' accepted"):
        env.reset(options={"level": 1})
    with pytest.raises(UserError, match="unknown ALFWorld expert"):
        TASK.make_env(split="valid_unseen", expert="Handcoded")


# --- the real engine --------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("folder", [LOOK, HEAT, PICK_TWO])  # PICK_TWO last: the next test replays it
def test_handcoded_expert_wins_with_admissible_commands(env, folder):
    _, info = env.reset(seed=0, options={"game": game_index(env, folder)})
    commands, reward, info = follow_expert(env, info)
    assert info["won"] and reward == 51.0 and info["expert_action"] is None
    if folder == PICK_TWO:
        # the first pillow placed, the expert knows its hands are empty again: alfworld 0.4's "move"
        # tracked as the "put" it was written for (unpatched, it proposed that move once more)
        moves = [c for c in commands if c.startswith("move ")]
        assert len(moves) == 2 and moves[0] != moves[1]


@needs_data
def test_same_seed_same_episode(env):
    game = game_index(env, PICK_TWO)
    before = random.getstate()
    runs = []
    for _ in range(2):
        _, info = env.reset(seed=5, options={"game": game})
        runs.append(follow_expert(env, info)[0])
    assert runs[0] == runs[1]
    assert random.getstate() == before  # the expert draws from the episode's generator, not the global one


@needs_data
def test_expert_recovers_after_taking_a_wrong_object(env):
    _, info = env.reset(seed=0, options={"game": game_index(env, PICK)})
    target = "mug"
    # follow the expert until something other than a mug can be taken, then take it
    for _ in range(10):
        wrong = [c for c in info["admissible_commands"] if c.startswith("take ") and f"take {target}" not in c]
        if wrong:
            break
        _, _, _, _, info = env.step(TASK.expert_action(info))
    assert wrong, "no other object on the expert's way"
    took = wrong[0]
    obj, source = took[len("take "):].split(" from ")
    _, _, _, _, info = env.step(info["admissible_commands"].index(took))
    assert info["expert_action"] in info["admissible_commands"]  # the walkthrough would have none here
    commands, reward, info = follow_expert(env, info)
    # it puts the wrong object back where it was, then wins
    assert f"move {obj} to {source}" in commands and info["won"] and reward == 51.0


@needs_data
def test_demonstrations_fall_back_to_the_walkthrough_where_the_expert_does_not_win():
    game = next(Path(_DATA, "json_2.1.1", "valid_unseen", PICK).glob("*/game.tw-pddl"))
    walkthrough = json.loads(game.read_text())["walkthrough"]
    assert len(walkthrough) == 4

    def actions(max_steps):
        kwargs = {"split": "valid_unseen", "task_types": "pick_and_place_simple", "num_games": 1,
                  "max_steps": max_steps, "expert": "handcoded"}
        demos = collect_demonstrations(TASK, 1, env_kwargs=kwargs)
        assert all(d.expert for d in demos)
        return [json.loads(d.response)["action"] for d in demos]

    # 50 steps: the expert searches and wins (shelf 1 first, then shelf 2), so its own steps are kept
    searched = actions(50)
    assert searched != walkthrough and len(searched) == 5 and searched[-1].startswith("move mug")
    # 4 steps: the expert has not won when the limit comes; the game is demonstrated by its walkthrough
    assert actions(4) == walkthrough


# --- the benchmark scripts (smoke: the real scripts on one game) -------------------------------------
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(*args: str, **env: str) -> str:
    done = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_data
@pytest.mark.slow  # a fresh process importing alfworld and loading a game: 5-25 s, with the machine's load
def test_expert_benchmark_measures_the_handcoded_expert():
    out = run_script(str(BENCHMARKS / "alfworld_expert.py"), "--games", "1", "--expert", "handcoded",
                     "--task-type", "pick_and_place_simple")
    assert "expert handcoded" in out and "expert wins 1/1" in out and "pick_and_place_simple" in out


@needs_data
@pytest.mark.slow  # as above, and the script imports torch
def test_demos_stage_caches_handcoded_demonstrations(tmp_path):
    out = run_script(str(BENCHMARKS / "alfworld.py"), "--stage", "demos", "--sft-games", "1", "--detour-games", "0",
                     "--quiet", VLMRL_CACHE=str(tmp_path))
    cached = [line.split("cached: ")[1] for line in out.splitlines() if "cached: " in line]
    assert len(cached) == 1 and Path(cached[0]).parent == tmp_path / "demos"
    rows = [json.loads(line) for line in Path(cached[0]).read_text().splitlines()]
    assert rows and all(r["expert"] for r in rows)
    # every answer is one of the admissible commands its prompt lists
    assert all(f"\n{json.loads(r['response'])['action']}\n" in r["prompt"] for r in rows)
