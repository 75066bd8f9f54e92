"""The rollout buffer: storage order, GAE wiring, seeded minibatches, input checks."""

import numpy as np
import pytest
import torch

from vlmrl.algorithms import gae, normalize_advantages
from vlmrl.rollout import RolloutBuffer

T, N = 3, 2


def step_data(t, truncated=(False, False), terminated=(False, False), final_values=None, ref=None):
    """Step t of a fake collector: every field encodes (t, env) so the test can trace it."""
    return dict(
        images=[np.full((4, 4, 3), 10 * t + e, dtype=np.uint8) for e in range(N)],
        prompts=[f"prompt {t} {e}" for e in range(N)],
        response_ids=[list(range(t + e + 1)) for e in range(N)],  # variable length
        response_texts=[f'{{"action": "a{t}{e}"}}' for e in range(N)],
        logprobs=[-(t + 0.1 * e) for e in range(N)],
        values=torch.tensor([t + 0.5 * e for e in range(N)]),
        rewards=np.array([float(t == 2), 0.5], dtype=np.float64),  # numpy input works too
        terminated=list(terminated),
        truncated=list(truncated),
        valid=[bool((t + e) % 2) for e in range(N)],
        final_values=final_values,
        ref_logprobs=ref,
    )


def filled(**kwargs):
    buf = RolloutBuffer(T, N)
    buf.add(**step_data(0))
    buf.add(**step_data(1, truncated=(True, False), terminated=(False, False), final_values=[7.0, 99.0]))
    buf.add(**step_data(2, terminated=(False, True)))
    return buf


def test_stores_in_flat_t_major_order():
    buf = filled()
    assert buf.full and len(buf) == T * N
    for t in range(T):
        for e in range(N):
            i = t * N + e
            assert buf.prompts[i] == f"prompt {t} {e}"
            assert buf.images[i][0, 0, 0] == 10 * t + e
            assert buf.response_ids[i].tolist() == list(range(t + e + 1))
            assert buf.logprobs.flatten()[i].item() == pytest.approx(-(t + 0.1 * e))
    # final value kept only where the env was truncated
    assert buf.final_values.tolist() == [[0, 0], [7.0, 0], [0, 0]]


def test_images_are_copied():
    buf = RolloutBuffer(1, 1)
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    buf.add(images=[image], prompts=["p"], response_ids=[[1]], response_texts=["t"], logprobs=[0.0],
            values=[0.0], rewards=[0.0], terminated=[False], truncated=[False], valid=[True])
    image[:] = 255  # an env reusing its observation buffer must not change the rollout
    assert buf.images[0].max() == 0


def test_compute_advantages_matches_gae():
    buf = filled()
    buf.compute_advantages(torch.tensor([1.0, 2.0]), gamma=0.9, lam=0.95)
    adv, ret = gae(buf.rewards, buf.values, buf.terminated, buf.truncated, torch.tensor([1.0, 2.0]),
                   buf.final_values, gamma=0.9, lam=0.95)
    torch.testing.assert_close(buf.advantages, adv)
    torch.testing.assert_close(buf.returns, ret)
    # env 0 truncated at t=1 bootstraps from V(final) = 7: delta = 0 + 0.9*7 - 1
    assert buf.advantages[1, 0].item() == pytest.approx(0.9 * 7 - 1)


def test_minibatches_cover_everything_once_and_follow_the_seed():
    buf = filled()
    buf.compute_advantages([0.0, 0.0], gamma=0.9, lam=0.95)
    batches = list(buf.minibatches(4, torch.Generator().manual_seed(3)))
    assert [len(b.indices) for b in batches] == [4, 2]  # the remainder comes last
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(T * N))
    norm = normalize_advantages(buf.advantages.flatten())
    for b in batches:
        for j, i in enumerate(b.indices.tolist()):
            t, e = divmod(i, N)
            assert b.prompts[j] == f"prompt {t} {e}"
            assert b.response_texts[j] == f'{{"action": "a{t}{e}"}}'
            assert b.images[j][0, 0, 0] == 10 * t + e
            assert b.response_ids[j].dtype == torch.long
        torch.testing.assert_close(b.advantages, norm[b.indices])  # normalised over the whole buffer
        torch.testing.assert_close(b.returns, buf.returns.flatten()[b.indices])
        torch.testing.assert_close(b.old_logprob, buf.logprobs.flatten()[b.indices])
        torch.testing.assert_close(b.old_value, buf.values.flatten()[b.indices])
        assert b.valid.dtype == torch.bool and b.ref_logprob is None
    again = list(buf.minibatches(4, torch.Generator().manual_seed(3)))
    assert [b.indices.tolist() for b in again] == [b.indices.tolist() for b in batches]
    other = torch.cat([b.indices for b in buf.minibatches(4, torch.Generator().manual_seed(4))])
    assert other.tolist() != seen.tolist()


def test_unnormalized_advantages_and_ref_logprobs():
    buf = RolloutBuffer(T, N)
    for t in range(T):
        buf.add(**step_data(t, ref=[-1.0 - t, -2.0 - t]))
    buf.compute_advantages([0.0, 0.0], gamma=0.9, lam=0.95)
    (b,) = list(buf.minibatches(T * N, torch.Generator().manual_seed(0), normalize=False))
    torch.testing.assert_close(b.advantages, buf.advantages.flatten()[b.indices])
    torch.testing.assert_close(b.ref_logprob, buf.ref_logprobs.flatten()[b.indices])


def test_reset_empties_the_buffer():
    buf = filled()
    buf.compute_advantages([0.0, 0.0], gamma=0.9, lam=0.95)
    buf.reset()
    assert len(buf) == 0 and buf.advantages is None and buf.prompts == []
    buf.add(**step_data(0))
    assert len(buf) == N


def test_input_errors():
    buf = RolloutBuffer(T, N)
    with pytest.raises(ValueError, match="final_values"):
        buf.add(**step_data(0, truncated=(True, False)))
    bad = step_data(0)
    bad["prompts"] = ["only one"]
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        buf.add(**bad)
    bad = step_data(0)
    bad["values"] = [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="values has 3 entries"):
        buf.add(**bad)
    bad = step_data(0)
    bad["images"] = [np.zeros((2, 2, 3), dtype=np.float32)] * N
    with pytest.raises(TypeError, match="uint8"):
        buf.add(**bad)
    with pytest.raises(RuntimeError, match="fill it first"):
        buf.compute_advantages([0.0, 0.0], gamma=0.9, lam=0.95)
    with pytest.raises(RuntimeError, match="compute_advantages"):
        next(buf.minibatches(2, torch.Generator()))
    full = filled()
    with pytest.raises(RuntimeError, match="full"):
        full.add(**step_data(0))
    mixed = RolloutBuffer(T, N)
    mixed.add(**step_data(0, ref=[0.0, 0.0]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        mixed.add(**step_data(1, truncated=(False, False)))
