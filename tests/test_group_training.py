"""Group-relative credit (ppo.advantage grpo / rloo / gigpo) beside PPO's GAE: group rollouts whose
envs share a start, padding that is never trained on, advantages from vlmrl.algorithms.group, no value
function (value head frozen), same seed same run, resume, and one line for each bad setting.

The collector tests answer with a scripted policy (no model: milliseconds); the training runs use the
tiny VLM on NumberLine (seconds each)."""

import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmrl import Task
from vlmrl.algorithms.group import gigpo_advantages
from vlmrl.config import PolicyConfig, PPOConfig, TrainConfig, load_config
from vlmrl.errors import UserError
from vlmrl.metrics import read_metrics
from vlmrl.policy.model import VLMPolicy
from vlmrl.policy.tiny import build_tiny_vlm
from vlmrl.rollout import RolloutBuffer
from vlmrl.rollout.collect import Collector, group_seed
from vlmrl.seeds import HELD_OUT_SEED_BASE
from vlmrl.tasks import get_task
from vlmrl.trainer import group_advantages, train

TIMINGS = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")
ESTIMATORS = ("grpo", "rloo", "gigpo")


# --- collection, with a scripted policy --------------------------------------------------------------


class Scripted:
    """Answers every prompt with one fixed response; records the images of each generate call."""

    def __init__(self, text='{"action": "+"}'):
        self.text, self.batches = text, []

    def generate(self, images, prompts, *, temperature, top_p, max_new_tokens, seed, legal_actions=None):
        self.batches.append(list(images))
        b = len(prompts)
        return SimpleNamespace(texts=[self.text] * b, response_ids=torch.ones(b, 2, dtype=torch.long),
                               lengths=torch.full((b,), 2), logprobs=torch.zeros(b, 2), values=torch.zeros(b))

    def action_logprob(self, ids, logprobs):
        return logprobs.sum(-1)


def collect(task, num_envs, group_size, num_steps, update=0, seed=3, collector=None, policy=None):
    collector = collector or Collector(get_task(task), num_envs, seed, group_size=group_size)
    buffer = RolloutBuffer(num_steps, num_envs)
    policy = policy or Scripted()
    stats = collector.collect_groups(policy, buffer, update=update, temperature=1.0, top_p=1.0, max_new_tokens=8,
                                     generator=torch.Generator().manual_seed(0))
    return collector, buffer, stats, policy


