"""The tiny VLMs: built offline from configs, saved, loaded back with the Auto classes, run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import vlmrl.policy  # noqa: F401  (registers the processors)
from vlmrl.errors import UserError
from vlmrl.policy.processors import ImageQwen2VLProcessor, register_processors
from vlmrl.policy.tiny import ARCHS, build_tiny_vlm, task_texts, tiny_preset_path, train_tokenizer

# A few episodes are enough text for a tokenizer; keeps each build well under a second.
TEXTS = task_texts(episodes=2, max_steps=3)


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory):
    arch = request.param
    path = build_tiny_vlm(tmp_path_factory.mktemp(arch), arch=arch, texts=TEXTS, seed=0)
    return arch, path


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(n)]


def _chat(processor, prompts: list[str]) -> list[str]:
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
    return [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]


def test_round_trip_forward_and_generate(built):
    arch, path = built
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == arch
    assert hasattr(processor, "image_processor"), "AutoProcessor fell back to the bare tokenizer"
    assert processor.tokenizer.padding_side == "left"

    # Prompts of different lengths: left padding must line them up for generation.
    texts = _chat(processor, ["You are playing NumberLine.", 'Answer {"action": "+"} now, please.'])
    batch = processor(images=_images(2), text=texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.logits.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.isfinite(out.logits).all()

    torch.manual_seed(0)
    gen = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0)
    new = gen[:, batch["input_ids"].shape[1]:]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 6
    assert all(isinstance(t, str) for t in processor.batch_decode(new, skip_special_tokens=True))


def test_image_reaches_the_logits(built):
    """Different images, same text -> different logits: the vision tower is wired in."""
    _, path = built
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    texts = _chat(processor, ["same prompt"] * 2)
    batch = processor(images=_images(2), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1])


def test_same_seed_same_weights(tmp_path):
    a = build_tiny_vlm(tmp_path / "a", texts=TEXTS, seed=3)
    b = build_tiny_vlm(tmp_path / "b", texts=TEXTS, seed=3)
    c = build_tiny_vlm(tmp_path / "c", texts=TEXTS, seed=4)
    wa, wb, wc = (AutoModelForImageTextToText.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()


def test_tokenizer_is_byte_level_and_compact():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXTS, 512))
    for text in ["ünïcödé ÷ × 🂡 \t\n", "never seen: qzx@#$ 12345", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Digits are single tokens, so "10" is read as "1", "0"; repeated JSON glue is merged.
    assert len(tok("10", add_special_tokens=False)["input_ids"]) == 2
    assert len(tok('", "action": "', add_special_tokens=False)["input_ids"]) <= 2
    # A JSON key never shares a token with the text around it: the CoT/action split is a token edge.
    text = '{"current number": "2", "thoughts": "2 is less than 5, so move +.", "action": "+"}'
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [a for a, _ in enc["offset_mapping"]]
    assert text.index('"action"') in starts and text.index('"thoughts"') in starts
    # and a newline is a token of its own, so a response after "assistant\n" starts on a token edge
    assert tok.convert_ids_to_tokens(tok("\n", add_special_tokens=False)["input_ids"]) == ["Ċ"]


def test_processor_registration_is_idempotent(built, tmp_path):
    register_processors()
    register_processors()
    arch, path = built
    if arch == "qwen2_vl":
        assert isinstance(AutoProcessor.from_pretrained(path), ImageQwen2VLProcessor)


def test_bad_settings_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="arch"):
        build_tiny_vlm(tmp_path, arch="gpt5", texts=TEXTS)
    with pytest.raises(UserError, match="hidden_sise"):
        build_tiny_vlm(tmp_path, texts=TEXTS, hidden_sise=32)
    with pytest.raises(UserError, match="patch_size"):
        build_tiny_vlm(tmp_path, texts=TEXTS, image_size=90, patch_size=14)


def test_preset_is_built_once_and_cached(tmp_path):
    first = tiny_preset_path(tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert tiny_preset_path(tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
    assert hasattr(AutoProcessor.from_pretrained(first), "image_processor")
