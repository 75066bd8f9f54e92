"""ALFWorld on the real text engine: expert wins, rewards, invalid commands, truncation, detours.

Tests that play games need the game files (ALFWORLD_DATA, which scripts/test.sh sets to
../shared/data/alfworld) and the alfworld package; they skip with a message otherwise. A game load
costs 1-3 s (a reset of the same game again about 0.1 s), so tests share games where they can.
"""

from __future__ import annotations

import importlib.util
import os

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import vlmrl.tasks  # noqa: F401  (registers the ids)
from vlmrl.errors import UserError
from vlmrl.tasks import get_task
from vlmrl.tasks.alfworld import (
    NOTHING,
    TASK,
    ALFWorldEnv,
    data_root,
    goal_conditions,
    list_games,
    split_intro,
)
from vlmrl.tasks.parsing import parse_action

_DATA = os.environ.get("ALFWORLD_DATA")
needs_data = pytest.mark.skipif(
    not _DATA or not os.path.isdir(os.path.join(_DATA, "json_2.1.1")) or importlib.util.find_spec("alfworld") is None,
    reason="ALFWorld games not available: set ALFWORLD_DATA (e.g. ../shared/data/alfworld) and "
    "pip install 'vlmrl[alfworld]'",
)


# --- pure parts (no game files needed) --------------------------------------------------------------
def test_missing_or_wrong_data_path_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(UserError, match="ALFWORLD_DATA"):
        data_root()
    with pytest.raises(UserError, match="json_2.1.1"):
        data_root(tmp_path)
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    assert data_root(tmp_path) == tmp_path
    with pytest.raises(UserError, match="unknown ALFWorld split"):
        list_games(tmp_path, "test")
    with pytest.raises(UserError, match="no ALFWorld games"):
        list_games(tmp_path, "train")
    with pytest.raises(UserError, match="unknown ALFWorld task types"):
        ALFWorldEnv(data_path=tmp_path, task_types=["pick_three"])


def test_split_intro_separates_room_and_goal():
    room, goal = split_intro(
        "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. You see a desk 1.\n\n"
        "Your task is to: put some mug on desk."
    )
    assert room == "You are in the middle of a room. You see a desk 1."
    assert goal == "put some mug on desk."


def _facts(*items):
    return frozenset((name, tuple(args)) for name, *args in items)


TYPES = [
    ("objecttype", "mug 1", "mugtype"),
    ("objecttype", "mug 2", "mugtype"),
    ("receptacletype", "desk 1", "desktype"),
]


def test_goal_conditions_follow_alfworld_definitions():
    params = {"object_target": "Mug", "parent_target": "Desk", "toggle_target": ""}
    one = _facts(*TYPES, ("inreceptacle", "mug 1", "desk 1"))
    two = one | _facts(("inreceptacle", "mug 2", "desk 1"))
    assert goal_conditions(_facts(*TYPES), "pick_and_place_simple", params) == (0, 1)
    assert goal_conditions(one, "pick_and_place_simple", params) == (1, 1)
    assert goal_conditions(one, "pick_two_obj_and_place", params) == (1, 2)
    assert goal_conditions(two, "pick_two_obj_and_place", params) == (2, 2)
    # heat: in place (1), heated (1), the same object both (1)
    assert goal_conditions(one | _facts(("ishot", "mug 2")), "pick_heat_then_place_in_recep", params) == (2, 3)
    assert goal_conditions(one | _facts(("ishot", "mug 1")), "pick_heat_then_place_in_recep", params) == (3, 3)
    assert goal_conditions(one | _facts(("iscool", "mug 1")), "pick_heat_then_place_in_recep", params) == (1, 3)
    # look at: holding the object (1); a toggled lamp where the agent stands (1)
    light = {"object_target": "Mug", "parent_target": "", "toggle_target": "DeskLamp"}
    room = _facts(
        *TYPES,
        ("objecttype", "desklamp 1", "desklamptype"),
        ("inreceptacle", "desklamp 1", "desk 1"),
        ("receptacleatlocation", "desk 1", "loc 1"),
        ("holds", "agent1", "mug 1"),
        ("istoggled", "desklamp 1"),
    )
    assert goal_conditions(room | _facts(("atlocation", "agent1", "loc 2")), "look_at_obj_in_light", light) == (1, 2)
    assert goal_conditions(room | _facts(("atlocation", "agent1", "loc 1")), "look_at_obj_in_light", light) == (2, 2)


