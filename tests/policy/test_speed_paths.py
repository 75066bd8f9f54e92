"""The fast paths give the same results as the slow ones: CoT boundary by binary search, cached inputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmrl.policy import logprob as lp
from vlmrl.policy.input_cache import LRU, InputCache, collate
from vlmrl.policy.model import PolicyConfig, VLMPolicy
from vlmrl.policy.tiny import build_tiny_vlm, train_tokenizer

TEXTS = [
    '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}',
    '{"formula": "10÷2*", "thoughts": "I add the next card.", "action": "10"}',
    '{"action": "stand"}',
    "Answer with one JSON object and nothing else.",
]


def _byte_bpe():
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXTS * 4, vocab_size=400), eos_token="<|im_end|>")


def _metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _byte_fallback():
    """SentencePiece-style byte fallback: ``<0xE2> <0x82>`` decodes to 2 replacement chars, then
    ``<0xAC>`` makes it one "€": the decoded prefix length goes DOWN, so binary search alone is unsafe."""
    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in '{}":, abcdefghijklmnopqrstuvwxyz0123456789+-▁':
        vocab.setdefault(ch, len(vocab))
    for piece in ['"action"', '▁"action"', ': "', '"}', "▁go"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte_bpe": _byte_bpe(), "metaspace": _metaspace(), "byte_fallback": _byte_fallback()}


ASCII_IDS = {name: [i for i in range(len(tok)) if tok.decode([i]).isascii()] for name, tok in TOKENIZERS.items()}


def slow_boundary(tok, ids):
    text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return lp.action_boundary(text, lp.prefix_char_ends(tok, ids))


class CountingDecodes:
    """A real tokenizer whose decode calls are counted (everything else passes through)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def decode(self, *args, **kwargs):
        self.calls += 1
        return self.tok.decode(*args, **kwargs)

    def batch_decode(self, seqs, **kwargs):
        self.calls += len(seqs)
        return self.tok.batch_decode(seqs, **kwargs)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fast_boundary_equals_the_slow_one_on_random_responses(name, data):
    tok = TOKENIZERS[name]
    key = tok('"action": "', add_special_tokens=False)["input_ids"]
    # half the time only tokens with ASCII text (the binary-search path), else any id (often the exact path)
    pool = ASCII_IDS[name] if data.draw(st.booleans()) else list(range(len(tok)))
    draw_ids = st.lists(st.sampled_from(pool), max_size=30)
    before, after = data.draw(draw_ids), data.draw(draw_ids)
    # random tokens, often with an action key in the middle (the interesting case), sometimes with the EOS
    ids = before + (key if data.draw(st.booleans()) else []) + after + ([tok.eos_token_id] if data.draw(st.booleans()) else [])
    assert lp.boundary_from_ids(tok, ids) == slow_boundary(tok, ids)


@pytest.mark.parametrize("name", ["byte_bpe", "metaspace"])
def test_fast_boundary_needs_logarithmically_many_decodes(name):
    tok = TOKENIZERS[name]
    text = '{"current": "3", "target": "7", "thoughts": "' + "so I move right. " * 8 + '", "action": "+"}'
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    counting = CountingDecodes(tok)
    fast = lp.boundary_from_ids(counting, ids)
    assert fast == slow_boundary(tok, ids) and 0 < fast < len(ids)
    assert counting.calls <= 2 + math.ceil(math.log2(len(ids)))  # full text + binary search
    assert len(ids) > 40  # the slow path would decode every prefix


def test_byte_fallback_takes_the_exact_path_where_lengths_go_down():
    tok = TOKENIZERS["byte_fallback"]
    vocab = tok.get_vocab()
    ids = [vocab["<0xE2>"], vocab["<0x82>"], vocab["<0xAC>"], vocab['"action"'], vocab[': "'], vocab["+"], vocab['"}']]
    lengths = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    assert lengths[1] > lengths[2]  # the non-monotone case
    # the slow path's running max puts the boundary inside the "€" bytes; the fast path agrees exactly
    assert lp.boundary_from_ids(tok, ids) == slow_boundary(tok, ids) == 1


# --- cached processor inputs ---------------------------------------------------------------------------


def test_lru_is_bounded_by_entries_and_bytes():
    cache = LRU(max_entries=3, max_bytes=100)
    for i in range(5):
        cache.put(i, str(i), 10)
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == "4"
    cache.get(2)  # now most recent: 3 leaves first
    cache.put("big", "x", 80)
    assert cache.bytes <= 100 and cache.get(3) is None and cache.get(2) == "2" and cache.get("big") == "x"
    cache.put("huge", "y", 1000)  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and cache.get("big") == "x"


