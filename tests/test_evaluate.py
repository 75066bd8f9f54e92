import json

import pytest

from vlmrl.evaluate import ExpertPolicy, RandomPolicy, evaluate
from vlmrl.seeds import held_out_seed
from vlmrl.rollout.collect import training_seed
from vlmrl.tasks import get_task


def test_expert_wins_numberline_and_the_result_does_not_depend_on_batching():
    task = get_task("NumberLine")
    one = evaluate(task, ExpertPolicy(task), 40, seed=3, num_envs=1, progress=False)
    many = evaluate(task, ExpertPolicy(task), 40, seed=3, num_envs=7, progress=False)
    assert one.success_rate == 1.0 and one.invalid_action_rate == 0.0
    assert one.to_json() == many.to_json()
    lo, hi = one.success_ci95
    assert 0.9 < lo < hi == 1.0


def test_random_policy_is_seeded_and_loses_often():
    task = get_task("NumberLine")
    a = evaluate(task, RandomPolicy(task, seed=1), 60, seed=0, progress=False)
    b = evaluate(task, RandomPolicy(task, seed=1), 60, seed=0, progress=False)
    assert a.to_json() == b.to_json()
    assert a.success_rate < 0.6 and a.mean_return < 0


def test_unparsable_text_counts_as_invalid():
    task = get_task("NumberLine")

    class Babbler:
        name = "babbler"

        def act(self, observations, infos):
            return ["I am not sure." for _ in infos]

    r = evaluate(task, Babbler(), 10, progress=False)
    assert r.invalid_action_rate == 1.0 and r.episodes == 10


def test_json_fields():
    task = get_task("Blackjack")
    d = evaluate(task, ExpertPolicy(task), 20, progress=False).to_json()
    assert set(d) == {"task", "policy", "episodes", "success_rate", "success_ci95", "mean_return",
                      "invalid_action_rate", "mean_episode_length"}
    json.dumps(d)


def test_held_out_and_training_seeds_never_meet():
    seeds = [training_seed(s, r, i, k) for s in (0, 1, 10**12) for r in range(4) for i in range(64) for k in range(3)]
    assert max(seeds) < held_out_seed(0, 0) and len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError):
        evaluate(get_task("NumberLine"), RandomPolicy(get_task("NumberLine")), 0)


def test_an_env_that_reports_won_decides_success_not_the_return(monkeypatch):
    import gymnasium as gym

    class Stall(gym.Env):
        """A lost episode with a positive return, like ALFWorld's per-step goal-condition reward."""

        observation_space = gym.spaces.Box(0, 255, (4, 4, 3), dtype="uint8")
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample() * 0, {"current": 0, "target": 1, "won": False, "action_words": ("-", "+")}

        def step(self, action):
            return self.observation_space.sample() * 0, 0.5, False, True, {"current": 0, "target": 1, "won": False, "action_words": ("-", "+")}

    task = get_task("NumberLine")
    monkeypatch.setattr(task, "make_env", lambda **kw: Stall())
    r = evaluate(task, ExpertPolicy(task), 5, progress=False)
    assert r.mean_return == 0.5 and r.success_rate == 0.0
