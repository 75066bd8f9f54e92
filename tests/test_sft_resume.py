"""`vlmrl sft --resume`: a run killed with SIGKILL and resumed ends bit for bit where an
uninterrupted run with the same settings ends (weights, losses, summary); bad resumes are one line.

Like tests/test_faults.py for `vlmrl train`: the real CLI in a subprocess, killed at a random point
of what is left of the run once its first checkpoint exists, the window scaled by the reference
run's own speed. The tiny model gets attention dropout, so that a resume which did not restore the
torch RNG (dropout masks) would end on other weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmrl.checkpoint import latest_checkpoint, list_checkpoints
from vlmrl.cli import main
from vlmrl.errors import UserError
from vlmrl.policy.tiny import build_tiny_vlm, task_texts
from vlmrl.sft import CONFIG_FILE, LOSSES_FILE, STATE_FILE, SFTConfig, collect_demonstrations, run_sft, saved_config
from vlmrl.tasks import get_task

STEPS, EVERY = 20, 3
SETTINGS = ["NumberLine", "--episodes", "4", "--steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3",
            "--checkpoint-every", str(EVERY), "--random-fraction", "0.3", "--seed", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp("tiny"), texts=task_texts(episodes=3, max_steps=3, tasks=["NumberLine"]))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.1  # training then draws from the torch RNG
    (path / "config.json").write_text(json.dumps(config))
    return path


def _sft(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", *SETTINGS, "--model", str(tiny), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The run never interrupted (in this process: same code, same settings)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_sft(tiny, out)) == 0
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _same_run(out: Path, reference: Path) -> None:
    mine, theirs = _weights(out), _weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / LOSSES_FILE).read_text()) == json.loads((reference / LOSSES_FILE).read_text())

    def summary(path: Path) -> dict:  # all but this process's timing and the folder's name
        s = json.loads((path / "sft_summary.json").read_text())
        del s["seconds"], s["config"]["out_dir"]
        return s

    assert summary(out) == summary(reference) and summary(out)["steps"] == STEPS


def _seconds_per_step(reference: Path) -> float:
    """From the mtimes of the reference's kept checkpoints (EVERY steps apart)."""
    times = sorted((p / "meta.json").stat().st_mtime for _, p in list_checkpoints(reference / "checkpoints"))
    return max(times[-1] - times[0], 0.0) / (EVERY * (len(times) - 1))


def test_sigkill_mid_run_then_resume_is_bit_identical(tiny, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vlmrl.cli", *_sft(tiny, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.005)
    first = list_checkpoints(out / "checkpoints")[0][0] if list_checkpoints(out / "checkpoints") else 0
    # a seeded random point of the first half of the steps left (in a step or a save), scaled by the
    # reference's speed, so the kill lands mid-run on a loaded machine and an idle one alike
    time.sleep(random.Random(20240612).uniform(0.05, 0.5) * _seconds_per_step(reference) * (STEPS - first))
    alive = proc.poll() is None
    if alive:  # never signal a pid already reaped
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert alive and first >= EVERY and not (out / "sft_summary.json").exists(), "the run ended before the kill"

    # nothing lost: the newest checkpoint holds the reference's losses up to its step
    kept = latest_checkpoint(out / "checkpoints", clean=False)
    step = int(kept.name.split("-")[1])
    state = torch.load(kept / STATE_FILE, weights_only=True)
    assert state["step"] == step and state["losses"] == json.loads((reference / LOSSES_FILE).read_text())[:step]

    # the same command line plus --resume: the given settings equal the saved ones, so it is accepted
    done = subprocess.run([sys.executable, "-m", "vlmrl.cli", *_sft(tiny, out, "--resume")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {out} from checkpoint-{step}" in done.stdout
    # and training went on from there (its progress bar's first line), not from step 0
    assert f"| {step}/{STEPS} [" in done.stderr and f"| 0/{STEPS} [" not in done.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # debris cleaned
    _same_run(out, reference)


def _started_only(reference: Path, out: Path) -> Path:
    """A run folder as a kill before the first checkpoint leaves it: only the saved config."""
    out.mkdir()
    shutil.copy(reference / CONFIG_FILE, out / CONFIG_FILE)
    return out


def test_resume_before_any_checkpoint_starts_from_step_0(reference, tmp_path, capsys):
    out = _started_only(reference, tmp_path / "run")
    assert main(["sft", "--out", str(out), "--resume"]) == 0  # no settings given: the saved ones
    assert "from step 0" in capsys.readouterr().out
    _same_run(out, reference)
    # resuming the finished run does nothing and changes nothing
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["sft", "--out", str(out), "--resume"]) == 0
    assert "finished" in capsys.readouterr().out and (out / "model.safetensors").stat().st_mtime_ns == before


def test_lora_resume_from_a_checkpoint_is_bit_identical(tiny, tmp_path):
    """Python API. A LoRA checkpoint is a peft adapter folder naming its base model."""
    cfg = SFTConfig(model=str(tiny), out_dir=str(tmp_path / "ref"), episodes=2, steps=8, batch_size=4, warmup_steps=2,
                    lr=1e-2, finetune="lora", checkpoint_every=3, progress=False, seed=1)
    ref = run_sft(cfg)
    # what a kill after step 6 leaves: the config and the checkpoints; the epoch has 5 examples, so
    # one of its order is still pending there
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(ref / CONFIG_FILE, out / CONFIG_FILE)
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    assert (out / "checkpoints" / "checkpoint-6" / "adapter_config.json").is_file()
    steps: list[int] = []
    run_sft(dataclasses.replace(cfg, out_dir=str(out)), resume=True, callback=lambda step, _: steps.append(step))
    assert steps == [7, 8]  # it went on from checkpoint-6, it did not start again
    mine, theirs = _weights(out), _weights(ref)  # the adapters merged into plain weights
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / LOSSES_FILE).read_text()) == json.loads((ref / LOSSES_FILE).read_text())


def _error_line(capsys) -> str:
    """The CLI's one line on stderr (transformers' loading bars also write there); no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vlmrl:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_bad_resumes_are_one_line_errors(tiny, reference, tmp_path, capsys):
    assert main(["sft", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no SFT run to resume" in _error_line(capsys)

    out = _started_only(reference, tmp_path / "run")
    # a setting that differs would be ignored or break the continuation: each one is named; equal ones pass
    assert main(["sft", "EZPoints", "--out", str(out), "--resume", "--lr", "0.01", "--steps", str(STEPS)]) == 2
    line = _error_line(capsys)
    assert "lr=0.01 (the run has 0.003)" in line and "task='EZPoints'" in line and "steps=" not in line

    # a fresh run into a folder that holds one would mix two runs
    assert main(_sft(tiny, out)) == 2
    assert "already holds an SFT run" in _error_line(capsys) and os.listdir(out) == [CONFIG_FILE]
    assert main(["sft", "--out", str(tmp_path / "new")]) == 2 and "needs a TASK" in _error_line(capsys)


def test_resume_refuses_other_demonstrations(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("sft_summary.json", "config.json"):  # unfinished again: back to its newest checkpoint
        (out / name).unlink()
    other = collect_demonstrations(get_task("NumberLine"), 2, seed=9)
    with pytest.raises(UserError, match="demonstrations differ"):
        run_sft(saved_config(out), resume=True, demos=other)
