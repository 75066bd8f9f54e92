"""Two real gloo ranks under `accelerate launch` running the real `vlmrl train` command.

The shipped config `configs/accelerate/cpu_ddp.yaml` starts the processes. A small wrapper script
adds a `train(callback=...)` that saves what each rank holds after every update; then the test
checks the rank count, that both ranks end with bit-identical weights (gradients all-reduced),
that the weights moved, and that the logged episode count is the sum of the ranks' own counts.
Another run makes only rank 1's loss NaN: both ranks must skip that minibatch together (a lone
skip would leave rank 0 waiting in the all-reduce forever) and still end identical. A third dies on
both ranks after update 1's checkpoint and is resumed: it must end exactly as the run never stopped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmrl.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"

# Runs the real CLI; every rank saves its own view after each update. With VLMRL_TEST_NAN_RANK set,
# that rank's training loss is NaN on its first minibatch (the other ranks' losses stay finite). With
# VLMRL_TEST_CRASH_AT=N every rank dies at once after update N (before its checkpoint), as a crash would.
WRAPPER = '''
import functools, os, sys
import torch
import vlmrl.trainer as trainer
from vlmrl.cli import main

report_dir = os.environ["VLMRL_TEST_REPORTS"]

def report(r):
    # written whole or not at all: when one rank crashes the launcher may kill the other mid-save
    path = os.path.join(report_dir, f"rank{r.rank}-update{r.update}.pt")
    torch.save({"rank": r.rank, "world_size": r.world_size, "episodes": r.episodes,
                "env_steps": r.env_steps,
                "weights": {n: p.detach().cpu().clone() for n, p in r.policy.named_parameters()}},
               path + ".part")
    os.replace(path + ".part", path)
    if r.update == int(os.environ.get("VLMRL_TEST_CRASH_AT", "0")):
        os._exit(17)

nan_rank = os.environ.get("VLMRL_TEST_NAN_RANK")
if nan_rank is not None and int(os.environ["RANK"]) == int(nan_rank):
    real_loss, calls = trainer.ppo_loss, []

    def nan_first_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # training minibatches only, not the post-update check
            calls.append(1)
            if len(calls) == 1:
                return out._replace(loss=out.loss * float("nan"))
        return out

    trainer.ppo_loss = nan_first_loss

trainer.train = functools.partial(trainer.train, callback=report)
sys.exit(main(sys.argv[1:]))
'''

RUN = {
    "num_envs": 2, "num_steps": 2, "total_updates": 2, "seed": 3, "max_new_tokens": 8,
    "temperature": 1.0, "tensorboard": False, "log_samples": 1,
    "ppo": {"lr": 1e-3, "epochs": 1, "minibatch_size": 2, "grad_accum_steps": 1, "max_grad_norm": 1.0},
    "policy": {"finetune": "full", "train_vision": True},
}


def _free_port() -> int:
    with socket.socket() as s:  # other runs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, model: Path, nan_rank: int | None = None, crash_at: int | None = None,
            resume: bool = False) -> tuple[Path, dict[tuple[int, int], dict]]:
    """Run `vlmrl train` on two ranks into tmp_path/run; return it and what each rank reported."""
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(RUN))
    reports = tmp_path / ("reports-resumed" if resume else "reports")
    reports.mkdir()
    out = tmp_path / "run"
    env = dict(os.environ, VLMRL_TEST_REPORTS=str(reports), OMP_NUM_THREADS="1")
    if nan_rank is not None:
        env["VLMRL_TEST_NAN_RANK"] = str(nan_rank)
    if crash_at is not None:
        env["VLMRL_TEST_CRASH_AT"] = str(crash_at)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
           "--main_process_port", str(_free_port()), str(script), "train", "--out", str(out), "--quiet"]
    cmd += ["--resume"] if resume else ["Blackjack", "--model", str(model), "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert (proc.returncode != 0) == (crash_at is not None), proc.stderr[-3000:]
    found = {}
    for path in reports.glob("rank*-update*.pt"):
        rank, update = path.stem.removeprefix("rank").split("-update")
        found[int(rank), int(update)] = torch.load(path, weights_only=True)
    return out, found


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("uninterrupted"), tiny_model)


def test_two_gloo_ranks_end_identical_and_episodes_add_up(uninterrupted):
    out, reports = uninterrupted
    assert sorted(reports) == [(0, 1), (0, 2), (1, 1), (1, 2)]  # two ranks really ran, two updates each
    assert {r["world_size"] for r in reports.values()} == {2}

    w0, w1 = reports[0, 2]["weights"], reports[1, 2]["weights"]
    assert w0.keys() == w1.keys() and len(w0) > 10
    assert [n for n in w0 if not torch.equal(w0[n], w1[n])] == []
    moved = [n for n in w0 if not torch.equal(w0[n], reports[0, 1]["weights"][n])]
    assert len(moved) > 10  # the second update changed the weights (identical, but not trivially so)

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for update, row in zip((1, 2), rows):
        assert row["charts/episodes"] == reports[0, update]["episodes"] + reports[1, update]["episodes"]
        assert reports[0, update]["env_steps"] == reports[1, update]["env_steps"] == 2 * 2
    assert rows[-1]["charts/env_steps"] == 2 * 2 * 2 * 2  # updates x ranks x envs x steps
    assert sum(r["charts/episodes"] for r in rows) > 0  # Blackjack ends fast: the sum is not 0 + 0
    # one checkpoint writer: complete checkpoints only, no stray temporary folders from rank 1
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]


def test_nan_on_one_rank_skips_the_minibatch_on_both(tiny_model, tmp_path):
    out, reports = _launch(tmp_path, tiny_model, nan_rank=1)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["charts/nan_skipped"] for r in rows] == [1, 1]  # counted once, for the pair of ranks
    w0, w1 = reports[0, 2]["weights"], reports[1, 2]["weights"]
    assert [n for n in w0 if not torch.equal(w0[n], w1[n])] == []
    assert all(torch.isfinite(w).all() for w in w0.values())


TIMINGS = ("charts/env_steps_per_second", "charts/tokens_per_second", "charts/update_seconds", "time")


def test_two_ranks_resumed_after_a_crash_end_as_if_never_stopped(tiny_model, uninterrupted, tmp_path):
    out, crashed = _launch(tmp_path, tiny_model, crash_at=2)
    assert {(0, 1), (1, 1)} <= crashed.keys()  # (the launcher may stop one rank before it reports update 2)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    # both ranks wrote into the one checkpoint: the optimizer once, the RNGs of each rank
    assert {"optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (out / "checkpoint-1" / "accelerate").iterdir()}

    out, resumed = _launch(tmp_path, tiny_model, resume=True)
    never_out, never = uninterrupted
    assert sorted(resumed) == [(0, 2), (1, 2)]  # only update 2 ran again, on both ranks
    for rank in (0, 1):  # each rank continued its own envs and generators
        mine, theirs = resumed[rank, 2], never[rank, 2]
        assert (mine["episodes"], mine["env_steps"]) == (theirs["episodes"], theirs["env_steps"])
        assert [n for n in theirs["weights"] if not torch.equal(mine["weights"][n], theirs["weights"][n])] == []

    def rows(run):
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(run / "metrics.jsonl")]

    assert rows(out) == rows(never_out) and len(rows(out)) == 2
    assert (out / "samples.jsonl").read_text() == (never_out / "samples.jsonl").read_text()