def test_collate_refuses_tensors_that_do_not_concatenate():
    row = lambda n, tiles: {"input_ids": torch.ones(1, n, dtype=torch.long), "pixel_values": torch.zeros(1, tiles, 3)}
    out = collate([row(2, 4), row(3, 4)], pad_id=7)
    assert out["input_ids"].tolist() == [[7, 1, 1], [1, 1, 1]] and out["pixel_values"].shape == (2, 4, 3)
    assert collate([row(2, 4), row(3, 5)], pad_id=7) is None


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "qwen2_vl", arch="qwen2_vl", texts=TEXTS * 3, seed=0)
    return VLMPolicy.load(str(path), PolicyConfig(device="cpu", finetune="none"))


def _uncached(policy: VLMPolicy) -> InputCache:
    return InputCache(policy.pad_token_id, max_entries=0)


def test_cached_encoding_equals_the_processor_on_the_whole_batch(policy):
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (300, 300, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["Move to the target.", "You are playing NumberLine. Answer with one JSON object.", "+"]
    # repeated rows, a PIL image and an array with the same pixels, prompts of different lengths
    batch_ims = [ims[0], ims[1], ims[0], Image.fromarray(ims[2]), ims[2]]
    batch_prompts = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1]]
    responses = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
    cache, policy.input_cache = policy.input_cache, InputCache(policy.pad_token_id)
    try:
        calls = []
        process = policy._process_prompts
        policy._process_prompts = lambda *a: calls.append(len(a[1])) or process(*a)
        first = policy.encode(batch_ims, batch_prompts, responses)
        assert calls == [1, 1, 1, 1]  # one batch-1 call per distinct (image, prompt)
        again = policy.encode(batch_ims[::-1], batch_prompts[::-1], responses[::-1])
        assert calls == [1, 1, 1, 1]  # all cached
        del policy._process_prompts
        policy.input_cache = _uncached(policy)
        plain = policy.encode(batch_ims, batch_prompts, responses)
        plain_rev = policy.encode(batch_ims[::-1], batch_prompts[::-1], responses[::-1])
    finally:
        policy.__dict__.pop("_process_prompts", None)
        policy.input_cache = cache
    for got, want in ((first, plain), (again, plain_rev)):
        assert set(got.inputs) == set(want.inputs) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
        for key in want.inputs:
            assert got.inputs[key].dtype == want.inputs[key].dtype and torch.equal(got.inputs[key], want.inputs[key]), key
        assert torch.equal(got.response_mask, want.response_mask)


def test_cached_text_only_prompts_equal_the_processor(policy):
    prompts = ["Move to the target.", "+", "Move to the target."]
    cache, policy.input_cache = policy.input_cache, _uncached(policy)
    try:
        plain = policy.encode([None] * 3, prompts, [[5], [6, 7], [8, 9, 10]])
    finally:
        policy.input_cache = cache
    got = policy.encode([None] * 3, prompts, [[5], [6, 7], [8, 9, 10]])
    assert set(got.inputs) == set(plain.inputs) and "pixel_values" not in got.inputs
    assert all(torch.equal(got.inputs[k], plain.inputs[k]) for k in plain.inputs)


def test_generate_and_evaluate_are_unchanged_by_the_caches(policy):
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, (300, 300, 3), dtype=np.uint8) for _ in range(2)] * 2
    prompts = ["Move to the target.", "+", "+", "Move to the target."]
    runs = []
    for cached in (True, False):
        cache, bounds = policy.input_cache, policy.boundary_cache
        if not cached:
            policy.input_cache, policy.boundary_cache = _uncached(policy), LRU(0, 0)
        try:
            gen = policy.generate(ims, prompts, temperature=1.0, max_new_tokens=12, seed=5)
            ids = [gen.response_ids[i, : int(n)].tolist() for i, n in enumerate(gen.lengths)]
            with torch.no_grad():
                ev = policy.score(ims, prompts, ids, temperature=1.0)
            runs.append((gen.texts, gen.logprobs, ev.action_logprob, ev.values, ev.boundaries, policy.values(ims, prompts)))
        finally:
            policy.input_cache, policy.boundary_cache = cache, bounds
    (texts, *tensors), (texts2, *tensors2) = runs
    assert texts == texts2
    assert all(torch.equal(a, b) for a, b in zip(tensors, tensors2))
