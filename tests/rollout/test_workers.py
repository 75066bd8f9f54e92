"""Envs stepped in worker processes (``env_workers``, Gymnasium's AsyncVectorEnv) give what the
serial pool gives, transition for transition; resume across the two; a worker that dies or an env
that raises ends the run with one line and leaves its last checkpoint whole."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch

from vlmrl.checkpoint import latest_checkpoint, list_checkpoints
from vlmrl.cli import main
from vlmrl.config import EvalConfig, PolicyConfig, TrainConfig
from vlmrl.errors import UserError
from vlmrl.evaluate import ExpertPolicy, RandomPolicy, evaluate
from vlmrl.metrics import read_metrics
from vlmrl.policy.model import VLMPolicy
from vlmrl.rollout.buffer import RolloutBuffer
from vlmrl.rollout.collect import Collector
from vlmrl.rollout.pool import EnvWorkerError, WorkerEnvPool, make_env_pool
from vlmrl.tasks import get_task

_DATA = os.environ.get("ALFWORLD_DATA")
needs_alfworld = pytest.mark.skipif(
    not _DATA or not os.path.isdir(os.path.join(_DATA, "json_2.1.1")) or importlib.util.find_spec("alfworld") is None,
    reason="ALFWorld games not available: set ALFWORLD_DATA and pip install 'vlmrl[alfworld]'",
)
BUFFER_FIELDS = ("prompts", "response_texts", "rewards", "terminated", "truncated", "valid", "final_values",
                 "logprobs", "values", "mask", "episode", "step_index", "group", "state")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _evaluations(task_name: str, policy, episodes: int, workers: int, **kw):
    task = get_task(task_name)
    return [evaluate(task, policy(task), episodes, seed=4, num_envs=3, progress=False, env_workers=w, **kw)
            for w in (0, workers)]


@pytest.mark.parametrize("task_name, policy", [("NumberLine", lambda t: RandomPolicy(t, seed=2)),
                                               ("Blackjack", ExpertPolicy)], ids=["NumberLine", "Blackjack"])
def test_an_evaluation_in_workers_equals_the_serial_one(task_name, policy):
    serial, workers = _evaluations(task_name, policy, 20, workers=2)
    assert serial.episodes == 20 and serial.to_json() == workers.to_json()
    assert serial.samples == workers.samples


@pytest.mark.slow  # about 20 s on a busy 2-core machine: importing alfworld and loading games
@needs_alfworld
def test_alfworld_in_two_workers_equals_serial():
    kw = {"env_kwargs": {"split": "valid_seen", "num_games": 2, "max_steps": 3}, "each_game_once": True}
    serial, workers = _evaluations("ALFWorld", lambda t: RandomPolicy(t, seed=0), None, workers=2, **kw)
    assert serial.episodes == 2 and serial.to_json() == workers.to_json()
    assert serial.samples == workers.samples and serial.by_group


def _collect(collector: Collector, policy, steps: int, seed: int, group_update: int | None = None):
    buffer = RolloutBuffer(steps, collector.num_envs)
    kw = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10, "generator": torch.Generator().manual_seed(seed)}
    if group_update is None:
        last, _ = collector.collect(policy, buffer, **kw)
    else:
        collector.collect_groups(policy, buffer, update=group_update, **kw)
        last = None
    got = {f: getattr(buffer, f) for f in BUFFER_FIELDS}
    return got, last, collector.pop_finished(), [dict(i) for i in collector.infos]


@pytest.fixture(scope="module")
def policy(tiny_model):
    return VLMPolicy.load(tiny_model, PolicyConfig(device="cpu", finetune="none"))


@pytest.mark.parametrize("group_size", [None, 2], ids=["ppo", "groups"])
def test_a_rollout_in_workers_equals_the_serial_one(policy, group_size):
    # 3 envs in 2 workers (shares of 2 and 1); 6 steps of NumberLine end and reset episodes on the way
    task, n = ("NumberLine", 3) if group_size is None else ("Blackjack", 4)
    runs = []
    for workers in (0, 2):
        c = Collector(get_task(task), n, seed=3, group_size=group_size, env_workers=workers)
        try:
            runs.append(_collect(c, policy, 6, seed=3, group_update=None if group_size is None else 1))
        finally:
            c.close()
    (a, last_a, done_a, infos_a), (b, last_b, done_b, infos_b) = runs
    assert all(_same(a[f], b[f]) for f in BUFFER_FIELDS), [f for f in BUFFER_FIELDS if not _same(a[f], b[f])]
    assert done_a == done_b and done_a.returns and infos_a == infos_b
    assert last_a is None and last_b is None or torch.equal(last_a, last_b)


def test_exact_resume_across_serial_and_worker_pools(policy):
    """state() of a serial Collector loads into one with workers (and back): the same next rollout."""
    task = get_task("NumberLine")
    first = Collector(task, 3, seed=8)
    _collect(first, policy, 3, seed=1)
    blob = first.state()
    assert blob is not None
    expected = _collect(first, policy, 4, seed=2)
    first.close()
    for workers in (2, 0):
        c = Collector(task, 3, seed=999, env_workers=workers)  # other seed: only the state can make it agree
        try:
            c.load_state(blob, seed=999, rank=0, update=1)
            if workers:  # what a worker pool gives back is what the serial pool loads next
                blob = c.state()
            got = _collect(c, policy, 4, seed=2)
        finally:
            c.close()
        assert all(_same(got[0][f], expected[0][f]) for f in BUFFER_FIELDS)
        assert torch.equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_an_env_that_raises_in_a_worker_is_one_line_naming_it(monkeypatch):
    # defined here, so that cloudpickle sends the class itself: by reference, each worker would
    # import this test module, torch and all
    class _Breaks(gym.Env):
        """Plays 3 fine steps, then raises: a bug in someone's env."""

        observation_space = gym.spaces.Box(0, 255, (4, 4, 3), dtype=np.uint8)
        action_space = gym.spaces.Discrete(2)
        info: ClassVar[dict] = {"current": 0, "target": 5, "action_words": ("-", "+")}

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.zeros((4, 4, 3), np.uint8), dict(self.info)

        def step(self, action):
            self.t += 1
            if self.t > 3:
                raise ValueError("the engine lost its state")
            return np.zeros((4, 4, 3), np.uint8), 0.0, False, False, dict(self.info)

    task = get_task("NumberLine")
    monkeypatch.setattr(task, "make_env", lambda **kw: _Breaks())
    with pytest.raises(EnvWorkerError) as err:
        evaluate(task, RandomPolicy(task), 4, num_envs=2, progress=False, env_workers=2)
    message = str(err.value)
    assert "\n" not in message and message.startswith("NumberLine env 0 raised ValueError: the engine lost its state")
    assert "env_workers=0" in message and "--resume" in message
    with pytest.raises(ValueError, match="lost its state"):  # serial: the env's own exception, as before
        evaluate(task, RandomPolicy(task), 4, num_envs=2, progress=False)


