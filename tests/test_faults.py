"""Faults injected into real runs of `vlmrl train`: SIGKILL at random points and mid-checkpoint,
non-finite losses, and a learning rate that blows the weights up.

What counts as "nothing lost": after every kill, each `checkpoint-N` folder on disk is complete and
the metrics up to the newest one are all there; after the final `--resume` the metrics, samples and
final weights equal those of a run that was never interrupted, bit for bit.

NaN injection: a test-only monkeypatch of `vlmrl.trainer.ppo_loss` that multiplies the real loss by
NaN on chosen training minibatches (those computed with gradients on). Everything after it -- the
all-reduced finite flag, the skip, the count, the stop after K, the checkpoints -- is the real trainer.
The blow-up test needs no patch at all: ppo.lr = 1e10.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmrl.trainer as trainer
from vlmrl.checkpoint import latest_checkpoint, list_checkpoints
from vlmrl.cli import main
from vlmrl.config import load_config, TrainConfig
from vlmrl.metrics import read_metrics

UPDATES = 3
RUN = {
    "task": "NumberLine", "num_envs": 2, "num_steps": 2, "total_updates": UPDATES, "seed": 11,
    "max_new_tokens": 8, "temperature": 1.0, "tensorboard": False, "log_samples": 2,
    "ppo": {"lr": 1e-3, "epochs": 1, "minibatch_size": 2, "grad_accum_steps": 1, "max_grad_norm": 1.0},
    "policy": {"finetune": "full", "train_vision": True},
}
TIMINGS = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.json"
    path.write_text(json.dumps(RUN))
    return path


@pytest.fixture(scope="module")
def reference(tiny_model, run_file, tmp_path_factory):
    """The same run, never interrupted (in this process: same code, same seeds)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(TrainConfig, str(run_file), {"model": str(tiny_model), "out_dir": str(out)})
    trainer.train(cfg, progress=False)
    return out


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(out / "metrics.jsonl")]


def _train_cmd(model: Path, out: Path, run_file: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vlmrl.cli", "train", "--out", str(out), "--quiet"]
    if resume:
        return cmd + ["--resume"]  # the run's own config.json
    return cmd + ["NumberLine", "--model", str(model), "--config", str(run_file)]


def _check_nothing_lost(out: Path, reference: Path) -> int:
    """Every checkpoint-N on disk is complete; the metrics up to the newest are the reference's."""
    named = sorted(p.name for p in out.glob("checkpoint-*"))
    assert named == sorted(p.name for _, p in list_checkpoints(out)), "a half-written checkpoint under a final name"
    newest = latest_checkpoint(out, clean=False)
    step = int(newest.name.split("-")[1]) if newest else 0
    if step:
        assert _rows(out)[:step] == _rows(reference)[:step]
    return step


def _finish_and_compare(model: Path, out: Path, run_file: Path, reference: Path) -> None:
    resume = (out / "config.json").exists()
    proc = subprocess.run(_train_cmd(model, out, run_file, resume), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".trash-*"))  # debris cleaned on resume
    assert _rows(out) == _rows(reference)
    assert (out / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    mine, theirs = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the run; True if it was still running (the kill really interrupted something)."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def test_sigkill_in_the_middle_of_checkpoint_writes(tiny_model, run_file, reference, tmp_path):
    out = tmp_path / "run"
    for target in (2, 3):  # kill while checkpoint-<target> is being written, then resume
        proc = subprocess.Popen(_train_cmd(tiny_model, out, run_file, resume=out.exists()),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(f".tmp-checkpoint-{target}-") for p in out.glob(".tmp-checkpoint-*")):
                break
            time.sleep(0.005)
        assert _kill(proc), "the run ended before the kill"
        # the half-written save is left on disk but is not a checkpoint; the previous one is
        assert latest_checkpoint(out, clean=False).name == f"checkpoint-{target - 1}"
        assert _check_nothing_lost(out, reference) == target - 1
    _finish_and_compare(tiny_model, out, run_file, reference)


def _metrics_inode(out: Path) -> int | None:
    try:
        return (out / "metrics.jsonl").stat().st_ino
    except FileNotFoundError:
        return None


def _run_seconds(reference: Path) -> float:
    """Wall time of the reference run's updates, first metrics row to last plus one update."""
    times = [r["time"] for r in read_metrics(reference / "metrics.jsonl")]
    return max(times[-1] - times[0], 0.0) * len(times) / max(len(times) - 1, 1)


def test_sigkill_at_random_times(tiny_model, run_file, reference, tmp_path):
    """Each kill lands at a random point of what is left of the run once it has opened its metrics
    (past the imports and the model load): in rollouts, updates or saves. The window is scaled by the
    reference run's own speed, so the kill lands mid-run on a fast idle machine and a loaded one alike."""
    rng = random.Random(20240611)
    out = tmp_path / "run"
    landed = []
    per_update = _run_seconds(reference) / UPDATES
    for _ in range(3):
        before = _metrics_inode(out)  # a fresh run creates the file, a resume replaces it
        left = UPDATES - _check_nothing_lost(out, reference) if out.exists() else UPDATES
        proc = subprocess.Popen(_train_cmd(tiny_model, out, run_file, resume=(out / "config.json").exists()),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and _metrics_inode(out) in (before, None):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.8) * per_update * max(left, 1))
        landed.append((_kill(proc), _check_nothing_lost(out, reference)))
    assert sum(alive for alive, _ in landed) >= 2, landed
    _finish_and_compare(tiny_model, out, run_file, reference)


