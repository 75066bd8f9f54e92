"""Rollouts with memory and constrained action decoding: what sampling did, the PPO forward redoes."""

import contextlib

import numpy as np
import torch

from vlmrl.config import PolicyConfig
from vlmrl.policy.model import VLMPolicy
from vlmrl.rollout.buffer import RolloutBuffer
from vlmrl.rollout.collect import Collector
from vlmrl.tasks import get_task
from vlmrl.tasks.parsing import parse_action


@contextlib.contextmanager
def keen_on_the_action_key(policy: VLMPolicy, bias: float = 6.0):
    """The same model with the `"action": "` token's logit raised (in sampling and scoring alike), so
    its random weights reach the action field often and would then write junk words."""
    (key,) = policy.tokenizer.encode('"action": "', add_special_tokens=False)
    add = torch.zeros(policy.hf_model.get_output_embeddings().out_features)
    add[key] = bias
    handle = policy.hf_model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + add)
    try:
        yield
    finally:
        handle.remove()


def rollout(model: str, constrained: bool, history_length: int, seed: int = 0):
    task = get_task("EZPoints")
    policy = VLMPolicy.load(model, PolicyConfig(device="cpu", finetune="none", constrained_actions=constrained))
    collector = Collector(task, 4, seed, history_length=history_length)
    buffer = RolloutBuffer(3, 4)
    with keen_on_the_action_key(policy):
        collector.collect(policy, buffer, temperature=1.0, top_p=1.0, max_new_tokens=24,
                          generator=torch.Generator().manual_seed(seed))
        # the PPO forward on the stored transitions, as the trainer calls it
        scored = policy(buffer.images, buffer.prompts, buffer.response_ids, legal_actions=buffer.legal_actions)
    collector.close()
    return task, buffer, scored


def test_constrained_rollouts_always_write_a_legal_action_and_score_the_same(tiny_model):
    _, buffer, scored = rollout(tiny_model, constrained=True, history_length=0)
    keyed = [k for k, text in enumerate(buffer.response_texts) if '"action": "' in text]
    assert len(keyed) >= len(buffer.response_texts) // 2  # the bias makes the model reach the field
    rng = np.random.default_rng(0)
    assert all(parse_action(buffer.response_texts[k], buffer.legal_actions[k], rng).valid for k in keyed)
    assert torch.allclose(scored.action_logprob.float(), buffer.logprobs.flatten(), atol=1e-4)


def test_unconstrained_the_same_model_writes_junk(tiny_model):
    _, buffer, scored = rollout(tiny_model, constrained=False, history_length=0)
    rng = np.random.default_rng(0)
    keyed = [k for k, text in enumerate(buffer.response_texts) if '"action": "' in text]
    assert keyed and not all(parse_action(buffer.response_texts[k], buffer.legal_actions[k], rng).valid for k in keyed)
    assert torch.allclose(scored.action_logprob.float(), buffer.logprobs.flatten(), atol=1e-4)


def test_memory_reaches_the_rollout_prompts_and_log_probs_still_match(tiny_model):
    _, buffer, scored = rollout(tiny_model, constrained=False, history_length=2)
    steps = [buffer.prompts[t * 4:(t + 1) * 4] for t in range(3)]
    assert not any("Your last" in p for p in steps[0])  # nothing to remember at the first step
    ended = (buffer.terminated[0] | buffer.truncated[0]).tolist()
    # an env whose episode went on remembers its first step; one that ended starts afresh
    assert [("Your last 1 step" in p) for p in steps[1]] == [not e for e in ended] and not all(ended)
    assert torch.allclose(scored.action_logprob.float(), buffer.logprobs.flatten(), atol=1e-4)
