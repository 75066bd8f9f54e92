"""VLMPolicy on real tiny Hugging Face VLMs (Qwen2-VL, Qwen2.5-VL, LLaVA, LLaVA-NeXT) built offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlmrl.errors import UserError
from vlmrl.policy.model import PolicyConfig, VLMPolicy

TEXTS = [
    '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}',
    '{"cards": [1, 2, 10, 13], "thoughts": "I add the next card.", "action": "10"}',
    '{"action": "stand"}',
    "You are playing NumberLine. Answer with one JSON object and nothing else, in this format:",
]
PROMPTS = ["Move to the target.", "You are playing NumberLine. Answer with one JSON object.", "+"]


@pytest.fixture(scope="module")
def tiny(tiny_by_arch):
    """arch -> folder of a tiny VLM whose tokenizer knows this module's TEXTS (conftest.py)."""
    return tiny_by_arch


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(n)]


def load(path: str, **kw) -> VLMPolicy:
    policy = VLMPolicy.load(path, PolicyConfig(device="cpu", **kw))
    if policy.config.finetune == "lora":  # LoRA B starts at 0 (a no-op): make the adapters matter
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return policy


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("finetune", ["lora", "none"])
def test_evaluate_recomputes_the_sampled_logprobs(tiny, arch, finetune):
    policy = load(tiny(arch), finetune=finetune)
    ims = images(3)
    gen = policy.generate(ims, PROMPTS, temperature=0.8, max_new_tokens=16, seed=3)
    assert gen.response_ids.shape[0] == 3 and len(gen.texts) == 3
    assert (gen.lengths >= 1).all() and (gen.lengths <= 16).all()
    with torch.no_grad():
        ev = policy.score(ims, PROMPTS, gen.response_ids, gen.lengths, temperature=0.8)
    width = gen.logprobs.shape[1]
    assert (ev.token_logprobs[:, :width] - gen.logprobs).abs().max().item() < 1e-4
    assert (ev.values - gen.values).abs().max().item() < 1e-4
    # action log-prob = lambda * CoT + action part, from the sampled log-probs and the text boundary
    t = torch.arange(width)[None]
    w = torch.where(t < ev.boundaries[:, None], 0.5, 1.0) * (t < gen.lengths[:, None])
    assert torch.allclose(ev.action_logprob, (gen.logprobs * w).sum(1), atol=1e-4)
    assert ((ev.entropy > 0) & (ev.entropy <= np.log(policy.hf_model.config.get_text_config().vocab_size) + 1e-4)).all()


def test_inverse_cdf_sampling_draws_the_same_distribution():
    from vlmrl.policy.model import inverse_cdf_sample

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]).repeat(20_000, 1)
    tokens = inverse_cdf_sample(probs, torch.Generator().manual_seed(0)).view(20_000, 2)
    freq = torch.bincount(tokens[:, 0], minlength=5).double() / 20_000
    assert (freq - torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64)).abs().max() < 0.015  # ~4 sigma
    assert freq[1] == 0 and freq[4] == 0 and (tokens[:, 1] == 3).all()  # no mass: never drawn
    # a draw that rounds up to the row's total still lands on the last id with mass
    assert inverse_cdf_sample(torch.tensor([[0.0, 1.0, 0.0]]), torch.Generator().manual_seed(1)).tolist() == [1]


def test_the_cdf_sampler_is_seeded_and_scored_like_multinomial(tiny):
    policy = load(tiny("qwen2_vl"), finetune="none", sampler="cdf")
    ims = images(3)
    gen = policy.generate(ims, PROMPTS, temperature=0.8, max_new_tokens=16, seed=3)
    again = policy.generate(ims, PROMPTS, temperature=0.8, max_new_tokens=16, seed=3)
    assert gen.texts == again.texts and torch.equal(gen.logprobs, again.logprobs)
    with torch.no_grad():
        ev = policy.score(ims, PROMPTS, gen.response_ids, gen.lengths, temperature=0.8)
    assert (ev.token_logprobs[:, : gen.logprobs.shape[1]] - gen.logprobs).abs().max().item() < 1e-4
    with pytest.raises(UserError, match="sampler 'gumbel' is not supported"):
        PolicyConfig(sampler="gumbel")


