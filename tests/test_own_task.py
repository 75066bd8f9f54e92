"""Bring your own task: a Task defined outside vlmrl (tests/own_task/) runs through sft, train and eval.

The end-to-end test runs the real `vlmrl` commands in subprocesses, naming the task by import path
(`own_task.grid_task:TASK`, resolved from the working directory); the rest checks each way of naming
a task and each bad-input line.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vlmrl
import vlmrl.tasks
from own_task import grid_task
from vlmrl import Task, get_task, register_task
from vlmrl.config import TrainConfig, load_config
from vlmrl.errors import UserError
from vlmrl.evaluate import ExpertPolicy, RandomPolicy, evaluate
from vlmrl.tasks.base import episode_success, require_expert

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GRID = "own_task.grid_task:TASK"


def _cli(*args, cwd, cache, timeout=300):
    env = dict(os.environ, VLMRL_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "vlmrl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sft_train_eval_of_an_own_task_through_the_real_cli(tmp_path):
    cache, sft, ppo = tmp_path / "cache", tmp_path / "sft", tmp_path / "ppo"
    run = _cli("sft", GRID, "--model", "tiny", "--episodes", "6", "--steps", "6", "--batch-size", "8",
               "--out", str(sft), cwd=TESTS, cache=cache)
    assert run.returncode == 0, run.stderr[-2000:]
    # the tiny model of this task: its own folder, a tokenizer trained on its own text
    (preset,) = [p.name for p in cache.iterdir() if p.name.startswith("tiny")]
    assert preset.startswith("tiny-grid-1-")
    assert (sft / "config.json").is_file() and json.loads((sft / "sft_summary.json").read_text())["steps"] == 6
    assert json.loads((sft / "sft_config.json").read_text())["task"] == GRID  # a resume finds it again

    run = _cli("train", GRID, "--model", str(sft), "--updates", "1", "--num-envs", "2", "--num-steps", "2",
               "--out", str(ppo), "--quiet", "--set", "max_new_tokens=24", "tensorboard=false", "log_samples=0",
               "ppo.epochs=1", "ppo.minibatch_size=2", "ppo.grad_accum_steps=2", cwd=TESTS, cache=cache)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (ppo / "final" / "vlmrl_policy.json").is_file()
    assert json.loads((ppo / "config.json").read_text())["task"] == GRID
    assert get_task(load_config(TrainConfig, str(ppo / "config.json")).task) is grid_task.TASK  # round trip
    assert [json.loads(line)["step"] for line in (ppo / "metrics.jsonl").read_text().splitlines()] == [1]

    for policy in (str(ppo / "final"), "expert"):
        out = tmp_path / f"eval-{Path(policy).name}.json"
        run = _cli("eval", GRID, "--policy", policy, "--episodes", "4", "--num-envs", "4", "--quiet",
                   "--max-new-tokens", "24", "--json", str(out), cwd=TESTS, cache=cache)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["task"] == "Grid" and result["episodes"] == 4
    assert result["success_rate"] == 1.0  # the expert always reaches the goal


def test_an_import_path_names_an_instance_a_subclass_or_a_factory():
    task = get_task(GRID)
    assert task is grid_task.TASK and task.ref == GRID and task.has_expert
    made = get_task("own_task.grid_task:GridTask")  # a Task subclass is a zero-argument factory
    assert isinstance(made, grid_task.GridTask) and made is not grid_task.TASK
    assert made.ref == "own_task.grid_task:GridTask"
    assert get_task(task) is task
    # a built-in reached by its path keeps its name, which every process knows
    assert get_task("vlmrl.tasks.numberline:TASK").ref == "NumberLine" == get_task("vlmrl/NumberLine-v0").ref


def test_an_import_path_resolves_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "beside_me.py").write_text("from own_task.grid_task import GridTask\n\ndef make():\n    return GridTask()\n")
    monkeypatch.chdir(tmp_path)
    # as the `vlmrl` console script starts: the current directory is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != str(tmp_path)])
    try:
        assert get_task("beside_me:make").name == "Grid"
        assert sys.path[0] == str(tmp_path)
    finally:
        sys.modules.pop("beside_me", None)


MODULES = {
    "broken_at_import": "raise RuntimeError('no grid today\\nsecond line')\n",
    "bad_syntax": "def (:\n",
    "grid_objects": textwrap.dedent("""
        from own_task.grid_task import GridEnv, GridTask
        NUMBER = 3
        def needs_size(size):
            return GridTask()
        def raises():
            raise ValueError("cannot build the grid")
        def returns_env():
            return GridEnv()
        class Unregistered(GridTask):
            env_id = "own/NoSuchGrid-v0"
        class NoEnvId(GridTask):
            env_id = ""
        class Nameless(GridTask):
            name = ""
    """),
}


@pytest.fixture
def task_modules(tmp_path, monkeypatch):
    """MODULES written to the current directory, imported afresh, forgotten afterwards."""
    for name, text in MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("path, message", [
    ("no_such_module:TASK", "cannot import module 'no_such_module' in "),
    ("broken_at_import:TASK", "cannot import module 'broken_at_import': RuntimeError: no grid today (`python -c"),
    ("bad_syntax:TASK", "cannot import module 'bad_syntax': SyntaxError: "),
    ("grid_objects:MISSING", "module 'grid_objects' has no attribute 'MISSING' (it has GridTask, Nameless, NoEnvId, Unregistered)"),
    ("grid_objects:NUMBER", "is of type int, not a vlmrl.Task"),
    ("grid_objects:GridEnv", "is the class GridEnv, not a vlmrl.Task subclass (a Gymnasium env"),
    ("grid_objects:needs_size", "needs_size() needs arguments (missing a required argument: 'size')"),
    ("grid_objects:raises", "raises() raised ValueError: cannot build the grid"),
    ("grid_objects:returns_env", "returns_env() returned type GridEnv, not a vlmrl.Task"),
    ("grid_objects:Nameless", "the task has no name"),
    ("grid_objects:", "an import path is module:attr"),
    (":TASK", "an import path is module:attr"),
    ("Chess", "unknown task 'Chess': choose one of NumberLine"),
])
def test_each_bad_task_name_is_one_line(path, message, task_modules):
    with pytest.raises(UserError) as err:
        get_task(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_env_that_cannot_be_made_is_one_line_at_make_env(task_modules):
    cases = [(get_task("grid_objects:Unregistered"), {}, "cannot make env 'own/NoSuchGrid-v0': NameNotFound: "),
             (get_task("grid_objects:NoEnvId"), {}, "has no env_id"),
             (grid_task.TASK, {"size": 5}, "own/Grid-v0 does not take the options {'size': 5}")]
    for task, kwargs, message in cases:
        with pytest.raises(UserError) as err:
            task.make_env(**kwargs)
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["eval", "broken_at_import:TASK"], "vlmrl: error: task 'broken_at_import:TASK': cannot import module 'broken_at_import': RuntimeError: no grid today"),
    (["eval", "own_task.grid_task:NO_EXPERT", "--policy", "expert"], "vlmrl: error: --policy expert needs an expert and task 'GridNoExpert' has none"),
    (["sft", "own_task.grid_task:NO_EXPERT", "--out", "sft"], "vlmrl: error: vlmrl sft needs an expert and task 'GridNoExpert' has none"),
])
def test_the_real_command_exits_2_with_one_line(args, message, tmp_path):
    (tmp_path / "broken_at_import.py").write_text(MODULES["broken_at_import"])
    # the console script, run where the module lies: the current directory resolves the import path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(TESTS)]), VLMRL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([str(Path(sys.executable).parent / "vlmrl"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(message), line
    assert not (tmp_path / "sft").exists() and not (tmp_path / "cache").exists()  # failed before any work


def test_a_task_without_an_expert_has_everything_rl_needs():
    task = grid_task.NO_EXPERT
    assert not task.has_expert and grid_task.TASK.has_expert
    env = task.make_env()
    obs, info = env.reset(seed=0)
    assert obs.shape == (300, 300, 3)
    cot, plain = task.prompt(info, cot=True), task.prompt(info, cot=False)
    assert '"red": "<row,column of the red square>"' in cot and '"thoughts"' in cot  # hints need no expert
    assert '"red"' not in plain and "up | down | left | right" in plain
    assert task.legal_actions(info) == ("up", "down", "left", "right")
    assert json.loads(task.response(info, 2, cot=False)) == {"action": "left"}
    assert not episode_success(info, 0.0) and episode_success(info, 1.0)
    env.close()
    result = evaluate(task, RandomPolicy(task, seed=0), 6, num_envs=3, progress=False)
    assert result.episodes == 6 and result.invalid_action_rate == 0.0
    for call in (lambda: ExpertPolicy(task), lambda: require_expert(task, "vlmrl sft"),
                 lambda: task.expert_action(info), lambda: task.expert_response(info)):
        with pytest.raises(UserError, match="needs an expert and task 'GridNoExpert' has none") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="has state_fields but no read_state"):
        task.response(info, 0, cot=True)


def test_ppo_runs_on_a_task_without_an_expert_from_its_own_tiny_model(tmp_path):
    from vlmrl.config import PPOConfig, TrainConfig
    from vlmrl.policy.tiny import tiny_preset_path
    from vlmrl.trainer import train

    model = tiny_preset_path(tmp_path / "cache", task="own_task.grid_task:NO_EXPERT")
    assert model.name.startswith("tiny-gridnoexpert-1-")
    cfg = TrainConfig(task="own_task.grid_task:NO_EXPERT", model=str(model), num_envs=2, num_steps=2,
                      total_updates=1, max_new_tokens=16, out_dir=str(tmp_path / "run"), tensorboard=False,
                      log_samples=0, ppo=PPOConfig(epochs=1, minibatch_size=2, grad_accum_steps=2))
    final = train(cfg, progress=False)
    assert (final / "vlmrl_policy.json").is_file()  # a policy folder (LoRA adapter + value head)


def test_the_tiny_model_of_an_own_task_has_a_tokenizer_trained_on_its_text(tmp_path):
    from transformers import AutoTokenizer

    from vlmrl.policy.tiny import task_texts, tiny_preset_path

    own = tiny_preset_path(tmp_path, task=grid_task.TASK)
    assert own == tiny_preset_path(tmp_path, task=GRID)  # by object or by path: one cached folder
    cards = tiny_preset_path(tmp_path, task="NumberLine")
    assert cards == tiny_preset_path(tmp_path) and cards.name.startswith("tiny-1-")  # the built-in preset's folder
    _, info = grid_task.TASK.make_env().reset(seed=5)
    answer = grid_task.TASK.expert_response(info)
    lengths = [len(AutoTokenizer.from_pretrained(p)(answer)["input_ids"]) for p in (own, cards)]
    assert lengths[0] < lengths[1] / 2, lengths
    # without an expert: prompts and random legal actions, action-only
    texts = task_texts(episodes=2, max_steps=3, tasks=[grid_task.NO_EXPERT])
    assert any(t.startswith("You are playing GridNoExpert") for t in texts)
    assert {json.loads(t)["action"] for t in texts if t.startswith("{")} <= {"up", "down", "left", "right"}


def test_register_task_then_get_task_by_name(monkeypatch):
    monkeypatch.setattr(vlmrl.tasks, "_REGISTERED", {})
    mine = grid_task.GridTask()
    assert register_task(mine) is mine
    assert get_task("grid") is mine and get_task("vlmrl/Grid-v0") is mine and mine.ref == "Grid"
    other = grid_task.GridTask()
    register_task(other, name="MyGrid")
    assert get_task("mygrid") is other and other.ref == "MyGrid"
    with pytest.raises(UserError, match="choose one of NumberLine, .*, Grid, MyGrid, or give your own"):
        get_task("Chess")
    builtin = get_task("NumberLine")
    assert register_task(builtin) is builtin  # the built-in itself: nothing to add
    for bad, message in [((mine, "NumberLine"), "is the name of the built-in task NumberLine"),
                         ((mine, "a:b"), "without ':'"), ((grid_task.GridTask,), "pass an instance, GridTask()"),
                         (("Grid",), "takes a vlmrl.Task, got type str")]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            register_task(*bad)


def test_the_example_task_runs_from_the_repository_root_and_from_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    task = get_task("examples.my_task:TASK")
    assert isinstance(task, Task) and task.ref == "examples.my_task:TASK" and task.has_expert
    env = task.make_env()
    from gymnasium.utils.env_checker import check_env

    check_env(env.unwrapped)
    returns = []
    for seed in range(5):
        _, info = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, info = env.step(task.expert_action(info))
            total, done = total + reward, terminated or truncated
        returns.append(total)
    assert returns == [3.0] * 5
    # the console script from inside examples/: `my_task:TASK` resolves from the current directory
    out = tmp_path / "eval.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "vlmrl"), "eval", "my_task:TASK", "--policy", "expert",
                           "--episodes", "20", "--quiet", "--json", str(out)], cwd=ROOT / "examples",
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["success_rate"] == 1.0
