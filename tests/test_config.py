"""Config loading: files, overrides, strict keys / types / ranges, round trip."""

import json

import pytest

from vlmrl.config import (
    PPOConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
    validate,
)
from vlmrl.errors import UserError


def test_defaults_are_the_papers():
    cfg = load_config(TrainConfig)
    p = cfg.ppo
    assert (p.clip, p.epochs, p.gamma, p.gae_lambda, p.thought_weight) == (0.1, 4, 0.9, 0.95, 0.5)
    assert (p.value_coef, p.max_grad_norm, p.lr, p.end_lr, p.lr_schedule) == (0.5, 0.01, 1e-5, 1e-9, "cosine")
    assert cfg.temperature == 0.2
    validate(cfg)


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_files_and_overrides(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")  # PyYAML comes with transformers and accelerate
    text = {
        ".json": json.dumps({"task": "Blackjack", "num_envs": 2, "ppo": {"lr": 3e-4, "epochs": 2}}),
        ".toml": 'task = "Blackjack"\nnum_envs = 2\n[ppo]\nlr = 3e-4\nepochs = 2\n',
        ".yaml": "task: Blackjack\nnum_envs: 2\nppo:\n  lr: 3.0e-4\n  epochs: 2\n",
    }[suffix]
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = load_config(TrainConfig, path, {"ppo.epochs": 3, "ppo": {"clip": 0.2}, "seed": 7})
    assert cfg.task == "Blackjack" and cfg.num_envs == 2 and cfg.seed == 7
    assert cfg.ppo.lr == 3e-4 and cfg.ppo.epochs == 3 and cfg.ppo.clip == 0.2
    assert cfg.ppo.gamma == 0.9  # untouched fields keep their defaults
    assert isinstance(cfg.ppo, PPOConfig)


def test_int_is_accepted_for_float_and_optional_takes_null():
    cfg = load_config(TrainConfig, {"temperature": 1, "ppo": {"value_clip": None, "target_kl": 0.02}})
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float)
    assert cfg.ppo.value_clip is None and cfg.ppo.target_kl == 0.02


def test_round_trip(tmp_path):
    cfg = load_config(TrainConfig, {"task": "Points24", "ppo": {"kl_coef": 0.05}})
    assert load_config(TrainConfig, to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.json")
    assert load_config(TrainConfig, path) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"ppo.lrr": 1e-4}, r"unknown config key 'ppo.lrr' \(did you mean 'lr'\?\): valid keys in ppo are lr, end_lr"),
    ({"num_env": 4}, r"unknown config key 'num_env'.*valid keys in the config are task, model"),
    ({"ppo.lr": "fast"}, r"'ppo.lr' expects float, got str \('fast'\)"),
    ({"ppo.lr": "1e-5"}, r"expects float, got str.*without quotes"),
    ({"num_envs": 2.5}, r"'num_envs' expects int, got float"),
    ({"cot": 1}, r"'cot' expects bool, got int"),
    ({"num_steps": True}, r"'num_steps' expects int, got bool"),
    ({"wandb_run": 3}, r"'wandb_run' expects str or null, got int"),
    ({"ppo": 0.1}, r"ppo must be a table"),
    ({"ppo.lr_schedule": "linear"}, r"'ppo.lr_schedule' must be one of 'cosine', 'constant'"),
    ({"ppo.lr": -1e-5}, r"ppo.lr must be > 0, got -1e-05"),
    ({"ppo.clip": 0}, r"ppo.clip must be > 0"),
    ({"ppo.gae_lambda": 1.2}, r"ppo.gae_lambda must be in \[0, 1\]"),
    ({"ppo.gamma": -0.1}, r"ppo.gamma must be in \[0, 1\]"),
    ({"ppo.value_clip": 0.0}, r"ppo.value_clip must be > 0 \(or null"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"temperature": 0}, r"temperature must be > 0"),
    ({"ppo.end_lr": 1e-3}, r"ppo.end_lr \(0.001\) must be <= ppo.lr"),
    ({"num_envs": 2, "num_steps": 2, "ppo.minibatch_size": 8}, r"minibatch_size \(8\) must be <= num_envs"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(TrainConfig, None, overrides)


def test_all_range_problems_are_reported_together():
    with pytest.raises(UserError) as err:
        load_config(TrainConfig, {"num_envs": 0, "ppo": {"epochs": 0}})
    assert "num_envs must be >= 1" in str(err.value) and "ppo.epochs must be >= 1" in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("task = \n")
    with pytest.raises(UserError, match="cannot parse config file .*bad.toml"):
        load_config(TrainConfig, bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a table"):
        load_config(TrainConfig, tmp_path / "list.json")
    (tmp_path / "run.ini").write_text("")
    with pytest.raises(UserError, match=r"must end in \.json"):
        load_config(TrainConfig, tmp_path / "run.ini")


def test_parse_overrides():
    got = parse_overrides(["ppo.lr=1e-4", "task=Blackjack", "cot=false", "ppo.target_kl=null",
                           "wandb_run=none", "out_dir=runs/a=b"])
    assert got == {"ppo.lr": 1e-4, "task": "Blackjack", "cot": False, "ppo.target_kl": None,
                   "wandb_run": None, "out_dir": "runs/a=b"}
    cfg = load_config(TrainConfig, None, got)
    assert cfg.ppo.lr == 1e-4 and cfg.cot is False
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["ppo.lr"])


def test_caller_dict_is_not_mutated():
    source = {"ppo": {"lr": 1e-4}}
    load_config(TrainConfig, source, {"ppo.lr": 2e-4})
    assert source == {"ppo": {"lr": 1e-4}}


def test_env_kwargs_take_a_table_and_dotted_overrides():
    from vlmrl.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, {"env_kwargs": {"split": "valid_seen"}}, {"env_kwargs.max_steps": 20})
    assert cfg.env_kwargs == {"split": "valid_seen", "max_steps": 20}
    with pytest.raises(UserError, match="env_kwargs"):
        load_config(TrainConfig, {"env_kwargs": ["split"]})