def test_a_killed_worker_is_one_line_and_its_siblings_are_ended():
    pool = make_env_pool(get_task("NumberLine"), 4, workers=2)
    assert isinstance(pool, WorkerEnvPool)
    pool.reset({i: (i, None) for i in range(4)})
    victim, sibling = pool.vec.processes
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    with pytest.raises(EnvWorkerError, match=r"worker process 0 \(pid \d+, envs 0-1\) was killed by SIGKILL") as err:
        pool.step({i: 1 for i in range(4)})
    assert "\n" not in str(err.value)
    assert not sibling.is_alive()  # nothing left running behind the error
    pool.close()  # and closing afterwards is harmless


def test_a_worker_that_hangs_is_one_line_within_the_timeout_and_every_worker_is_ended():
    pool = make_env_pool(get_task("NumberLine"), 4, workers=2, timeout=1.5)
    pool.reset({i: (i, None) for i in range(4)})
    sibling, stuck = pool.vec.processes
    os.kill(stuck.pid, signal.SIGSTOP)  # alive, but it answers nothing: an env caught in a deadlock
    t0 = time.perf_counter()
    with pytest.raises(EnvWorkerError, match=r"worker process 1 \(pid \d+, envs 2-3\) did not answer a step within "
                                             r"1.5 s") as err:
        pool.step({i: 1 for i in range(4)})
    assert time.perf_counter() - t0 < 10
    message = str(err.value)
    assert "\n" not in message and "env_timeout_s" in message and "--resume" in message
    stuck.join(5), sibling.join(5)
    assert not stuck.is_alive() and not sibling.is_alive()  # nothing left running, or stopped, behind it
    pool.close()