@pytest.mark.parametrize("task", ["NumberLine", "Points24", "Blackjack"])
def test_the_envs_of_a_group_start_from_one_state_fresh_each_update(task):
    starts = []
    collector = None
    for update in (0, 1):
        collector, buffer, _, policy = collect(task, 8, 4, 1, update=update, collector=collector)
        first = policy.batches[0]  # the first observations, one per env
        for j in (0, 1):
            group = range(4 * j, 4 * j + 4)
            assert all(np.array_equal(first[i], first[4 * j]) for i in group)
            assert len({buffer.state[0, i].item() for i in group}) == 1  # one state key
            assert len({buffer.prompts[i] for i in group}) == 1
        assert buffer.group[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        starts.append([first[0], first[4]])
    collector.close()
    # the two groups start apart, and the next update starts afresh
    assert not np.array_equal(starts[0][0], starts[0][1])
    assert not all(np.array_equal(a, b) for a, b in zip(starts[0], starts[1]))
    seeds = [group_seed(s, r, j, u) for s in (0, 7) for r in (0, 1) for j in range(3) for u in range(3)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < HELD_OUT_SEED_BASE for x in seeds)  # each rank its own


def test_an_update_depends_on_its_index_only():
    # what a resumed run relies on: update 2 collected by a fresh collector equals update 2 of one
    # that collected 0 and 1 first (the random fallbacks of unparsable answers included)
    def rollout(updates):
        collector = Collector(get_task("Blackjack"), 4, 3, group_size=2)
        for u in updates:
            _, buffer, _, _ = collect("Blackjack", 4, 2, 3, update=u, collector=collector,
                                      policy=Scripted("no action here"))
        collector.close()
        return buffer

    a, b = rollout([0, 1, 2]), rollout([2])
    for name in ("rewards", "mask", "state", "terminated", "valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.prompts == b.prompts


def test_finished_envs_are_not_sampled_and_padding_is_never_in_a_minibatch():
    # always "+": an episode ends when it reaches a target above it; one whose target lies below runs
    # on, and is cut after num_steps steps
    collector, buffer, stats, policy = collect("NumberLine", 8, 4, 4)
    collector.close()
    mask = buffer.mask
    active = [len(batch) for batch in policy.batches]
    assert active == mask.sum(1)[: len(active)].tolist()  # one sample per env still playing
    assert not mask.all() and buffer.full  # some episodes ended early: padding
    assert stats.steps == len(buffer) == int(mask.sum())
    assert stats.cut == int(mask[-1].sum())  # still playing at the last step: cut
    # each env's steps are 0..len-1 of its own episode, padding after
    for i in range(8):
        n = int(mask[:, i].sum())
        assert mask[:n, i].all() and buffer.step_index[:n, i].tolist() == list(range(n))
        assert (buffer.episode[:n, i] == i).all() and (buffer.episode[n:, i] == -1).all()
    done = collector.pop_finished()
    assert len(done.returns) == 8 and sorted(done.lengths) == sorted(mask.sum(0).tolist())

    buffer.advantages, buffer.returns, _ = group_advantages(buffer, PPOConfig(advantage="grpo", group_size=4))
    real = set(mask.flatten().nonzero().squeeze(1).tolist())
    seen = []
    for mb in buffer.minibatches(3, torch.Generator().manual_seed(0)):
        seen += mb.indices.tolist()
        assert all(mb.prompts) and all(len(ids) for ids in mb.response_ids)  # no placeholder
    assert sorted(seen) == sorted(real)  # every real transition once, padding never
    again = [i for mb in buffer.minibatches(3, torch.Generator().manual_seed(0)) for i in mb.indices.tolist()]
    other = [i for mb in buffer.minibatches(3, torch.Generator().manual_seed(1)) for i in mb.indices.tolist()]
    assert again == seen and other != seen  # the order follows the seed


def _hand_buffer():
    """2 groups of 2 envs, 3 steps. Returns: env0 1 (2 steps), env1 0 (3 steps), env2 -1 (1 step), env3 3 (2 steps)."""
    buf = RolloutBuffer(3, 4)
    rewards = [[1, 0, -1, 2], [0, 0, 0, 1], [0, 0, 0, 0]]
    masks = [[1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 0, 0]]
    states = [[0, 0, 1, 1], [2, 3, 0, 4], [0, 2, 0, 0]]
    for t in range(3):
        buf.add(images=[None] * 4, prompts=["p"] * 4, response_ids=[[1]] * 4, response_texts=["r"] * 4,
                logprobs=[0.0] * 4, values=[0.0] * 4, rewards=rewards[t], terminated=[False] * 4,
                truncated=[False] * 4, valid=[True] * 4, mask=[bool(m) for m in masks[t]], episode=range(4),
                step_index=[t] * 4, group=[0, 0, 1, 1], state=states[t])
    return buf


def test_group_advantages_of_a_rollout_with_padding():
    buf = _hand_buffer()
    grpo, returns, stds = group_advantages(buf, PPOConfig(advantage="grpo", group_size=2))
    # group 0: returns 1, 0 -> +-1 (std 0.5); group 1: -1, 3 -> -+1 (std 2); every step of an episode alike
    expected = torch.tensor([[1, -1, -1, 1], [1, -1, 0, 1], [0, -1, 0, 0]], dtype=torch.float32)
    assert torch.allclose(grpo, expected, atol=1e-4) and (grpo[~buf.mask] == 0).all()
    assert stds == [0.5, 2.0] and not returns.any()
    rloo, _, _ = group_advantages(buf, PPOConfig(advantage="rloo", group_size=2))
    assert rloo.tolist() == [[1, -1, -4, 4], [1, -1, 0, 4], [0, -1, 0, 0]]
    ppo = PPOConfig(advantage="gigpo", group_size=2, gamma=0.5, gigpo_step_weight=0.7)
    gigpo, _, _ = group_advantages(buf, ppo)
    real = buf.mask.flatten()
    flat = gigpo_advantages(buf.rewards.flatten()[real], buf.episode.flatten()[real], buf.step_index.flatten()[real],
                            torch.tensor([0, 0, 1, 1]), buf.state.flatten()[real], gamma=0.5, step_weight=0.7)
    assert torch.equal(gigpo.flatten()[real], flat) and (gigpo[~buf.mask] == 0).all()
    # env0 and env1 share state 0 at step 0 (returns-to-go 1 and 0): the step level adds +-0.7 there
    assert gigpo[0, 0].item() == pytest.approx(1 + 0.7, abs=1e-3)


# --- training runs, tiny VLM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "m", seed=0))


def group_config(model, out, advantage="gigpo", **kw):
    base = dict(
        task="NumberLine", model=model, num_envs=4, num_steps=3, total_updates=2, seed=5,
        max_new_tokens=12, temperature=1.0, out_dir=str(out), tensorboard=False, log_samples=2,
        ppo=PPOConfig(lr=1e-3, epochs=1, minibatch_size=3, grad_accum_steps=2, max_grad_norm=1.0,
                      advantage=advantage, group_size=2),
        policy=PolicyConfig(finetune="full", train_vision=True),
    )
    base.update(kw)
    return TrainConfig(**base)


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("advantage", ESTIMATORS)
def test_two_updates_train_every_lm_parameter_and_build_no_value_head(tiny_model, tmp_path, advantage):
    cfg = group_config(tiny_model, tmp_path / "run", advantage)
    start = {n: p.detach().clone() for n, p in VLMPolicy.load(tiny_model, cfg.policy_config()).named_parameters()}
    heads = []
    final = train(cfg, progress=False, callback=lambda r: heads.append(r.policy.value_head))
    assert heads == [None, None]  # no value function, so no head is built at all
    assert not (final / "value_head.safetensors").exists()
    after = dict(VLMPolicy.load(final).named_parameters())
    lm = [n for n in start if not n.startswith("value_head.")]
    assert len(lm) > 10
    assert [n for n in lm if torch.equal(start[n], after[n].detach())] == []

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["charts/group_return_std"] >= 0 for r in rows) and any(r["charts/group_return_std"] > 0 for r in rows)
    assert all("losses/value_loss" not in r and "losses/explained_variance" not in r for r in rows)
    # one episode per env per update, each at most num_steps steps: the env steps actually taken
    assert all(r["charts/episodes"] == 4 for r in rows)
    assert 2 * 4 <= rows[-1]["charts/env_steps"] <= 2 * 4 * 3


def test_a_policy_without_a_value_head_samples_and_scores_with_zero_values(tiny_model):
    import numpy as np

    from vlmrl.errors import UserError

    policy = VLMPolicy.load(tiny_model, PolicyConfig(finetune="full", train_vision=True), value_head=False)
    assert policy.value_head is None and not any(n.startswith("value_head.") for n, _ in policy.named_parameters())
    images = [np.zeros((300, 300, 3), dtype=np.uint8)] * 2
    gen = policy.generate(images, ["a", "b"], max_new_tokens=4, seed=0)
    scored = policy.score(images, ["a", "b"], gen.response_ids, gen.lengths)
    assert torch.equal(gen.values, torch.zeros(2)) and torch.equal(scored.values, torch.zeros(2))
    with pytest.raises(UserError, match="without a value head"):
        policy.values(images, ["a", "b"])


def test_same_seed_same_metrics(tiny_model, tmp_path):
    def run(name):
        train(group_config(tiny_model, tmp_path / name, "grpo"), progress=False)
        return _rows(tmp_path / name)

    assert run("a") == run("b")


class Stop(Exception):
    pass


def test_a_resumed_group_run_equals_one_never_stopped(tiny_model, tmp_path):
    def run(out, stop_at=None, resume=False):
        draws = {}

        def callback(r):
            draws[r.update] = (random.random(), float(np.random.rand()), torch.rand(1).item())
            if r.update == stop_at:
                raise Stop

        try:
            train(group_config(tiny_model, out, "gigpo", total_updates=3), resume=resume, progress=False,
                  callback=callback)
        except Stop:
            pass
        return draws

    never = run(tmp_path / "never")
    assert run(tmp_path / "run", stop_at=2) == {1: never[1], 2: never[2]}
    assert run(tmp_path / "run", resume=True) == {2: never[2], 3: never[3]}
    rows = [_rows(tmp_path / name) for name in ("never", "run")]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    mine, theirs = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("run", "never"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# --- bad settings: one line each ---------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: PPOConfig(advantage="grpo"), "a group size of 1"),
    (lambda: PPOConfig(advantage="gigpo", group_size=1), "a group size of 1"),
    (lambda: PPOConfig(group_size=4), r"group_size \(4\) means nothing to advantage 'gae'"),
    (lambda: PPOConfig(advantage="ppo", group_size=2), "advantage must be one of 'gae', 'grpo', 'rloo', 'gigpo'"),
    (lambda: PPOConfig(advantage="grpo", group_size=2, value_lr=3e-3), "value_lr is the value head's rate"),
    (lambda: TrainConfig(num_envs=6, ppo=PPOConfig(advantage="rloo", group_size=4)),
     r"num_envs \(6\) must be a multiple of ppo.group_size \(4\)"),
    (lambda: TrainConfig(num_envs=4, ppo=PPOConfig(advantage="grpo", group_size=2),
                         policy=PolicyConfig(finetune="none")), "nothing would train"),
    (lambda: load_config(TrainConfig, {"ppo": {"advantage": "rloo"}}), r"ppo.advantage 'rloo'.*set ppo.group_size >= 2"),
])
def test_bad_group_settings_are_one_line(build, message):
    with pytest.raises(UserError, match=message) as err:
        build()
    assert "\n" not in str(err.value)


class NoKey(Task):
    name = "NoKey"
    env_id = "vlmrl/NumberLine-v0"
    description = "A task without a state key."


def test_gigpo_on_a_task_without_a_state_key_stops_before_any_model_loads(tmp_path):
    cfg = group_config(str(tmp_path / "no-such-model"), tmp_path / "run")
    with pytest.raises(UserError, match="task 'NoKey' has no state key: define state_key") as err:
        train(cfg, task=NoKey(), progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
    assert not NoKey().has_state_key and get_task("NumberLine").has_state_key


def test_the_cli_refuses_a_group_of_one_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmrl.cli", "train", "NumberLine", "--model", str(tmp_path / "m"),
                           "--out", str(tmp_path / "o"), "--ppo.advantage", "grpo", "--ppo.group-size", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a group size of 1" in lines[0], proc.stderr
