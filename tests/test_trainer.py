"""End to end: the tiny VLM trained with PPO for 2 updates on NumberLine, on the CPU, in seconds;
and the update's parts: the advantages of a rollout, the accumulation of minibatches into steps."""

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmrl.algorithms import gae, normalize_advantages
from vlmrl.config import PolicyConfig, PPOConfig, TrainConfig
from vlmrl.errors import UserError
from vlmrl.metrics import read_metrics
from vlmrl.policy.model import VLMPolicy
from vlmrl.rollout import RolloutBuffer
from vlmrl.rollout.collect import Collector
from vlmrl.tasks.numberline import NumberLineTask
from vlmrl.trainer import make_optimizer, ppo_update, rollout_advantages, train

TIMINGS = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")


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
    # the logged names, spelled out: dashboards and plots read them, so they stay exactly these
    assert list(rows[-1]) == [
        "step", "time", "losses/loss", "losses/policy_loss", "losses/value_loss", "losses/entropy",
        "losses/approx_kl", "losses/clipfrac", "losses/kl_ref", "charts/episodes", "charts/success_rate",
        "charts/episodic_return", "charts/episodic_length", "charts/invalid_action_rate",
        "charts/response_length", "charts/env_steps", "charts/env_steps_per_second", "charts/tokens_per_second",
        "charts/update_seconds", "charts/ppo_epochs", "charts/learning_rate", "charts/nan_skipped",
        "losses/explained_variance"]
    assert rows[-1]["charts/env_steps"] == 2 * 3 * 2
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 0
    assert len(list((tmp_path / "run" / "samples").glob("update2-*.png"))) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_envs"] == 3


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(out / "metrics.jsonl")]


def test_same_seed_same_metrics(tiny_model, tmp_path):
    def run(name):
        train(small_config(tiny_model, tmp_path / name, total_updates=2), progress=False)
        return _rows(tmp_path / name)

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


@pytest.mark.parametrize("minibatch_size, history_length", [(3, 0), (2, 0), (3, 2)],
                         ids=["2-minibatches", "3-minibatches", "with-memory"])
def test_a_resumed_run_equals_one_never_stopped(tiny_model, tmp_path, minibatch_size, history_length):
    # The callback draws from Python's, numpy's and torch's global generators after every update, so
    # their states matter: a resume that did not restore them would draw other numbers. With 3
    # minibatches and grad_accum_steps=2 an update ends on half a group, which must step too: a
    # gradient left over would run into the next update, and a checkpoint does not hold it.
    def run(out, stop_at=None, resume=False):
        draws = {}

        def callback(r):
            draws[r.update] = (random.random(), float(np.random.rand()), torch.rand(1).item())
            if r.update == stop_at:
                raise Stop

        # 6 transitions, accumulated over 2 minibatches; with memory the envs' last steps are state too
        cfg = small_config(tiny_model, out, total_updates=3, history_length=history_length)
        cfg.ppo.minibatch_size = minibatch_size
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
    rows = [_rows(tmp_path / name) for name in ("never", "run")]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    mine, theirs = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("run", "never"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # every update stepped once per group of 2 minibatches, the short one included: AdamW's own count
    adam = torch.load(tmp_path / "run" / "checkpoint-3" / "accelerate" / "optimizer.bin", weights_only=True)
    batches = math.ceil(6 / minibatch_size)
    assert {int(state["step"]) for state in adam["state"].values()} == {3 * math.ceil(batches / 2)}


def _rollout(policy, num_envs, ppo, seed=0):
    """One real rollout of ``num_envs`` NumberLine envs x 1 step, with its advantages."""
    collector = Collector(NumberLineTask(), num_envs, seed)
    buffer = RolloutBuffer(1, num_envs)
    try:
        last_value, _ = collector.collect(policy, buffer, temperature=1.0, top_p=1.0, max_new_tokens=8,
                                          generator=torch.Generator().manual_seed(seed))
    finally:
        collector.close()
    buffer.advantages, buffer.returns = rollout_advantages(buffer, last_value, ppo)
    return buffer


def _update(policy, buffer, ppo, updates=1):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=ppo.grad_accum_steps, cpu=True)
    model, optimizer = accelerator.prepare(policy, make_optimizer(policy, ppo))
    shuffling = torch.Generator().manual_seed(1)
    return [ppo_update(model, optimizer, accelerator, buffer, ppo, shuffling, max_nan_skips=1)
            for _ in range(updates)], optimizer


