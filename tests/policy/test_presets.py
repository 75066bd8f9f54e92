"""Model resolution: 'tiny', local folders and Hub ids through huggingface_hub's cache (offline)."""

import os
import subprocess
import sys

import pytest

from vlmrl.errors import UserError
from vlmrl.policy.model import VLMPolicy
from vlmrl.policy.presets import is_hub_id, resolve_model
from vlmrl.policy.tiny import build_tiny_vlm

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache laid out as huggingface_hub writes it, holding one tiny VLM as tiny-org/tiny-vlm."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--tiny-org--tiny-vlm"
    build_tiny_vlm(repo / "snapshots" / REVISION, seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def test_what_reads_as_a_hub_id(tmp_path):
    assert is_hub_id("Qwen/Qwen2-VL-2B-Instruct") and is_hub_id("org/name@main")
    assert not is_hub_id("tiny") and not is_hub_id("runs/sft/") and not is_hub_id("/abs/x") and not is_hub_id("./a/b")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("org/name")  # an existing folder wins over the Hub
    finally:
        os.chdir(os.path.dirname(__file__))


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(offline):
    path = resolve_model("tiny-org/tiny-vlm")
    assert path == offline / "models--tiny-org--tiny-vlm" / "snapshots" / REVISION
    policy = VLMPolicy.load("tiny-org/tiny-vlm")  # the same resolution inside the loader
    assert policy.source == str(path)


def test_a_hub_id_missing_offline_is_one_line_naming_id_cache_and_fix(offline):
    with pytest.raises(UserError) as e:
        resolve_model("nobody/missing-vlm")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'nobody/missing-vlm'" in msg and str(offline) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "hf download nobody/missing-vlm" in msg


def test_local_folders_and_their_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))
    folder = build_tiny_vlm(tmp_path / "m", seed=0)
    assert resolve_model(str(folder)) == folder


def test_the_cli_takes_a_hub_id_for_model_and_policy(offline, tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(offline), HF_HUB_OFFLINE="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "vlmrl.cli", *a], capture_output=True, text=True, env=env)
    proc = run("eval", "NumberLine", "--policy", "tiny-org/tiny-vlm", "--episodes", "2", "--quiet",
               "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "success rate" in proc.stdout
    proc = run("sft", "NumberLine", "--model", "tiny-org/tiny-vlm", "--episodes", "2", "--steps", "1",
               "--batch-size", "2", "--out", str(tmp_path / "sft"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sft" / "config.json").is_file()
    proc = run("eval", "NumberLine", "--policy", "nobody/missing-vlm")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not in the Hugging Face cache" in proc.stderr
