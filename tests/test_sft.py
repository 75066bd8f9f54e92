"""SFT: demonstrations, response-only labels, the schedule, and a real (tiny) fine-tuning run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmrl.policy  # noqa: F401
from vlmrl.errors import UserError
from vlmrl.sft import (
    IGNORE,
    SFTConfig,
    collate,
    collect_demonstrations,
    encode_all,
    encode_example,
    load_policy,
    run_sft,
    saved_config,
)
from vlmrl.tasks import get_task

TASK = get_task("NumberLine")


@pytest.fixture
def tiny(tiny_numberline):
    return tiny_numberline


def test_demonstrations_are_seeded_and_mix_random_actions():
    a = collect_demonstrations(TASK, 6, random_action_fraction=0.5, seed=1)
    b = collect_demonstrations(TASK, 6, random_action_fraction=0.5, seed=1)
    assert [(d.prompt, d.response) for d in a] == [(d.prompt, d.response) for d in b]
    assert all((x.image == y.image).all() for x, y in zip(a, b))

    expert = collect_demonstrations(TASK, 6, random_action_fraction=0.0, seed=1)
    assert all(d.expert for d in expert)
    mixed = collect_demonstrations(TASK, 30, random_action_fraction=1.0, seed=2)
    assert not all(d.expert for d in mixed) and any(d.expert for d in mixed)
    # a random action's response names that action, not the expert's
    wrong = next(d for d in mixed if not d.expert)
    assert wrong.response.endswith('"}') and "trying" in wrong.response

    with pytest.raises(UserError, match="random_action_fraction"):
        collect_demonstrations(TASK, 1, random_action_fraction=1.5)


def test_labels_cover_exactly_the_response_and_eos(tiny):
    policy = load_policy(tiny)
    processor = policy.processor
    demo = collect_demonstrations(TASK, 1, seed=3)[0]
    ex = encode_example(policy, demo.image, demo.prompt, demo.response)
    labels = ex["labels"][0]
    n = int((labels != IGNORE).sum())
    assert (labels[:-n] == IGNORE).all() and (labels[-n:] == ex["input_ids"][0, -n:]).all()
    tok = processor.tokenizer
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(labels[-n:-1]) == demo.response
    assert (ex["mm_token_type_ids"][0, -n:] == 0).all()
    assert ex["input_ids"].shape == ex["attention_mask"].shape == ex["labels"].shape


def test_collate_left_pads(tiny):
    policy = load_policy(tiny)
    demos = collect_demonstrations(TASK, 2, seed=0, cot=True)[:1] + collect_demonstrations(TASK, 2, seed=0, cot=False)[:1]
    examples = [encode_example(policy, d.image, d.prompt, d.response) for d in demos]
    pad = policy.pad_token_id
    batch = collate(examples, pad)
    short = min(range(2), key=lambda i: examples[i]["input_ids"].shape[1])
    gap = batch["input_ids"].shape[1] - examples[short]["input_ids"].shape[1]
    assert gap > 0
    assert (batch["input_ids"][short, :gap] == pad).all() and (batch["attention_mask"][short, :gap] == 0).all()
    assert (batch["labels"][short, :gap] == IGNORE).all()
    assert batch["pixel_values"].shape[0] == sum(e["pixel_values"].shape[0] for e in examples)


def test_identical_demonstrations_share_one_encoding(tiny):
    policy = load_policy(tiny)
    demos = collect_demonstrations(TASK, 40, seed=0)  # NumberLine has only 30 distinct states
    examples = encode_all(policy, demos)
    assert len(examples) == len(demos)
    assert len({id(e) for e in examples}) < len(demos)
    for d, e in zip(demos[:5], examples[:5]):
        fresh = encode_example(policy, d.image, d.prompt, d.response)
        assert all(torch.equal(fresh[k], e[k]) for k in fresh)


def test_run_sft_trains_checkpoints_and_saves_a_loadable_policy(tiny, tmp_path):
    before = AutoModelForImageTextToText.from_pretrained(tiny).state_dict()
    cfg = SFTConfig(model=str(tiny), out_dir=str(tmp_path / "run"), episodes=4, steps=6, batch_size=4, warmup_steps=2,
                    lr=3e-3, checkpoint_every=3, progress=False, random_action_fraction=0.3, threads=1)
    steps = []
    out = run_sft(cfg, callback=lambda step, policy: steps.append(step))
    assert steps == list(range(1, 7))

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert hasattr(processor, "image_processor")
    after = model.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not trained: {unchanged}"

    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 6 and summary["config"]["random_action_fraction"] == 0.3
    assert saved_config(out) == cfg  # sft_config.json: what --resume continues with
    losses = json.loads((out / "sft_losses.json").read_text())
    assert len(losses) == 6 and summary["final_loss"] == pytest.approx(sum(losses) / 6)
    assert 0.0 < summary["expert_fraction"] <= 1.0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "checkpoint-3" in ckpts and not any(n.startswith(".tmp") for n in ckpts)
    assert (out / "checkpoints" / "checkpoint-3" / "trainer_state.pt").is_file()
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


def test_sft_lowers_the_response_loss(tiny, tmp_path):
    """A few steps on the same demonstrations must reduce their loss (the labels are learnable)."""
    policy = load_policy(tiny)
    demos = collect_demonstrations(TASK, 4, seed=0)
    batch = collate([encode_example(policy, d.image, d.prompt, d.response) for d in demos], policy.pad_token_id)

    def loss_of(path):
        with torch.no_grad():
            return float(AutoModelForImageTextToText.from_pretrained(path)(**batch).loss)

    out = run_sft(SFTConfig(model=str(tiny), out_dir=str(tmp_path / "r"), episodes=4, steps=10, batch_size=8,
                            warmup_steps=1, lr=3e-3, progress=False, threads=1))
    assert loss_of(out) < 0.7 * loss_of(tiny)


def test_lora_sft_saves_merged_plain_weights(tiny, tmp_path):
    before = AutoModelForImageTextToText.from_pretrained(tiny).state_dict()
    out = run_sft(SFTConfig(model=str(tiny), out_dir=str(tmp_path / "l"), episodes=2, steps=3, batch_size=4, warmup_steps=1,
                            lr=1e-2, finetune="lora", train_vision=False, progress=False, threads=1))
    assert not (out / "adapter_config.json").exists()
    after = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_proj" in k for k in changed)
    assert not any("visual" in k for k in changed)  # the vision tower stayed frozen


def test_bad_config_raises_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run_sft(SFTConfig(model=str(tmp_path / "nope"), out_dir=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        run_sft(SFTConfig(model=str(tmp_path / "empty"), out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # a run that cannot start leaves no folder to --resume
    with pytest.raises(UserError, match="batch_size"):
        run_sft(SFTConfig(batch_size=0, out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="finetune"):
        run_sft(SFTConfig(finetune="qlora", model=str(tmp_path / "nope"), out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="seed"):  # would reach the held-out evaluation seeds
        run_sft(SFTConfig(seed=10**4, out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="unknown task"):
        run_sft(SFTConfig(task="Chess", out_dir=str(tmp_path / "o")))
