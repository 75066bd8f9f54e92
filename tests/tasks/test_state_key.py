"""Task.state_key (GiGPO's anchor states): one state reached two ways gives one key, different states
give different keys, and every key is hashable. Keys are read from info only, like the rest of a Task."""

import gymnasium as gym
import pytest

import vlmrl.tasks  # noqa: F401  (registers the ids)
from vlmrl import Task
from vlmrl.tasks import get_task


def key(task, info):
    k = get_task(task).state_key(info)
    hash(k)  # usable as a dict key
    return k


def word(env, w):
    return list(env.get_wrapper_attr("action_words")).index(w)


def test_the_default_is_no_key_and_the_shipped_tasks_have_one():
    class Mine(Task):
        name = "Mine"

    assert Mine().state_key({"anything": 1}) is None and not Mine().has_state_key
    for name in ("NumberLine", "EZPoints", "Points24", "Blackjack", "ALFWorld", "FrozenLake"):
        assert get_task(name).has_state_key, name


def numberline_at(current, target):
    env = gym.make("vlmrl/NumberLine-v0")
    env.reset(seed=0)
    env.unwrapped.current, env.unwrapped.target = current, target
    return env


def test_numberline_key_is_current_and_target():
    there_and_back = numberline_at(2, 4)
    there_and_back.step(word(there_and_back, "-"))
    *_, info = there_and_back.step(word(there_and_back, "+"))  # 2 -> 1 -> 2, two steps later
    start = numberline_at(2, 4).unwrapped._info()
    assert key("NumberLine", info) == key("NumberLine", start) == (2, 4)
    stepped = numberline_at(2, 4)
    *_, up = stepped.step(word(stepped, "+"))
    assert key("NumberLine", up) == key("NumberLine", numberline_at(3, 4).unwrapped._info())
    assert key("NumberLine", up) != key("NumberLine", start)
    assert key("NumberLine", numberline_at(2, 5).unwrapped._info()) != key("NumberLine", start)


@pytest.mark.parametrize("task, ranks", [("EZPoints", [3, 4]), ("Points24", [8, 8, 3, 3])])
def test_formula_key_is_the_cards_and_the_tokens_so_far(task, ranks):
    def after(*words, deal=ranks):
        env = gym.make(get_task(task).env_id)
        _, info = env.reset(seed=1, options={"ranks": deal})
        for w in words:
            *_, info = env.step(word(env, w))
        return info

    # two different unusable numbers both write a blank: one state, reached two ways
    assert key(task, after("1")) == key(task, after("2"))
    assert key(task, after("1", "+")) == key(task, after("2", "+"))
    assert key(task, after("3")) != key(task, after("1"))
    assert key(task, after("3")) != key(task, after("3", "+"))
    assert key(task, after()) != key(task, after(deal=[5, 7] if task == "EZPoints" else [1, 2, 3, 4]))


def blackjack(player, dealer):
    env = gym.make("vlmrl/Blackjack-v0")
    env.reset(seed=0)
    env.unwrapped.player = [(r, 0) for r in player]
    env.unwrapped.dealer = [(r, 0) for r in dealer]
    return env


def test_blackjack_key_is_total_usable_ace_and_dealer_card():
    hit = blackjack([5, 2], [9, 4])
    hit.unwrapped._draw = lambda: (13, 1)  # the next card is a king
    *_, drawn = hit.step(word(hit, "hit"))  # 5, 2, K: hard 17
    dealt = blackjack([7, 12], [9, 6]).unwrapped._info()  # 7, Q: hard 17 (the hole card is hidden)
    assert key("Blackjack", drawn) == key("Blackjack", dealt) == (17, False, 9)
    assert key("Blackjack", blackjack([1, 6], [9, 4]).unwrapped._info()) != key("Blackjack", dealt)  # soft 17
    assert key("Blackjack", blackjack([7, 12], [10, 4]).unwrapped._info()) != key("Blackjack", dealt)
    assert key("Blackjack", blackjack([8, 12], [9, 4]).unwrapped._info()) != key("Blackjack", dealt)


def test_alfworld_key_is_what_the_agent_is_shown():
    def info(observation, commands, goal="put a mug in the sink", **extra):
        return {"goal": goal, "observation": observation, "admissible_commands": commands, "steps": 0, **extra}

    here = info("You arrive at sink 1.", ["look", "go to desk 1"])
    # the same view after another path (other step count, last command)
    assert key("ALFWorld", here) == key("ALFWorld", info("You arrive at sink 1.", ["look", "go to desk 1"],
                                                         steps=7, last_command="go to sink 1"))
    assert key("ALFWorld", here) != key("ALFWorld", info("You arrive at desk 1.", ["look", "go to desk 1"]))
    # "Nothing happens." in two places is two states
    assert key("ALFWorld", info("Nothing happens.", ["look"])) != key("ALFWorld", info("Nothing happens.", ["open drawer 1"]))
    assert key("ALFWorld", here) != key("ALFWorld", info("You arrive at sink 1.", ["look", "go to desk 1"], goal="x"))


def test_frozenlake_key_is_the_map_and_the_cell():
    lake = ["SFFF", "FHFH", "FFFH", "HFFG"]
    env = gym.make("vlmrl/FrozenLake-v0")

    def walk(*words, desc=lake):
        _, info = env.reset(seed=0, options={"desc": desc})
        for w in words:
            *_, info = env.step(word(env, w))
        return info

    # cell (0, 1) reached directly and by a detour (right, right, left) is one state
    assert key("FrozenLake", walk("right")) == key("FrozenLake", walk("right", "right", "left"))
    assert key("FrozenLake", walk("right")) != key("FrozenLake", walk("down"))
    # the same cell on another map is another state
    other = ["SFFF", "FFFH", "FFFH", "HFFG"]
    assert key("FrozenLake", walk("right")) != key("FrozenLake", walk("right", desc=other))