def test_a_reading_weight_reweighs_only_the_state_fields(tiny):
    # the same responses scored with the reading at weight 0 lose exactly their state fields' terms,
    # and the rollout's action log-prob (from the sampled log-probs) agrees with the scored one
    policy = load(tiny("qwen2_vl"), finetune="none", reading_weight=0.0)
    response = TEXTS[0]
    ids = policy.tokenizer(response, add_special_tokens=False)["input_ids"]
    ims = images(1)
    with torch.no_grad():
        ev = policy.score(ims, PROMPTS[:1], [ids], temperature=1.0)
    from vlmrl.policy import logprob as lp

    r, b = lp.reading_from_ids(policy.tokenizer, ids), lp.boundary_from_ids(policy.tokenizer, ids)
    assert 0 < r < b < len(ids)
    logp = ev.token_logprobs[0, : len(ids)]
    assert torch.allclose(ev.action_logprob[0], 0.5 * logp[r:b].sum() + logp[b:].sum(), atol=1e-5)
    assert torch.allclose(policy.action_logprob([ids], ev.token_logprobs), ev.action_logprob, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava_next"])
def test_other_architectures_load_and_generate(tiny, arch):
    policy = load(tiny(arch))
    ims = images(2)
    gen = policy.generate(ims, PROMPTS[:2], max_new_tokens=8, seed=0)
    assert [len(t) for t in gen.texts] and gen.response_ids.shape == (2, gen.logprobs.shape[1])
    with torch.no_grad():
        ev = policy.score(ims, PROMPTS[:2], gen.response_ids, gen.lengths)
    assert (ev.token_logprobs[:, : gen.logprobs.shape[1]] - gen.logprobs).abs().max().item() < 1e-4


def test_seeded_generate_is_reproducible(tiny):
    policy = load(tiny("qwen2_vl"))
    ims = images(3)
    a = policy.generate(ims, PROMPTS, max_new_tokens=8, seed=7)
    b = policy.generate(ims, PROMPTS, max_new_tokens=8, seed=torch.Generator().manual_seed(7))
    c = policy.generate(ims, PROMPTS, max_new_tokens=8, seed=8)
    assert a.texts == b.texts and torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    # greedy ignores the seed and picks the most likely token (top_p cuts only change sample_logprobs)
    g1 = policy.generate(ims, PROMPTS, temperature=0.0, max_new_tokens=4, seed=1)
    g2 = policy.generate(ims, PROMPTS, temperature=0.0, max_new_tokens=4, seed=2)
    assert torch.equal(g1.response_ids, g2.response_ids)
    nucleus = policy.generate(ims, PROMPTS, top_p=0.3, max_new_tokens=4, seed=1)
    assert (nucleus.sample_logprobs >= nucleus.logprobs - 1e-6).all()


def test_encode_left_pads_and_masks_the_response(tiny):
    policy = load(tiny("qwen2_vl"), finetune="none")
    enc = policy.encode(images(2), PROMPTS[:2], ['{"action": "+"}', '{"thoughts": "go", "action": "-"}'])
    ids, attn, mask = enc.inputs["input_ids"], enc.inputs["attention_mask"], enc.response_mask
    assert (attn[:, -1] == 1).all() and (attn[:, 0] == 0).any()  # left padding
    n = enc.response_lengths
    for i in range(2):
        resp = ids[i, mask[i]].tolist()
        assert resp[-1] == policy.stop_token_ids[0] and len(resp) == n[i]
        assert mask[i, -n[i] :].all() and not mask[i, : -n[i]].any()
        assert policy.tokenizer.decode(resp, skip_special_tokens=True).endswith('"}')
    assert (enc.inputs["mm_token_type_ids"][mask] == 0).all()  # the response is text for M-RoPE


def test_lora_targets_only_the_language_model_by_default(tiny):
    for arch, vision in (("qwen2_vl", "visual"), ("llava", "vision_tower")):
        policy = VLMPolicy.load(tiny(arch), PolicyConfig(device="cpu"))
        trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
        with_vision = VLMPolicy.load(tiny(arch), PolicyConfig(device="cpu", train_vision=True))
        names = [n for n, p in with_vision.model.named_parameters() if p.requires_grad]
        assert any(f".{vision}." in n for n in names) and all("lora_" in n for n in names)
        full = VLMPolicy.load(tiny(arch), PolicyConfig(device="cpu", finetune="full"))
        frozen = [n for n, p in full.model.named_parameters() if not p.requires_grad]
        assert frozen and all(f".{vision}." in n for n in frozen)


def test_gradients_reach_adapters_and_value_head(tiny):
    policy = load(tiny("llava"), gradient_checkpointing=True)
    policy.train()
    hf = policy.hf_model
    assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing
    ev = policy(images(2), PROMPTS[:2], ['{"action": "+"}', '{"thoughts": "x", "action": "-"}'])
    (ev.action_logprob.sum() + ev.values.sum()).backward()
    lora = [p for n, p in policy.model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.value_head.parameters())


def test_save_and_load_round_trip(tiny, tmp_path):
    policy = load(tiny("qwen2_vl"))
    with torch.no_grad():
        for p in policy.value_head.parameters():
            p.add_(0.3)
    ims, responses = images(2), ['{"action": "+"}', '{"thoughts": "far", "action": "-"}']
    with torch.no_grad():
        before = policy.score(ims, PROMPTS[:2], responses)
    out = policy.save(tmp_path / "saved")
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # LoRA saves only the adapter
    assert json.loads((out / "vlmrl_policy.json").read_text())["finetune"] == "lora"
    again = VLMPolicy.load(out)  # the same call as for a fresh model folder
    with torch.no_grad():
        after = again.score(ims, PROMPTS[:2], responses)
    assert torch.allclose(before.values, after.values, atol=1e-6)
    assert torch.allclose(before.token_logprobs, after.token_logprobs, atol=1e-5)
    assert any(p.requires_grad for n, p in again.model.named_parameters() if "lora_" in n)


def test_reference_switches_the_adapter_off(tiny):
    path = tiny("llava")
    policy, base = load(path), load(path, finetune="none")
    ims, responses = images(2), ['{"action": "+"}', '{"action": "-"}']
    with torch.no_grad():
        tuned = policy.score(ims, PROMPTS[:2], responses).token_logprobs
        with policy.reference() as ref:
            reference = ref.score(ims, PROMPTS[:2], responses).token_logprobs
        plain = base.score(ims, PROMPTS[:2], responses).token_logprobs
    assert torch.allclose(reference, plain, atol=1e-5)
    assert not torch.allclose(tuned, plain, atol=1e-3)
    with pytest.raises(UserError, match="reference policy needs"):
        with load(path, finetune="full").reference():
            pass


def test_bf16_loads_and_samples_close_to_its_recomputation(tiny):
    policy = load(tiny("qwen2_vl"), dtype="bf16", finetune="none")
    assert policy.hf_model.dtype == torch.bfloat16
    gen = policy.generate(images(2), PROMPTS[:2], max_new_tokens=6, seed=0)
    with torch.no_grad():
        ev = policy.score(images(2), PROMPTS[:2], gen.response_ids, gen.lengths)
    assert (ev.token_logprobs[:, : gen.logprobs.shape[1]] - gen.logprobs).abs().max().item() < 0.1


def test_bad_model_paths_raise_user_errors(tmp_path, monkeypatch):
    text_only = tmp_path / "text-only"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(text_only)
    with pytest.raises(UserError, match="not an image-text-to-text"):
        VLMPolicy.load(text_only)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        VLMPolicy.load(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        VLMPolicy.load(tmp_path / "missing")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        VLMPolicy.load("vlmrl-test/no-such-model")
    with pytest.raises(UserError, match="finetune"):
        PolicyConfig(finetune="qlora")


def test_constraints_off_leave_sampling_and_scoring_unchanged(tiny, tmp_path):
    """Constrained action decoding (policy/constrain.py) switched off, or on without legal words, is
    bit for bit the unconstrained sampler and scorer; the config switch survives save/load."""
    path, ims = tiny("qwen2_vl"), images(3)
    legal = [["+", "-"], ["1", "10"], ["stand", "hit"]]
    plain = load(path, finetune="none")
    ref = plain.generate(ims, PROMPTS, max_new_tokens=12, seed=7)
    on = load(path, finetune="none", constrained_actions=True)
    runs = [
        plain.generate(ims, PROMPTS, max_new_tokens=12, seed=7, legal_actions=legal),  # config off
        plain.generate(ims, PROMPTS, max_new_tokens=12, seed=7, legal_actions=legal, constrained=False),
        on.generate(ims, PROMPTS, max_new_tokens=12, seed=7),  # on, but no legal words given
        on.generate(ims, PROMPTS, max_new_tokens=12, seed=7, legal_actions=legal, constrained=False),
    ]
    for gen in runs:
        assert gen.texts == ref.texts and gen.constrained is None and gen.legal_actions is None
        for name in ("response_ids", "lengths", "logprobs", "sample_logprobs", "values"):
            assert torch.equal(getattr(gen, name), getattr(ref, name)), name
    with torch.no_grad():
        a = plain.score(ims, PROMPTS, ref.response_ids, ref.lengths)
        b = plain.score(ims, PROMPTS, ref.response_ids, ref.lengths, legal_actions=legal, constrained=False)
    assert torch.equal(a.token_logprobs, b.token_logprobs) and torch.equal(a.entropy, b.entropy)
    again = VLMPolicy.load(on.save(tmp_path / "saved"))
    assert again.config.constrained_actions is True
