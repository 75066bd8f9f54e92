import json
import subprocess
import sys

from vlmrl.cli import main


def test_eval_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "EZPoints", "--policy", "expert", "--episodes", "5", "--json", str(out), "--quiet"]) == 0
    assert "success rate" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["success_rate"] == 1.0 and data["episodes"] == 5 and len(data["success_ci95"]) == 2


def test_eval_in_worker_processes_gives_the_same_result(tmp_path):
    # the random policy's draws and the envs' seeds do not depend on where the envs step
    results = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        assert main(["eval", "NumberLine", "--policy", "random", "--episodes", "12", "--num-envs", "4",
                     "--env-workers", workers, "--json", str(out), "--quiet"]) == 0
        results.append({k: v for k, v in json.loads(out.read_text()).items() if "time" not in k and "second" not in k})
    assert results[0] == results[1] and results[0]["episodes"] == 12


def test_render_writes_pngs(tmp_path):
    from PIL import Image

    assert main(["render", "EZPoints", "--seed", "1", "--out", str(tmp_path), "--steps", "2"]) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size[0] > 300  # observation plus the prompt beside it


def test_unknown_task_is_one_line_and_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "vlmrl.cli", "eval", "Chess"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vlmrl: error: unknown task 'Chess': choose one of NumberLine, EZPoints, Points24, Blackjack, ALFWorld, "
        "ALFWorld-THOR, FrozenLake, or give your own Task as an import path module:attr"]


def test_a_bad_number_is_one_line_from_the_config_check():
    proc = subprocess.run([sys.executable, "-m", "vlmrl.cli", "eval", "NumberLine", "--episodes", "-3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["vlmrl: error: invalid config: episodes must be >= 1, got -3"]


def _subcommands():
    from vlmrl.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    return sorted(sub.choices)


def test_every_help_prints_and_exits_0(capsys):
    import pytest

    commands = _subcommands()
    assert {"demo", "sft", "train", "eval", "render"} <= set(commands)
    for argv in [["--help"]] + [[c, "--help"] for c in commands]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        out = capsys.readouterr().out
        assert done.value.code == 0, argv
        assert out.startswith("usage: vlmrl"), (argv, out[:200])


def _dests(command):
    from vlmrl.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    return sub.choices[command], {a.dest for a in sub.choices[command]._actions}


def _keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_config_field_is_an_option_of_its_command():
    from vlmrl.config import RUN_OWNED_POLICY_FIELDS, EvalConfig, SFTConfig, TrainConfig

    owned = {f"policy.{k}" for k in RUN_OWNED_POLICY_FIELDS}
    for command, cls in (("sft", SFTConfig), ("train", TrainConfig), ("eval", EvalConfig)):
        _, dests = _dests(command)
        missing = [k for k in _keys(cls) if k != "task" and k not in owned and f"cfg:{k}" not in dests]
        assert missing == [], (command, missing)
        assert not any(f"cfg:{k}" in dests for k in owned)  # the run sets these: no option for them


def test_generated_options_reach_the_config_with_the_dataclass_defaults():
    from vlmrl.cli import _overrides
    from vlmrl.config import PPOConfig, TrainConfig, load_config

    parser, _ = _dests("train")
    args = parser.parse_args(["NumberLine", "--model", "m", "--out", "o", "--ppo.lr", "3e-4", "--no-cot",
                              "--ppo.value-clip", "none", "--policy.finetune", "full", "--updates", "7",
                              "--env-kwargs", '{"max_position": 4}', "--policy.lora-targets", "q_proj", "v_proj"])
    cfg = load_config(TrainConfig, None, _overrides(args))
    assert (cfg.ppo.lr, cfg.cot, cfg.ppo.value_clip, cfg.policy.finetune, cfg.total_updates) == (3e-4, False, None, "full", 7)
    assert cfg.env_kwargs == {"max_position": 4} and cfg.policy.lora_targets == ("q_proj", "v_proj")
    assert cfg.ppo.epochs == PPOConfig().epochs  # untyped options keep the dataclass's default
    args = parser.parse_args(["NumberLine", "--model", "m", "--ppo.epochs", "two"])
    import pytest

    from vlmrl.errors import UserError

    with pytest.raises(UserError, match="'ppo.epochs' expects int, got str"):
        load_config(TrainConfig, None, _overrides(args))


def test_resume_refuses_settings_that_differ_from_the_run(tmp_path, capsys):
    from vlmrl.config import TrainConfig, load_config, save_config

    run = tmp_path / "run"
    save_config(load_config(TrainConfig, None, {"model": "m", "out_dir": str(run)}), run / "config.json")
    assert main(["train", "--out", str(run), "--resume", "--ppo.lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo.lr=0.5 (the run has 1e-05)" in err[0] and "new --out" in err[0]
