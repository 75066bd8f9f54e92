"""Library progress bars stay quiet inside vlmrl's loads and saves, and are restored after."""

from transformers.utils import logging as hf_logging

from vlmrl.policy.model import VLMPolicy
from vlmrl.policy.tiny import build_tiny_vlm


def test_load_and_save_print_no_library_bars(tmp_path, capfd):
    folder = build_tiny_vlm(tmp_path / "m", seed=0)
    policy = VLMPolicy.load(folder)
    policy.save(tmp_path / "saved")
    VLMPolicy.load(tmp_path / "saved")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err[-500:]
    assert hf_logging.is_progress_bar_enabled()  # the user's own setting comes back


def test_a_disabled_setting_stays_disabled(tmp_path):
    folder = build_tiny_vlm(tmp_path / "m", seed=0)
    hf_logging.disable_progress_bar()
    try:
        VLMPolicy.load(folder)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_an_sft_run_with_checkpoints_prints_no_library_bars(tmp_path, capfd):
    from vlmrl.config import SFTConfig
    from vlmrl.sft import run_sft

    folder = build_tiny_vlm(tmp_path / "m", seed=0)
    run_sft(SFTConfig(model=str(folder), out_dir=str(tmp_path / "sft"), episodes=2, steps=2, batch_size=2,
                      checkpoint_every=1, progress=False))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err[-500:]
