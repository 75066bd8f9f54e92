"""End to end: the tiny VLM trained with PPO for 2 updates on NumberLine, on the CPU, in seconds."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmrl.config import PolicyConfig, PPOConfig, TrainConfig
from vlmrl.errors import UserError
from vlmrl.metrics import read_metrics
from vlmrl.policy.model import VLMPolicy
from vlmrl.policy.tiny import build_tiny_vlm
from vlmrl.tasks.numberline import NumberLineTask
from vlmrl.trainer import train


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", seed=0))


def small_config(model, out, **kw):
    base = dict(
        task="NumberLine", model=model, num_envs=3, num_steps=2, total_updates=2, seed=5,
        max_new_tokens=12, temperature=1.0, out_dir=str(out), tensorboard=False, log_samples=2,
        ppo=PPOConfig(lr=1e-3, epochs=1, minibatch_size=3, grad_accum_steps=2, max_grad_norm=1.0),
        policy=PolicyConfig(finetune="full", train_vision=True),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_two_updates_change_every_trainable_parameter(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run")
    before = VLMPolicy.load(tiny_model, cfg.policy_config())
    start = {n: p.detach().clone() for n, p in before.named_parameters() if p.requires_grad}
    final = train(cfg, progress=False)
    after = VLMPolicy.load(final)
    trained = dict(after.named_parameters())
    unchanged = [n for n, p in start.items() if torch.equal(p, trained[n].detach())]
    assert len(start) > 10 and unchanged == []

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/value_loss", "losses/policy_loss",
                "losses/entropy", "losses/explained_variance", "charts/invalid_action_rate",
                "charts/env_steps_per_second", "charts/tokens_per_second", "charts/learning_rate"):
        assert key in rows[-1], key
    assert rows[-1]["charts/env_steps"] == 2 * 3 * 2
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 0
    assert len(list((tmp_path / "run" / "samples").glob("update2-*.png"))) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_envs"] == 3


def test_same_seed_same_metrics(tiny_model, tmp_path):
    def run(name):
        train(small_config(tiny_model, tmp_path / name, total_updates=2), progress=False)
        drop = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")
        return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / name / "metrics.jsonl")]

    assert run("a") == run("b")


def test_resume_continues_without_gap_or_duplicate(tiny_model, tmp_path):
    out = tmp_path / "run"
    train(small_config(tiny_model, out, total_updates=1), progress=False)
    train(small_config(tiny_model, out, total_updates=3), resume=True, progress=False)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_refuses_a_checkpoint_of_the_old_layout(tiny_model, tmp_path):
    out = tmp_path / "run"
    train(small_config(tiny_model, out, total_updates=1), progress=False)
    ckpt = out / "checkpoint-1"
    shutil.rmtree(ckpt / "accelerate")  # what an older vlmrl wrote: policy/ and trainer.pt only
    torch.save({}, ckpt / "trainer.pt")
    with pytest.raises(UserError, match="older vlmrl"):
        train(small_config(tiny_model, out, total_updates=2), resume=True, progress=False)


class Stop(Exception):
    """Raised by a callback to end a run the way a crash would: after update N, before its checkpoint."""


def test_a_resumed_run_equals_one_never_stopped(tiny_model, tmp_path):
    # The callback draws from Python's, numpy's and torch's global generators after every update, so
    # their states matter: a resume that did not restore them would draw other numbers.
    def run(out, stop_at=None, resume=False):
        draws = {}

        def callback(r):
            draws[r.update] = (random.random(), float(np.random.rand()), torch.rand(1).item())
            if r.update == stop_at:
                raise Stop

        cfg = small_config(tiny_model, out, total_updates=3)  # 2 minibatches per update, accumulated
        try:
            train(cfg, resume=resume, progress=False, callback=callback)
        except Stop:
            pass
        return draws

    never = run(tmp_path / "never")
    stopped = run(tmp_path / "run", stop_at=2)
    assert stopped == {1: never[1], 2: never[2]}
    ckpt = tmp_path / "run" / "checkpoint-1"
    state = sorted(p.name for p in (ckpt / "accelerate").iterdir())
    # optimizer, RNGs and our own state from accelerate; the weights only once, in policy/
    assert state == ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin", "random_states_0.pkl"]
    assert (ckpt / "policy" / "model.safetensors").is_file()

    resumed = run(tmp_path / "run", resume=True)
    assert resumed == {2: never[2], 3: never[3]}
    drop = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / name / "metrics.jsonl")]
            for name in ("never", "run")]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    mine, theirs = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("run", "never"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_held_out_eval_every_update_and_target_kl(tiny_model, tmp_path):
    # grad_accum_steps=1: the first epoch's second minibatch is scored after a real AdamW step (lr 1e-3),
    # so the epoch's approx_kl (measured: >= 4e-3) is far above target_kl, and the float noise of
    # scoring an unchanged policy (measured: <= 1.2e-11) far below it. eval_every=1 logs held-out success.
    cfg = small_config(tiny_model, tmp_path / "run", eval_every=1, eval_episodes=3)
    cfg.ppo.epochs, cfg.ppo.target_kl, cfg.ppo.grad_accum_steps = 3, 1e-6, 1
    train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["charts/ppo_epochs"] for r in rows] == [1, 1]
    assert all(r["losses/approx_kl"] > cfg.ppo.target_kl for r in rows)  # the stop had a reason
    assert all(0.0 <= r["eval/success_rate"] <= 1.0 for r in rows)
    assert all(r["eval/success_ci95_low"] <= r["eval/success_rate"] <= r["eval/success_ci95_high"] for r in rows)

    # a target the policy never reaches: every epoch runs
    cfg = small_config(tiny_model, tmp_path / "far")
    cfg.ppo.epochs, cfg.ppo.target_kl, cfg.ppo.grad_accum_steps = 3, 1e9, 1
    train(cfg, progress=False)
    assert [r["charts/ppo_epochs"] for r in read_metrics(tmp_path / "far" / "metrics.jsonl")] == [3, 3]


def test_held_out_eval_plays_the_env_options_it_trains_on(tiny_model, tmp_path, monkeypatch):
    # Record the max_position of every env built (training and evaluation), then build it for real.
    built, real_make_env = [], NumberLineTask.make_env

    def make_env(self, **kwargs):
        env = real_make_env(self, **kwargs)
        built.append(env.unwrapped.max_position)
        return env

    monkeypatch.setattr(NumberLineTask, "make_env", make_env)
    cfg = small_config(tiny_model, tmp_path / "run", total_updates=1, env_kwargs={"max_position": 2},
                       eval_every=1, eval_episodes=2)
    train(cfg, progress=False)
    assert len(built) > cfg.num_envs  # the evaluation built envs of its own...
    assert set(built) == {2}  # ...with the run's option, not NumberLine's default of 5
    assert "eval/success_rate" in read_metrics(tmp_path / "run" / "metrics.jsonl")[0]


def test_lora_with_a_kl_penalty_to_the_adapter_free_reference(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run", policy=PolicyConfig(finetune="lora", lora_rank=4))
    cfg.ppo.kl_coef = 0.1
    before = VLMPolicy.load(tiny_model, cfg.policy_config())
    start = {n: p.detach().clone() for n, p in before.named_parameters() if p.requires_grad}
    final = train(cfg, progress=False)
    after = dict(VLMPolicy.load(final).named_parameters())
    assert any("lora_" in n for n in start)
    assert [n for n, p in start.items() if torch.equal(p, after[n].detach())] == []
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # update 1 samples with the adapter still zero (KL 0); update 2 with a trained adapter
    assert rows[0]["losses/kl_ref"] == pytest.approx(0.0, abs=1e-6) and rows[1]["losses/kl_ref"] != 0.0
