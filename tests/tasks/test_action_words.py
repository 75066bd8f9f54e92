"""Action words have one source, the env: for every registered task and every env option, the words the
task offers are the env's, index for index, and stepping a word's index plays that word."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from gymnasium.envs.registration import register, registry

from vlmrl.errors import UserError
from vlmrl.tasks import CARD_TASKS, Task, get_task, task_names
from vlmrl.tasks.alfworld import SPLITS
from vlmrl.tasks.numberline import NumberLineEnv

# every option of every card env that could change its actions or its text
CASES = [
    ("NumberLine", {}),
    ("NumberLine", {"max_position": 1}),
    ("NumberLine", {"max_position": 9}),
    ("EZPoints", {}),
    ("Points24", {}),
    ("Points24", {"treat_face_cards_as_10": False}),
    ("Points24", {"target_points": 10}),
    ("Points24", {"treat_face_cards_as_10": False, "target_points": 36}),
    ("Blackjack", {}),
]
IDS = [f"{name}-{kw}" for name, kw in CASES]


def test_every_card_task_is_covered():
    assert {name for name, _ in CASES} == set(CARD_TASKS)
    # ALFWorld tested below, ALFWorld-THOR untestable here, FrozenLake in test_frozenlake.py
    assert set(task_names()) - set(CARD_TASKS) == {"ALFWorld", "ALFWorld-THOR", "FrozenLake"}


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_task_offers_exactly_the_envs_words(name, kw):
    task = get_task(name)
    env = task.make_env(**kw)
    words = env.unwrapped.action_words
    assert len(words) == env.action_space.n == len(set(words)) and env.action_space.start == 0
    _, info = env.reset(seed=0)
    for _ in range(3):
        assert tuple(task.legal_actions(info)) == tuple(words) == tuple(info["action_words"])
        assert f"<one of: {' | '.join(words)}>" in task.prompt(info)
        assert json.loads(task.expert_response(info))["action"] in words
        _, _, terminated, truncated, info = env.step(task.expert_action(info))
        if terminated or truncated:
            break
    # a stored transition (here a JSON round trip) gives the same prompt, words and expert
    stored = json.loads(json.dumps(info))
    assert tuple(task.legal_actions(stored)) == tuple(words)
    assert task.prompt(stored) == task.prompt(info)
    assert task.expert_response(stored) == task.expert_response(info)


def _formula_step(task, env, word):
    """Step ``word`` by the task's index from a fresh deal that holds its value; the step's info."""
    n = env.unwrapped.n_cards
    ranks = [int(word)] + [1] * (n - 1) if word.isdigit() else None
    _, info = env.reset(seed=0, options=None if ranks is None else {"ranks": ranks})
    _, reward, terminated, _, after = env.step(task.legal_actions(info).index(word))
    return info, reward, terminated, after


@pytest.mark.parametrize("name, kw", [c for c in CASES if c[0] in ("EZPoints", "Points24")],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] in ("EZPoints", "Points24")])
def test_formula_index_plays_its_word(name, kw):
    task = get_task(name)
    env = task.make_env(**kw)
    _, info = env.reset(seed=0)
    for word in task.legal_actions(info):
        before, reward, terminated, after = _formula_step(task, env, word)
        if word == "=":
            assert terminated
        else:
            assert after["tokens"] == [word] and reward == 0.0 and not terminated, (word, after["tokens"])
        if word.isdigit():
            assert after["remaining"].count(int(word)) == before["remaining"].count(int(word)) - 1


def test_points24_faces_off_offers_11_to_13_and_plus_appends_plus():
    task = get_task("Points24")
    env = task.make_env(treat_face_cards_as_10=False)
    _, info = env.reset(seed=0, options={"ranks": [11, 12, 13, 1]})
    words = task.legal_actions(info)
    assert words[9:13] == ("10", "11", "12", "13") and len(words) == env.action_space.n == 20
    assert info["values"] == [11, 12, 13, 1]
    *_, info = env.step(words.index("11"))
    *_, info = env.step(words.index("+"))
    assert info["formula"] == "11 +"


@pytest.mark.parametrize("kw, faces", [({}, "J, Q and K count as 10"),
                                       ({"treat_face_cards_as_10": False}, "J, Q and K count as 11, 12 and 13")])
def test_points24_text_follows_the_envs_face_values(kw, faces):
    task = get_task("Points24")
    _, info = task.make_env(**kw).reset(seed=0)
    prompt = task.prompt(info)
    assert prompt.count(faces) == 2  # description and the "cards" hint
    other = "11, 12 and 13" if "10" in faces else "count as 10"
    assert other not in prompt


def test_points24_text_and_expert_follow_target_points():
    task = get_task("Points24")
    env = task.make_env(target_points=36)
    _, info = env.reset(seed=0, options={"ranks": [9, 4, 1, 1]})
    assert "equals 36" in task.prompt(info) and "equals 24" not in task.prompt(info)
    assert _expert_return(task, env, info) == 10.0  # 9*4*1*1


def _expert_return(task, env, info):
    ret, done = 0.0, False
    while not done:
        _, r, terminated, truncated, info = env.step(task.expert_action(info))
        ret, done = ret + r, terminated or truncated
    return ret


@pytest.mark.parametrize("ranks", [[11, 13, 1, 1], [12, 12, 1, 13]])
def test_points24_faces_off_expert_wins_deals_that_need_11_to_13(ranks):
    task = get_task("Points24")
    env = task.make_env(treat_face_cards_as_10=False)
    _, info = env.reset(seed=0, options={"ranks": ranks})
    assert info["solvable"] and task.plan(info) is not None
    assert _expert_return(task, env, info) == 10.0  # e.g. (11+13)*1*1, 12*(13-12+1)


@pytest.mark.parametrize("max_position", [1, 5, 9])
def test_numberline_index_plays_its_word(max_position):
    task = get_task("NumberLine")
    env = task.make_env(max_position=max_position)
    for word, step in (("+", 1), ("-", -1)):
        for seed in range(50):  # a start with room to move that way
            _, info = env.reset(seed=seed)
            if 0 <= info["current"] + step <= max_position:
                break
        *_, after = env.step(task.legal_actions(info).index(word))
        assert after["current"] == info["current"] + step


def test_blackjack_index_plays_its_word():
    task = get_task("Blackjack")
    env = task.make_env()
    _, info = env.reset(seed=0)
    _, _, _, _, after = env.step(task.legal_actions(info).index("hit"))
    assert len(after["player_cards"]) == 3
    _, info = env.reset(seed=0)
    _, _, terminated, _, after = env.step(task.legal_actions(info).index("stand"))
    assert terminated and len(after["dealer_cards"]) >= 2  # the dealer's hand is revealed


# --- a mismatch is an error when the env is made ----------------------------------------------------
class _ExtraWordEnv(NumberLineEnv):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.action_words = ("-", "+", "0")  # three words for Discrete(2)


class _DuplicateWordEnv(NumberLineEnv):
    action_words = ("+", "+")  # a parsed "+" could not name one action


for _cls in (_ExtraWordEnv, _DuplicateWordEnv):
    if f"test/{_cls.__name__}-v0" not in registry:
        register(id=f"test/{_cls.__name__}-v0", entry_point=f"{__name__}:{_cls.__name__}")


@pytest.mark.parametrize("env_id, why", [("test/_ExtraWordEnv-v0", "3 action words"),
                                         ("test/_DuplicateWordEnv-v0", "more than once"),
                                         ("CartPole-v1", "no action_words")])
def test_make_env_rejects_words_that_do_not_match_the_action_space(env_id, why):
    task = type("T", (Task,), {"name": "T", "env_id": env_id})()
    with pytest.raises(UserError) as err:
        task.make_env()
    assert why in str(err.value) and "\n" not in str(err.value)


# --- ALFWorld: the admissible commands of each step --------------------------------------------------
_DATA = os.environ.get("ALFWORLD_DATA")


@pytest.mark.skipif(
    not _DATA or not Path(_DATA, "json_2.1.1").is_dir() or importlib.util.find_spec("alfworld") is None,
    reason="ALFWorld games not available: set ALFWORLD_DATA (e.g. ../shared/data/alfworld) and "
    "pip install 'vlmrl[alfworld]'",
)
@pytest.mark.parametrize("split", SPLITS)
def test_alfworld_task_offers_the_admissible_commands(split):
    task = get_task("ALFWorld")
    env = task.make_env(split=split, num_games=1)
    try:
        _, info = env.reset(seed=0)
        words = task.legal_actions(info)
        assert words == tuple(info["admissible_commands"]) and 1 < len(words) <= env.action_space.n
        assert all(w in task.prompt(info) for w in words)
        word = words[len(words) // 2]  # not the first, so a wrong offset would show
        *_, after = env.step(words.index(word))
        assert after["last_command"] == word
    finally:
        env.close()