def _error_lines(capsys) -> list[str]:
    """The CLI's own lines on stderr (transformers' loading bars also write there); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("vlmrl:")]


def _nan_on(monkeypatch, calls: set[int] | None = None, from_call: int | None = None) -> list[int]:
    """Make the training loss NaN on the given 1-based training minibatch calls; return the counter."""
    real, seen = trainer.ppo_loss, []

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # the post-update weight check: leave it honest
            return out
        seen.append(1)
        n = len(seen)
        if (calls and n in calls) or (from_call is not None and n >= from_call):
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(trainer, "ppo_loss", loss)
    return seen


def test_an_isolated_nan_is_skipped_and_counted(tiny_model, monkeypatch, tmp_path):
    _nan_on(monkeypatch, calls={2})  # update 1 has minibatches 1 and 2
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, dict(RUN, total_updates=2), {"model": str(tiny_model), "out_dir": str(out)})
    final = trainer.train(cfg, progress=False)
    assert [r["charts/nan_skipped"] for r in read_metrics(out / "metrics.jsonl")] == [1, 1]
    weights = load_file(final / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_k_nans_in_a_row_stop_with_one_line_and_keep_the_last_good_checkpoint(
    tiny_model, run_file, monkeypatch, capsys, tmp_path
):
    _nan_on(monkeypatch, from_call=5)  # updates 1-2 fine; update 3 skips both; update 4's first is the 3rd
    out = tmp_path / "run"
    code = main(["train", "NumberLine", "--model", str(tiny_model), "--out", str(out), "--config", str(run_file),
                 "--updates", "4", "--set", "max_nan_skips=3", "--quiet"])
    err = _error_lines(capsys)
    assert code == 1 and len(err) == 1 and "3 minibatches in a row" in err[0] and "checkpoint-3" in err[0], err
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["charts/nan_skipped"] for r in rows] == [0, 0, 2]
    assert latest_checkpoint(out).name == "checkpoint-3" and not (out / "final").exists()
    # update 3 took no step, so the kept weights are update 2's, and finite
    w2 = load_file(out / "checkpoint-2" / "policy" / "model.safetensors")
    w3 = load_file(out / "checkpoint-3" / "policy" / "model.safetensors")
    assert all(torch.equal(w2[k], w3[k]) and torch.isfinite(w3[k]).all() for k in w3)


@pytest.mark.parametrize("checkpoint_every", [1, 3])
def test_a_learning_rate_that_blows_up_stops_cleanly_and_saves_nothing_bad(tiny_model, run_file, capsys, tmp_path,
                                                                            checkpoint_every):
    # every 3: update 1 writes no checkpoint and is not scored; the next rollout's sampler refuses
    # the blown-up weights' scores (NonFiniteLogits) and the run stops there
    out = tmp_path / "run"
    code = main(["train", "NumberLine", "--model", str(tiny_model), "--out", str(out), "--config", str(run_file),
                 "--set", "ppo.lr=1e10", "ppo.lr_schedule=constant", "ppo.minibatch_size=4",
                 f"checkpoint_every={checkpoint_every}", "--quiet"])
    err = _error_lines(capsys)
    assert code == 1 and len(err) == 1 and "non-finite" in err[0] and "update 1" in err[0], err
    assert list_checkpoints(out) == [] and not (out / "final").exists()


def test_a_policy_whose_weights_blew_up_is_one_line_at_evaluation(tiny_model, tmp_path, capsys):
    from vlmrl.policy.model import VLMPolicy

    policy = VLMPolicy.load(tiny_model)
    with torch.no_grad():  # a text layer (the output embedding is tied, and saved as the input's)
        for name, param in policy.hf_model.named_parameters():
            if "layers.0.mlp" in name and "visual" not in name:
                param.fill_(float("nan"))
    policy.save(tmp_path / "broken")
    code = main(["eval", "NumberLine", "--policy", str(tmp_path / "broken"), "--episodes", "2", "--quiet"])
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1 and "NaN or +inf" in err[0], err