def test_an_update_steps_on_every_group_of_minibatches_the_short_last_one_too(tiny_model):
    # 3 minibatches with grad_accum_steps=2: groups {1, 2} and {3} in every epoch, so 2 steps an epoch
    ppo = PPOConfig(lr=1e-3, epochs=2, minibatch_size=1, grad_accum_steps=2, max_grad_norm=1.0)
    policy = VLMPolicy.load(tiny_model, PolicyConfig(finetune="full", train_vision=True))
    buffer = _rollout(policy, 3, ppo)
    (first, second), optimizer = _update(policy, buffer, ppo, updates=2)
    assert first.optimizer_steps == second.optimizer_steps == 2 * math.ceil(3 / 2)
    assert first.minibatches == 6 and first.epochs == 2 and first.nan_skipped == 0
    assert {int(s["step"]) for s in optimizer.state_dict()["state"].values()} == {8}
    assert all(p.grad is None for p in policy.parameters())  # nothing left over for the next rollout
    assert set(first.losses) == {"loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "kl_ref"}
    assert 0 < first.forward_backward_seconds


def test_a_short_group_is_the_mean_of_its_own_minibatches(tiny_model):
    # One minibatch per epoch, accumulated "over 2": the same step as without accumulation, bit for bit
    # (accelerate halves the loss, the short group doubles it back: both exact in binary floating point).
    weights = []
    for k in (1, 2):
        ppo = PPOConfig(lr=1e-3, epochs=2, minibatch_size=2, grad_accum_steps=k, max_grad_norm=1.0)
        policy = VLMPolicy.load(tiny_model, PolicyConfig(finetune="full", train_vision=True))
        (stats,), _ = _update(policy, _rollout(policy, 2, ppo), ppo)
        assert stats.optimizer_steps == 2
        weights.append({n: p.detach().clone() for n, p in policy.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_the_advantages_of_a_rollout_are_gae_over_its_tensors():
    buf = RolloutBuffer(2, 2)
    common = dict(images=[None, None], prompts=["p", "q"], response_ids=[[1], [2]], response_texts=["a", "b"],
                  logprobs=[0.0, 0.0], valid=[True, True])
    buf.add(**common, values=[1.0, 2.0], rewards=[0.0, 1.0], terminated=[False, False], truncated=[True, False],
            final_values=[7.0, 99.0])
    buf.add(**common, values=[3.0, 4.0], rewards=[1.0, 0.0], terminated=[False, True], truncated=[False, False])
    last = torch.tensor([5.0, 6.0])
    raw = PPOConfig(gamma=0.9, gae_lambda=0.95, normalize_advantages=False)
    advantages, returns = rollout_advantages(buf, last, raw)
    expected = gae(buf.rewards, buf.values, buf.terminated, buf.truncated, last, buf.final_values, gamma=0.9, lam=0.95)
    assert torch.equal(advantages, expected[0]) and torch.equal(returns, expected[1])
    # env 0, cut by a time limit at t=0, bootstraps from V(final) = 7, not from the next episode's 3
    assert advantages[0, 0].item() == pytest.approx(0.9 * 7 - 1)
    # env 1 terminated at t=1: no bootstrap from last_value
    assert advantages[1, 1].item() == pytest.approx(0 - 4)
    normalised, same_returns = rollout_advantages(buf, last, PPOConfig(gamma=0.9, gae_lambda=0.95))
    assert torch.equal(normalised.flatten(), normalize_advantages(advantages.flatten()))  # over the whole rollout
    assert torch.equal(same_returns, returns)  # the value target stays raw


def test_train_takes_a_task_and_a_policy_object(tiny_model, tmp_path):
    # The same run named in its config and given as objects (cfg.model empty, cfg.task overruled),
    # stopped after update 2 and resumed: it equals the named run, and the resume loads the checkpoint.
    def cfg(out, model, updates, **kw):
        c = small_config(model, out, total_updates=updates, **kw)
        c.ppo.lr_schedule_updates = 3
        return c

    named_cfg = cfg(tmp_path / "named", tiny_model, 3)
    named = train(named_cfg, progress=False)
    settings = named_cfg.policy_config()  # the value head is drawn from its seed: the same start
    task, mine = NumberLineTask(), VLMPolicy.load(tiny_model, settings)
    train(cfg(tmp_path / "objects", "", 2, task="Blackjack"), task, mine, progress=False)
    saved = json.loads((tmp_path / "objects" / "config.json").read_text())
    assert saved["task"] == "NumberLine" and saved["model"] == "" and saved["policy"]["finetune"] == "full"
    at_two = dict(VLMPolicy.load(tmp_path / "objects" / "final").named_parameters())
    assert all(torch.equal(p, at_two[n]) for n, p in mine.named_parameters())  # trained in place

    fresh = VLMPolicy.load(tiny_model, settings)  # untrained: a resume must not start from it
    final = train(cfg(tmp_path / "objects", "", 3), task, fresh, resume=True, progress=False)
    assert _rows(tmp_path / "objects") == _rows(tmp_path / "named")
    mine, theirs = (load_file(f / "model.safetensors") for f in (final, named))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(UserError, match="no model to start from"):
        train(cfg(tmp_path / "none", "", 1), progress=False)


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
