"""End to end: the tiny VLM trained with PPO for 2 updates on NumberLine, on the CPU, in seconds."""

import json

import pytest
import torch

from vlmrl.config import PolicyConfig, PPOConfig, TrainConfig
from vlmrl.metrics import read_metrics
from vlmrl.policy.model import VLMPolicy
from vlmrl.policy.tiny import build_tiny_vlm
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


def test_held_out_eval_every_update_and_target_kl(tiny_model, tmp_path):
    # target_kl tiny: each update stops after its first epoch; eval_every=1 logs held-out success.
    cfg = small_config(tiny_model, tmp_path / "run", eval_every=1, eval_episodes=3)
    cfg.ppo.epochs, cfg.ppo.target_kl = 3, 1e-12
    train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(0.0 <= r["eval/success_rate"] <= 1.0 for r in rows)
    assert [r["charts/ppo_epochs"] for r in rows] == [1, 1]
    assert all(r["eval/success_ci95_low"] <= r["eval/success_rate"] <= r["eval/success_ci95_high"] for r in rows)


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
