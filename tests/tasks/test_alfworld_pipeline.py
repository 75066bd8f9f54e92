"""ALFWorld end to end on a tiny text model: walkthrough demonstrations -> SFT -> evaluation per task type.

Needs the alfworld package and the game files (ALFWORLD_DATA); skipped with a message otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("alfworld", reason="ALFWorld pipeline: pip install 'vlmrl[alfworld]'")
if not os.environ.get("ALFWORLD_DATA") or not Path(os.environ["ALFWORLD_DATA"], "json_2.1.1").is_dir():
    pytest.skip("ALFWorld pipeline: set ALFWORLD_DATA to the folder holding json_2.1.1/", allow_module_level=True)

from vlmrl.errors import UserError  # noqa: E402
from vlmrl.evaluate import ModelPolicy, evaluate  # noqa: E402
from vlmrl.policy.tiny import build_tiny_vlm  # noqa: E402
from vlmrl.sft import SFTConfig, cached_demonstrations, encode_example, load_policy, run_sft  # noqa: E402
from vlmrl.tasks import get_task  # noqa: E402
from vlmrl.tasks.alfworld import TASK_TYPES  # noqa: E402

TASK = get_task("ALFWorld")
TRAIN = {"split": "train"}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first = cached_demonstrations(TASK, 2, 0.0, True, 0, TRAIN, cache_dir=cache)
    again = cached_demonstrations(TASK, 2, 0.0, True, 0, TRAIN, cache_dir=cache)  # read back from disk
    assert [(d.prompt, d.response, d.expert) for d in first] == [(d.prompt, d.response, d.expert) for d in again]
    assert len(list((cache / "demos").glob("*.jsonl"))) == 1
    return first


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demos):
    texts = [t for d in demos for t in (d.prompt, d.response)]
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny"), texts=texts, vocab_size=600, hidden_size=32,
                          num_layers=1, intermediate_size=64, vision_hidden_size=16, vision_layers=1,
                          vision_heads=2, max_position_embeddings=4096)


def test_walkthrough_demonstrations_are_text_only_and_win(demos):
    assert demos and all(d.image is None and d.expert for d in demos)
    # every answer is valid JSON naming one of the admissible commands its prompt lists
    actions = [json.loads(d.response)["action"] for d in demos]
    assert all(f"\n{cmd}\n" in d.prompt for cmd, d in zip(actions, demos))
    assert "Admissible commands:" in demos[0].prompt and '"thoughts"' in demos[0].response


def test_text_only_prompt_has_no_image_inputs(tiny, demos):
    policy = load_policy(tiny)
    ex = encode_example(policy, None, demos[0].prompt, demos[0].response)
    assert "pixel_values" not in ex and "image_grid_thw" not in ex
    image_id = policy.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (ex["input_ids"] == image_id).any()
    with pytest.raises(UserError, match="all images or all text-only"):
        policy.encode([None, np.zeros((28, 28, 3), np.uint8)], ["a", "b"])


def test_sft_then_evaluation_per_task_type(tiny, demos, tmp_path):
    cfg = SFTConfig(task="ALFWorld", model=str(tiny), out_dir=str(tmp_path / "sft"), steps=4, batch_size=4,
                    warmup_steps=1, train_vision=False, progress=False)
    out = run_sft(cfg, demos=demos)
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["demonstrations"] == len(demos) and np.isfinite(summary["final_loss"])

    policy = ModelPolicy.load(str(out), TASK, temperature=0.2, seed=0, max_new_tokens=12)
    env_kwargs = {"split": "valid_unseen", "num_games": 2, "max_steps": 3}
    result = evaluate(TASK, policy, 2, num_envs=2, env_kwargs=env_kwargs, progress=False)
    assert result.episodes == 2 and 0.0 <= result.success_rate <= 1.0
    assert set(result.by_group) <= set(TASK_TYPES) and sum(g["episodes"] for g in result.by_group.values()) == 2
    table = result.table()
    assert any(t in table for t in result.by_group)