INFO = {
    "goal": "put some mug on desk.",
    "observation": "You arrive at shelf 1. On the shelf 1, you see a mug 1.",
    "admissible_commands": ["examine shelf 1", "go to desk 1", "go to desk 10", "look", "take mug 1 from shelf 1"],
    "expert_action": "take mug 1 from shelf 1",
}


def test_prompt_shows_goal_observation_and_every_command_once():
    task = get_task("alfworld")
    assert task is TASK and task.text_only
    prompt = task.prompt(INFO)
    for text in [INFO["goal"], INFO["observation"], *INFO["admissible_commands"]]:
        assert text in prompt
    assert prompt.count("take mug 1 from shelf 1") == 1
    assert '"action"' in prompt and '"thoughts"' in prompt
    assert '"thoughts"' not in task.prompt(INFO, cot=False)


def test_expert_response_parses_back_to_the_expert_command():
    words = TASK.legal_actions(INFO)
    assert TASK.expert_action(INFO) == 4
    for cot in (True, False):
        parsed = parse_action(TASK.expert_response(INFO, cot=cot), words, np.random.default_rng(0))
        assert parsed.valid and words[parsed.action] == "take mug 1 from shelf 1"
    # "go to desk 1" must not be read inside "go to desk 10" (and vice versa)
    assert parse_action('{"action": "go to desk 10"}', words, np.random.default_rng(0)).action == 2
    with pytest.raises(ValueError, match="replan_expert"):
        TASK.expert_action({**INFO, "expert_action": None})


# --- the real engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    e = gym.make("vlmrl/ALFWorld-v0", split="valid_unseen")
    yield e
    e.close()


def first_game(env, task_type: str) -> int:
    return next(i for i, g in enumerate(env.unwrapped.games) if f"/{task_type}-" in g)


def play_expert(env, game: int):
    """Follow the expert to the end, checking every reward and the parser round trip."""
    rng = np.random.default_rng(0)
    obs, info = env.reset(options={"game": game})
    assert obs == info["observation"] and info["goal"] and info["game"].endswith("game.tw-pddl")
    assert info["goal_condition_success_rate"] < 1 and not info["won"]
    rewards = []
    for _ in range(50):
        words = TASK.legal_actions(info)
        parsed = parse_action(TASK.expert_response(info), words, rng)
        assert parsed.valid and parsed.action == TASK.expert_action(info)
        obs, reward, terminated, truncated, info = env.step(parsed.action)
        assert reward == pytest.approx(50.0 * info["won"] + info["goal_condition_success_rate"])
        rewards.append(reward)
        if terminated or truncated:
            break
    return rewards, terminated, truncated, info


@needs_data
@pytest.mark.parametrize(
    "task_type", ["pick_two_obj_and_place", "look_at_obj_in_light", "pick_heat_then_place_in_recep"]
)
def test_walkthrough_expert_wins_with_the_paper_reward(env, task_type):
    rewards, terminated, truncated, info = play_expert(env, first_game(env, task_type))
    assert terminated and not truncated and info["won"] and info["task_type"] == task_type
    assert info["goal_condition_success_rate"] == 1.0 and rewards[-1] == 51.0
    assert all(r < 50 for r in rewards[:-1]) and info["expert_action"] is None


@needs_data
def test_command_out_of_range_is_invalid_and_changes_nothing(env):
    folder = os.path.dirname(env.unwrapped.games[first_game(env, "pick_and_place_simple")])
    _, info = env.reset(options={"game": folder})  # a game's folder works as well as its index
    assert info["game"] == os.path.join(folder, "game.tw-pddl")
    obs, reward, terminated, truncated, after = env.step(len(info["admissible_commands"]))
    assert obs == NOTHING and after["last_command"] is None
    assert reward == pytest.approx(after["goal_condition_success_rate"] - 1.0)
    assert not terminated and not truncated
    assert after["admissible_commands"] == info["admissible_commands"]
    assert after["expert_action"] == info["expert_action"] and after["steps"] == 1


