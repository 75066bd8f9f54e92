"""Memory: the prompt carries the episode's last K steps; K = 0 is the paper's prompt, unchanged."""

import pytest

from vlmrl.errors import UserError
from vlmrl.evaluate import ExpertPolicy, evaluate
from vlmrl.tasks import get_task
from vlmrl.tasks.base import MEMORY_KEY, Memory
from vlmrl.tasks.demos import collect_demonstrations


def test_no_memory_leaves_the_prompt_as_it_was():
    task = get_task("EZPoints")
    env = task.make_env()
    _, info = env.reset(seed=3)
    memory = Memory(task, 0)
    memory.record(info, "+")
    assert memory.view(info) is info and task.prompt(memory.view(info)) == task.prompt(info)


def test_the_last_k_steps_oldest_first_with_the_action_taken():
    task = get_task("EZPoints")
    env = task.make_env()
    _, info = env.reset(seed=3, options={"ranks": [2, 6]})
    memory = Memory(task, 2)
    for word in ("2", "*", "6"):
        memory.record(info, word)
        _, _, _, _, info = env.step(task.legal_actions(info).index(word))
    prompt = task.prompt(memory.view(info))
    # the first step fell out (K = 2); each remembered step shows the info text of its state
    assert "Your last 2 steps, oldest first:\n1. Current formula: 2 -> action: *\n2. Current formula: 2 * -> action: 6" in prompt
    assert prompt.index("Your last 2 steps") < prompt.index("Current formula: 2 * 6")
    memory.clear()
    assert MEMORY_KEY not in task.prompt(memory.view(info)) and "Your last" not in task.prompt(memory.view(info))


def test_an_image_task_without_info_text_remembers_the_actions():
    task = get_task("NumberLine")
    env = task.make_env()
    _, info = env.reset(seed=0)
    memory = Memory(task, 3)
    memory.record(info, "+")
    assert "Your last 1 step, oldest first:\n1. action: +" in task.prompt(memory.view(info))


def test_demonstrations_and_evaluation_carry_the_memory():
    task = get_task("EZPoints")
    demos = collect_demonstrations(task, 2, seed=1, history_length=2)
    firsts = [d for d in demos if "Your last" not in d.prompt]
    assert len(firsts) == 2  # the first step of each episode has nothing to remember
    assert any("Your last 2 steps" in d.prompt for d in demos)
    plain = collect_demonstrations(task, 2, seed=1)
    assert [d.response for d in plain] == [d.response for d in demos]  # the expert does not change

    seen = []

    class Spy(ExpertPolicy):
        def act(self, observations, infos):
            seen.extend(self.task.prompt(i) for i in infos)
            return super().act(observations, infos)

    result = evaluate(task, Spy(task), 3, history_length=1, progress=False)
    assert result.success_rate == 1.0 and any("Your last 1 step" in p for p in seen)


def test_a_negative_history_length_is_an_error():
    with pytest.raises(UserError, match="history_length must be >= 0"):
        Memory(get_task("EZPoints"), -1)
