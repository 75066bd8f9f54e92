"""The rollout buffer: storage order, seeded minibatches of what it holds, input checks.

(Its GAE targets are computed by the trainer: tests/test_trainer.py, tests/algorithms/test_gae.py.)
"""

import numpy as np
import pytest
import torch

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


def with_targets(buf):
    """Advantages and returns that name their own flat index (the trainer sets GAE's here)."""
    buf.advantages = torch.arange(T * N, dtype=torch.float32).view(T, N)
    buf.returns = 100 + buf.advantages
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


def test_minibatches_cover_everything_once_and_follow_the_seed():
    buf = with_targets(filled())
    batches = list(buf.minibatches(4, torch.Generator().manual_seed(3)))
    assert [len(b.indices) for b in batches] == [4, 2]  # the remainder comes last
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(T * N))
    for b in batches:
        for j, i in enumerate(b.indices.tolist()):
            t, e = divmod(i, N)
            assert b.prompts[j] == f"prompt {t} {e}"
            assert b.response_texts[j] == f'{{"action": "a{t}{e}"}}'
            assert b.images[j][0, 0, 0] == 10 * t + e
            assert b.response_ids[j].dtype == torch.long
        assert b.advantages.tolist() == b.indices.float().tolist()  # as set, unchanged
        assert b.returns.tolist() == (100 + b.indices.float()).tolist()
        torch.testing.assert_close(b.old_logprob, buf.logprobs.flatten()[b.indices])
        torch.testing.assert_close(b.old_value, buf.values.flatten()[b.indices])
        assert b.valid.dtype == torch.bool and b.ref_logprob is None
    again = list(buf.minibatches(4, torch.Generator().manual_seed(3)))
    assert [b.indices.tolist() for b in again] == [b.indices.tolist() for b in batches]
    other = torch.cat([b.indices for b in buf.minibatches(4, torch.Generator().manual_seed(4))])
    assert other.tolist() != seen.tolist()


def test_ref_logprobs_follow_their_transitions():
    buf = RolloutBuffer(T, N)
    for t in range(T):
        buf.add(**step_data(t, ref=[-1.0 - t, -2.0 - t]))
    (b,) = list(with_targets(buf).minibatches(T * N, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(b.ref_logprob, buf.ref_logprobs.flatten()[b.indices])


def test_reset_empties_the_buffer():
    buf = with_targets(filled())
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
        next(buf.minibatches(2, torch.Generator()))
    with pytest.raises(RuntimeError, match="advantages and returns"):
        next(filled().minibatches(2, torch.Generator()))
    flat = with_targets(filled())
    flat.returns = flat.returns.flatten()
    with pytest.raises(ValueError, match="shape"):
        next(flat.minibatches(2, torch.Generator()))
    stale = with_targets(RolloutBuffer(T, N))
    stale.add(**step_data(0))  # new data makes earlier targets stale
    assert stale.advantages is None
    full = filled()
    with pytest.raises(RuntimeError, match="full"):
        full.add(**step_data(0))
    mixed = RolloutBuffer(T, N)
    mixed.add(**step_data(0, ref=[0.0, 0.0]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        mixed.add(**step_data(1, truncated=(False, False)))


def test_masked_steps_and_padding_are_never_drawn():
    # a group rollout: env 1 stepped only at t=0, and every episode ended before the last step
    buf = RolloutBuffer(T, N)
    buf.add(**step_data(0), mask=[True, True], episode=[0, 1], step_index=[0, 0], group=[0, 0], state=[5, 5])
    buf.add(**step_data(1), mask=[True, False], episode=[0, 1], step_index=[1, 1], group=[0, 0], state=[6, 7])
    assert not buf.full and len(buf) == 3
    buf.pad()
    assert buf.full and len(buf) == 3 and len(buf.prompts) == T * N
    assert buf.mask.tolist() == [[True, True], [True, False], [False, False]]
    # labels where the env stepped, -1 elsewhere (masked and padding)
    assert buf.episode.tolist() == [[0, 1], [0, -1], [-1, -1]] and buf.state.tolist() == [[5, 5], [6, -1], [-1, -1]]
    assert buf.step_index.tolist() == [[0, 0], [1, -1], [-1, -1]] and buf.group.tolist() == [[0, 0], [0, -1], [-1, -1]]
    with_targets(buf)
    for seed in range(5):
        drawn = [i for b in buf.minibatches(2, torch.Generator().manual_seed(seed)) for i in b.indices.tolist()]
        assert sorted(drawn) == [0, 1, 2]
    # without a mask every transition is real, and the order is torch.randperm's own (PPO runs unchanged)
    order = torch.cat([b.indices for b in with_targets(filled()).minibatches(4, torch.Generator().manual_seed(3))])
    assert torch.equal(order, torch.randperm(T * N, generator=torch.Generator().manual_seed(3)))