@needs_data
def test_detours_keep_the_expert_and_state_changes_end_it(env):
    # pick_and_place game 0: go to shelf 2, take mug 1 from shelf 2, go to desk 2, move mug 1 to desk 2
    _, info = env.reset(options={"game": first_game(env, "pick_and_place_simple")})
    _, _, _, _, info = env.step(TASK.expert_action(info))
    take = info["expert_action"]
    assert take.startswith("take ")
    # looking around changes nothing: the expert still takes the object
    _, _, _, _, info = env.step(info["admissible_commands"].index("look"))
    assert info["expert_action"] == take
    # walking elsewhere: the expert first walks back, then takes the object
    away = next(c for c in info["admissible_commands"] if c.startswith("go to ") and c[6:] not in take)
    _, _, _, _, info = env.step(info["admissible_commands"].index(away))
    back = info["expert_action"]
    assert back.startswith("go to ") and back.split("go to ")[1] in take
    _, _, _, _, info = env.step(TASK.expert_action(info))
    assert info["expert_action"] == take
    _, _, _, _, info = env.step(TASK.expert_action(info))
    # putting the object straight back changes the world: no expert any more
    put_back = next(c for c in info["admissible_commands"] if c.startswith("move "))
    _, _, _, _, info = env.step(info["admissible_commands"].index(put_back))
    assert info["expert_action"] is None
    with pytest.raises(ValueError):
        TASK.expert_action(info)


@needs_data
def test_replan_expert_recovers_from_any_deviation():
    env = ALFWorldEnv(split="valid_unseen", task_types="pick_and_place_simple", num_games=1, replan_expert=True)
    _, info = env.reset(seed=0)
    _, _, _, _, info = env.step(TASK.expert_action(info))
    _, _, _, _, info = env.step(TASK.expert_action(info))
    put_back = next(c for c in info["admissible_commands"] if c.startswith("move "))
    _, _, _, _, info = env.step(info["admissible_commands"].index(put_back))
    assert info["expert_action"] is not None  # the planner's new plan (about 4 s)
    for _ in range(10):
        _, reward, terminated, _, info = env.step(TASK.expert_action(info))
        if terminated:
            break
    assert info["won"] and reward == 51.0
    env.close()


@needs_data
def test_truncated_after_max_steps_and_check_env():
    env = gym.make(
        "vlmrl/ALFWorld-v0", split="valid_seen", task_types=["look_at_obj_in_light"], num_games=1, max_steps=3
    )
    check_env(env.unwrapped)
    _, info = env.reset(seed=0)
    look = info["admissible_commands"].index("look")
    for step in range(1, 4):
        _, reward, terminated, truncated, info = env.step(look)
        assert not terminated and truncated == (step == 3)
        assert reward == pytest.approx(info["goal_condition_success_rate"])
    env.close()


@needs_data
def test_same_seed_same_game_and_game_option():
    kwargs = dict(split="valid_unseen", task_types=["pick_cool_then_place_in_recep"])
    a, b = ALFWorldEnv(**kwargs), ALFWorldEnv(**kwargs)
    assert all("/pick_cool_then_place_in_recep-" in g for g in a.games)
    obs_a, info_a = a.reset(seed=7)
    obs_b, info_b = b.reset(seed=7)
    assert (obs_a, info_a) == (obs_b, info_b)
    with pytest.raises(UserError, match="out of range"):
        a.reset(options={"game": len(a.games)})
    with pytest.raises(UserError, match="unknown ALFWorld reset options"):
        a.reset(options={"level": 1})
    a.close()
    b.close()


@needs_data
def test_evaluation_plays_each_game_of_the_split_exactly_once(capsys):
    from vlmrl.cli import main
    from vlmrl.evaluate import ExpertPolicy, evaluate

    started: list[str] = []

    class Recording(ExpertPolicy):
        def act(self, observations, infos):
            started.extend(i["game"] for i in infos if i["steps"] == 0)
            return super().act(observations, infos)

    kwargs = {"split": "valid_unseen", "num_games": 3}
    result = evaluate(TASK, Recording(TASK), None, num_envs=2, env_kwargs=kwargs, progress=False, each_game_once=True)
    assert sorted(started) == ALFWorldEnv(**kwargs).games and result.episodes == 3 and result.success_rate == 1.0
    with pytest.raises(UserError, match="has 3 games"):
        evaluate(TASK, Recording(TASK), 4, env_kwargs=kwargs, progress=False, each_game_once=True)
    with pytest.raises(UserError, match="no fixed list of games"):
        number_line = get_task("NumberLine")
        evaluate(number_line, ExpertPolicy(number_line), 2, progress=False, each_game_once=True)
    # the command line evaluates ALFWorld this way: --episodes 2 means the split's first two games
    assert main(["eval", "ALFWorld", "--split", "valid_unseen", "--episodes", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines() if line.startswith("episodes")] == [["episodes", "2"]]