def test_an_env_timeout_without_workers_or_below_zero_is_one_line():
    task = get_task("NumberLine")
    with pytest.raises(UserError, match="env_timeout_s .* would be ignored with env_workers 0"):
        make_env_pool(task, 2, workers=0, timeout=30)
    with pytest.raises(UserError, match="env_timeout_s must be > 0"):
        make_env_pool(task, 2, workers=1, timeout=0)
    with pytest.raises(UserError, match="env_timeout_s .* would be ignored with env_workers 0"):
        TrainConfig(env_timeout_s=30)
    with pytest.raises(UserError, match="env_timeout_s must be > 0"):
        EvalConfig(env_workers=2, env_timeout_s=-1)
    assert EvalConfig(env_workers=2, env_timeout_s=30).env_timeout_s == 30


def test_a_training_run_with_env_workers_logs_what_the_serial_one_logs(tiny_model, tmp_path):
    from vlmrl.config import PPOConfig, TrainConfig
    from vlmrl.trainer import train

    timings = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")
    rows = []
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        train(TrainConfig(task="NumberLine", model=tiny_model, num_envs=3, num_steps=2, total_updates=2, seed=5,
                          env_workers=workers, max_new_tokens=8, temperature=1.0, out_dir=str(out),
                          tensorboard=False, log_samples=0, ppo=PPOConfig(epochs=1, minibatch_size=3)),
              progress=False)
        rows.append([{k: v for k, v in r.items() if k not in timings} for r in read_metrics(out / "metrics.jsonl")])
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_the_env_benchmark_runs_and_every_configuration_plays_the_same(capsys):
    script_path = Path(__file__).resolve().parents[2] / "benchmarks" / "envs.py"
    spec = importlib.util.spec_from_file_location("benchmarks_envs", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--task", "NumberLine", "--num-envs", "3", "--workers", "0", "2", "--steps", "16"])
    printed = capsys.readouterr().out
    assert [r["workers"] for r in rows] == [0, 2] and rows[0]["check"] == rows[1]["check"]
    assert rows[0]["episodes"] > 0 and all(r["env_steps"] == 48 and r["steps_per_second"] > 0 for r in rows)
    for text in ("machine:", "load average", "| serial |", "| 2 |", "same transitions in every configuration"):
        assert text in printed, text


# --- a real `vlmrl train` whose worker is killed --------------------------------------------------------

RUN = {
    "task": "NumberLine", "num_envs": 2, "num_steps": 2, "total_updates": 40, "seed": 11, "env_workers": 2,
    "checkpoint_every": 1, "max_new_tokens": 8, "temperature": 1.0, "tensorboard": False, "log_samples": 0,
    "ppo": {"lr": 1e-3, "epochs": 1, "minibatch_size": 2, "grad_accum_steps": 1},
    "policy": {"finetune": "full", "train_vision": True},
}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = [int(c) for c in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


def _env_workers(pid: int) -> list[int]:
    """The run's env workers: children of the fork server it started (multiprocessing.forkserver)."""
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"forkserver" in cmdline:
            return [int(c) for t in Path(f"/proc/{child}/task").glob("*") for c in (t / "children").read_text().split()]
    return []


@pytest.mark.slow  # a real `vlmrl train` process: torch, the model, two updates
def test_killing_a_worker_of_a_real_train_stops_it_with_one_line_and_a_resumable_checkpoint(tiny_model, tmp_path):
    out, cfg = tmp_path / "run", tmp_path / "run.json"
    cfg.write_text(json.dumps(RUN))
    cli = [sys.executable, "-m", "vlmrl.cli", "train"]
    proc = subprocess.Popen(cli + ["NumberLine", "--model", tiny_model, "--config", str(cfg), "--out", str(out),
                                   "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(out, clean=False) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _env_workers(proc.pid)
        assert proc.poll() is None and len(workers) == 2, "the run ended, or its env workers were not found"
        victim = workers[1]
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlmrl: error: NumberLine env worker process "), stderr
    assert f"(pid {victim}, envs " in lines[0] and "was killed by SIGKILL" in lines[0] and "--resume" in lines[0]

    # every checkpoint on disk is complete, and the newest one resumes: a short run to the next update
    named = sorted(p.name for p in out.glob("checkpoint-*"))
    assert named and named == sorted(p.name for _, p in list_checkpoints(out))
    step = int(latest_checkpoint(out, clean=False).name.split("-")[1])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][:step] == list(range(1, step + 1))
    assert main(["train", "--out", str(out), "--resume", "--updates", str(step + 1), "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, step + 2))
    assert (out / "final" / "model.safetensors").is_file()