def test_an_option_the_env_does_not_take_is_a_user_error():
    from vlmrl.tasks import get_task

    with pytest.raises(UserError, match="does not take"):
        get_task("NumberLine").make_env(split="train")


@pytest.mark.parametrize("key, owner", [("temperature", "temperature"), ("top_p", "top_p"),
                                        ("max_new_tokens", "max_new_tokens"),
                                        ("thought_weight", "ppo.thought_weight"),
                                        ("reading_weight", "ppo.reading_weight"), ("seed", "seed")])
def test_a_policy_key_the_run_would_ignore_is_an_error(key, owner):
    # these were accepted, then replaced by the run's own field of the same meaning
    with pytest.raises(UserError, match=rf"'policy.{key}' would be ignored.*set {owner} instead"):
        load_config(TrainConfig, None, {f"policy.{key}": 0.7 if key != "max_new_tokens" else 9})


def test_a_python_built_config_checks_itself():
    from vlmrl.config import PolicyConfig

    with pytest.raises(UserError, match=r"policy.temperature \(set temperature instead\)"):
        TrainConfig(policy=PolicyConfig(temperature=0.7))
    with pytest.raises(UserError, match=r"lr must be > 0"):
        PPOConfig(lr=-1.0)
    with pytest.raises(UserError, match=r"num_envs must be >= 1"):
        TrainConfig(num_envs=0)
    with pytest.raises(UserError, match=r"ppo.minibatch_size \(9\) must be <="):
        TrainConfig(num_envs=2, num_steps=2, ppo=PPOConfig(minibatch_size=9))


def test_the_run_sets_the_policy_sampling_fields_and_saves_them_once(tmp_path):
    cfg = load_config(TrainConfig, None, {"temperature": 0.7, "top_p": 0.9, "seed": 3, "ppo.thought_weight": 0.3})
    p = cfg.policy_config()
    assert (p.temperature, p.top_p, p.seed, p.thought_weight) == (0.7, 0.9, 3, 0.3)
    saved = to_dict(cfg)
    assert not {"temperature", "top_p", "max_new_tokens", "thought_weight", "seed"} & set(saved["policy"])
    assert load_config(TrainConfig, save_config(cfg, tmp_path / "c.json")) == cfg
