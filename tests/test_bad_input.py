"""Bad input to `vlmrl train` / `vlmrl sft`: one `vlmrl: error:` line naming the problem, exit code 2,
no traceback, and nothing written to the output folder.

Most cases call `vlmrl.cli.main` in this process (the same code path as the console script, without
paying a fresh torch import per case); one case runs the real command to check the process exit code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlmrl.cli import main
from vlmrl.tasks.formula import FormulaError, evaluate


@pytest.fixture(scope="module")
def text_only_model(tmp_path_factory):
    """A real Hugging Face folder, but of a text-only model (GPT-2's config)."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(path)
    return path


def _fails_cleanly(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vlmrl: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_unknown_task_and_unknown_model(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(capsys, ["train", "Chess", "--model", str(tiny_model), "--out", str(out)], "unknown task 'Chess'", "NumberLine")
    _fails_cleanly(capsys, ["train", "NumberLine", "--model", str(tmp_path / "nowhere"), "--out", str(out)],
                   "not found", "tiny")
    _fails_cleanly(capsys, ["train", "NumberLine", "--out", str(out)], "needs --model")
    assert not out.exists()


def test_a_model_folder_that_is_not_a_vlm(capsys, text_only_model, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(capsys, ["train", "NumberLine", "--model", str(text_only_model), "--out", str(out)],
                   "'gpt2' model, not an image-text-to-text")
    broken = tmp_path / "broken"
    broken.mkdir()
    _write(broken / "config.json", "{this is not json")
    _fails_cleanly(capsys, ["train", "NumberLine", "--model", str(broken), "--out", str(out)], "could not load model")
    assert not out.exists()


def test_an_image_size_the_processor_cannot_take(capsys, tiny_model, tmp_path):
    out = tmp_path / "sft"
    _fails_cleanly(capsys, ["sft", "NumberLine", "--model", str(tiny_model), "--out", str(out), "--image-size", "50"],
                   "image_size 50 must be a multiple of")
    _fails_cleanly(capsys, ["sft", "NumberLine", "--model", str(tiny_model), "--out", str(out), "--image-size", "0"],
                   "image_size must be >= 1, got 0")
    assert not out.exists()


@pytest.mark.parametrize("content, needles", [
    ('{"ppo": {"lrr": 0.001}}', ("unknown config key 'ppo.lrr'", "did you mean 'lr'")),
    ('{"num_envs": "four"}', ("'num_envs' expects int", "str")),
    ('{"ppo": {"clip": true}}', ("'ppo.clip' expects float",)),
    ('{"ppo": [1, 2]}', ("ppo must be a table",)),
    ('[1, 2]', ("must hold a table",)),
    ('{"num_envs": 2,', ("cannot parse config file",)),
])
def test_config_file_with_unknown_key_or_wrong_type(capsys, tiny_model, tmp_path, content, needles):
    cfg = _write(tmp_path / "run.json", content)
    out = tmp_path / "out"
    _fails_cleanly(capsys, ["train", "NumberLine", "--model", str(tiny_model), "--out", str(out), "--config", cfg], *needles)
    assert not out.exists()


def test_yaml_number_written_as_text_gets_a_hint(capsys, tiny_model, tmp_path):
    cfg = _write(tmp_path / "run.yaml", "ppo:\n  lr: 1e-5\n")  # YAML 1.1 reads this as a string
    _fails_cleanly(capsys, ["train", "NumberLine", "--model", str(tiny_model), "--out", str(tmp_path / "o"), "--config", cfg],
                   "'ppo.lr' expects float", "1.0e-5")


@pytest.mark.parametrize("override, needle", [
    ("ppo.lr=-1", "ppo.lr must be > 0"),
    ("ppo.clip=0", "ppo.clip must be > 0"),
    ("ppo.thought_weight=1.5", "ppo.thought_weight must be in [0, 1]"),
    ("ppo.thought_weight=-0.1", "ppo.thought_weight must be in [0, 1]"),
    ("ppo.gae_lambda=2", "ppo.gae_lambda must be in [0, 1]"),
    ("ppo.max_grad_norm=0", "ppo.max_grad_norm must be > 0"),
    ("num_envs=0", "num_envs must be >= 1"),
    ("ppo.minibatch_size=999", "must be <= num_envs * num_steps"),
    ("ppo.lr", "is not key=value"),
    ("ppo.nope=1", "unknown config key 'ppo.nope'"),
])
def test_out_of_range_values_and_malformed_overrides(capsys, tiny_model, tmp_path, override, needle):
    out = tmp_path / "out"
    _fails_cleanly(capsys, ["train", "NumberLine", "--model", str(tiny_model), "--out", str(out), "--set", override], needle)
    assert not out.exists()


def test_missing_or_unsupported_config_file_and_resume_of_nothing(capsys, tiny_model, tmp_path):
    base = ["train", "NumberLine", "--model", str(tiny_model), "--out", str(tmp_path / "out")]
    _fails_cleanly(capsys, base + ["--config", str(tmp_path / "missing.json")], "missing.json")
    _fails_cleanly(capsys, base + ["--config", _write(tmp_path / "run.ini", "[x]")], "must end in .json, .toml, .yaml")
    _fails_cleanly(capsys, ["train", "--out", str(tmp_path / "empty"), "--resume"], "holds no run", "without --resume")


def test_the_real_command_exits_2_with_one_line(tiny_model, tmp_path):
    cfg = _write(tmp_path / "run.toml", "num_envs = 2\n[ppo]\nclip = -0.2\n")
    proc = subprocess.run([sys.executable, "-m", "vlmrl.cli", "train", "NumberLine", "--model", str(tiny_model),
                           "--out", str(tmp_path / "out"), "--config", cfg], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["vlmrl: error: invalid config: ppo.clip must be > 0, got -0.2"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["__import__('os').system('touch PWNED')", "9**9**9**9", "(" * 5000 + "1" + ")" * 5000,
                                  "1" * 10_000, "exec('1')"])
def test_formula_text_is_never_executed_and_answers_at_once(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormulaError):
        evaluate(text)
    assert not (tmp_path / "PWNED").exists()
