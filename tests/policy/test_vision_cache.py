"""The image-feature cache (policy/vision_cache.py) changes no result, and steps aside when it must."""

import numpy as np
import pytest
import torch

from vlmrl.policy.input_cache import image_key
from vlmrl.policy.model import PolicyConfig, VLMPolicy
from vlmrl.tasks import get_task

TEXTS = [
    '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}',
    "You are playing NumberLine. Answer with one JSON object and nothing else.",
]


def _batch(n: int, seed: int = 0):
    task = get_task("NumberLine")
    env = task.make_env()
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    while len(images) < n:
        obs, info = env.reset(seed=int(rng.integers(10**6)))
        images.append(obs)
        prompts.append(task.prompt(info, True))
    return images, prompts


def _features(policy: VLMPolicy, images, prompts, cache: bool):
    """The base model's image features for these rows, through the cache or around it."""
    enc = policy.encode(images, prompts, [[1]] * len(images))
    base = policy.hf_model.model
    fn = base.get_image_features if cache else policy.vision_cache.original
    with torch.no_grad():
        return fn(enc.inputs["pixel_values"], enc.inputs["image_grid_thw"], return_dict=True).pooler_output


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_cached_features_are_the_towers_bit_for_bit(tiny_by_arch, arch):
    policy = VLMPolicy.load(tiny_by_arch(arch), PolicyConfig(train_vision=False))
    assert policy.vision_cache is not None
    images, prompts = _batch(12)
    images[5] = images[2]  # a duplicate within the batch is encoded once
    first = _features(policy, images[:7], prompts[:7], cache=True)
    assert policy.vision_cache.features.misses > 0 and policy.vision_cache.features.hits == 0
    again = _features(policy, images, prompts, cache=True)  # 7 hits (one duplicate), 5 misses
    plain = _features(policy, images, prompts, cache=False)
    assert policy.vision_cache.features.hits >= 6
    assert all(torch.equal(a, b) for a, b in zip(again, plain))
    assert all(torch.equal(a, b) for a, b in zip(first, plain[:7]))
    # a lone miss (beside a hit) is encoded beside a copy of itself: the same bits as in any batch of
    # two or more, where the tower alone on one image rounds differently on the CPU
    fresh, fresh_prompts = _batch(2, seed=9)
    lone = _features(policy, fresh[:1] + images[:1], fresh_prompts[:1] + prompts[:1], cache=True)
    assert torch.equal(lone[0], _features(policy, fresh, fresh_prompts, cache=False)[0])


def test_scores_and_samples_are_unchanged(tiny_by_arch):
    path = tiny_by_arch("qwen2_vl")
    images, prompts = _batch(6, seed=1)
    out = {}
    for cache in (True, False):
        policy = VLMPolicy.load(path, PolicyConfig(train_vision=False))
        if not cache:
            policy.vision_cache.features.max_entries = 0
        gen = policy.generate(images, prompts, temperature=1.0, max_new_tokens=12, seed=3)
        scores = policy.score(images, prompts, gen.response_ids, gen.lengths)
        out[cache] = (gen.response_ids, gen.logprobs, scores.action_logprob, scores.values)
        if cache:  # through the policy, keyed by the raw images' digests (no pixel hashing)
            assert policy.vision_cache.features.hits >= 6
            assert {key[0] for key in policy.vision_cache.features._items} == {"image"}
    for a, b in zip(out[True], out[False]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_a_training_tower_is_never_cached(tiny_by_arch):
    policy = VLMPolicy.load(tiny_by_arch("qwen2_vl"), PolicyConfig(train_vision=True))
    images, prompts = _batch(4, seed=2)
    policy.train()
    for _ in range(2):
        scores = policy.score(images, prompts, [[1, 2]] * 4)
    scores.action_logprob.sum().backward()
    assert policy.vision_cache.features.hits == 0 and len(policy.vision_cache.features) == 0
    visual = policy.hf_model.model.visual
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in visual.parameters())


def test_loading_weights_into_the_tower_empties_it(tiny_by_arch):
    policy = VLMPolicy.load(tiny_by_arch("qwen2_vl"), PolicyConfig(train_vision=False))
    images, prompts = _batch(3, seed=4)
    _features(policy, images, prompts, cache=True)
    assert len(policy.vision_cache.features) == 3
    visual = policy.hf_model.model.visual
    with torch.no_grad():
        state = {k: v + 0.01 for k, v in visual.state_dict().items()}
    visual.load_state_dict(state)
    assert len(policy.vision_cache.features) == 0
    moved = _features(policy, images, prompts, cache=True)
    assert all(torch.equal(a, b) for a, b in zip(moved, _features(policy, images, prompts, cache=False)))


def test_other_architectures_are_left_alone(tiny_by_arch):
    policy = VLMPolicy.load(tiny_by_arch("llava"), PolicyConfig(train_vision=False))
    assert policy.vision_cache is None


def test_a_training_tower_encodes_each_distinct_image_once(tiny_by_arch):
    """A group's rows share one image: the tower runs on the distinct images, with the same scores and
    the same gradients as the tower run on every row."""
    path = tiny_by_arch("qwen2_vl")
    distinct, prompts = _batch(3, seed=5)
    rows = [0, 0, 1, 1, 1, 2, 0, 2]  # eight rows of at most three images (groups of a rollout)
    images = [distinct[i] for i in rows]
    n = len({image_key(im) for im in distinct})
    assert n >= 2
    prompts = [prompts[i] for i in rows]
    responses = [[1, 2, 3]] * len(rows)
    out = {}
    for shared in (True, False):
        policy = VLMPolicy.load(path, PolicyConfig(train_vision=True))
        cache, base = policy.vision_cache, policy.hf_model.model
        seen: list[int] = []

        def counted(pixel_values, image_grid_thw, original=cache.original, seen=seen, **kwargs):
            seen.append(len(image_grid_thw))
            return original(pixel_values, image_grid_thw, **kwargs)

        cache.original = counted
        if not shared:
            base.get_image_features = counted  # no cache in front: the tower on every row
        policy.train()
        scores = policy.score(images, prompts, responses)
        scores.action_logprob.sum().backward()
        grads = [p.grad.clone() for p in base.visual.parameters() if p.grad is not None]
        out[shared] = (scores.action_logprob.detach(), grads, seen)
    assert out[True][2] == [n] and out[False][2] == [8]
    assert len(out[True][1]) == len(out[False][1]) > 0
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(out[True][1], out[False][1]))
    assert any(g.abs().sum() > 0 for g in out[True][1])
