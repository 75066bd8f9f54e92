"""Atomic checkpoints: completeness under a real SIGKILL, pruning, the latest pointer, RNG states."""

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from vlmrl.checkpoint import (
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    restore_rng_state,
    save_checkpoint,
)


def test_save_dict_load_and_prune(tmp_path):
    for step in range(5):
        path = save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
        assert path.name == f"checkpoint-{step}"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-4" and checkpoint_step(latest) == 4
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-4"
    state = load_state(latest)
    assert state["step"] == 4 and torch.equal(state["w"], torch.full((3,), 4.0))
    # nothing but the checkpoints and the pointer is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4", "latest"]


def test_writer_function_and_resaving_a_step(tmp_path):
    save_checkpoint(tmp_path, 7, lambda d: (d / "model.bin").write_bytes(b"old"))
    save_checkpoint(tmp_path, 7, lambda d: (d / "model.bin").write_bytes(b"new"))
    assert (latest_checkpoint(tmp_path) / "model.bin").read_bytes() == b"new"
    assert len(list_checkpoints(tmp_path)) == 1


def test_failed_writer_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"ok": True})

    def broken(folder):
        (folder / "half").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, broken)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_half_written_debris_is_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 4, {"step": 4})
    tmp = tmp_path / ".tmp-checkpoint-5-1234-abcd"  # a crash in the middle of writing step 5
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"\x80truncated")
    unmarked = tmp_path / "checkpoint-6"  # no meta.json: never trusted (e.g. copied by hand, half)
    unmarked.mkdir()
    (tmp_path / "latest").write_text("checkpoint-9\n")  # a pointer to something that is not there
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not tmp.exists()
    assert load_state(tmp_path / "checkpoint-4")["step"] == 4


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


# A child process that saves checkpoints in a loop. From step 3 on, its writer announces that it
# is in the middle of a save (one file written, the other not yet) and waits to be killed there.
CHILD = textwrap.dedent("""
    import sys, time
    from vlmrl.checkpoint import save_checkpoint
    run_dir, stall = sys.argv[1], sys.argv[2] == "stall"
    def writer(step):
        def write(folder):
            (folder / "a.bin").write_bytes(step.to_bytes(4, "little") * 50_000)
            if stall and step >= 3:
                print("MIDWRITE", step, flush=True)
                time.sleep(60)
            (folder / "b.bin").write_bytes(step.to_bytes(4, "little") * 50_000)
        return write
    for step in range(1, 100_000):
        save_checkpoint(run_dir, step, writer(step), keep=2)
        print("SAVED", step, flush=True)
""")


def run_child(run_dir, mode):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), mode],
                            stdout=subprocess.PIPE, text=True)


def assert_complete(run_dir, min_step):
    latest = latest_checkpoint(run_dir)
    assert latest is not None
    step = checkpoint_step(latest)
    assert step >= min_step
    for name in ("a.bin", "b.bin"):
        data = (latest / name).read_bytes()
        assert data == step.to_bytes(4, "little") * 50_000, f"{name} of step {step} is incomplete"
    assert not any(p.name.startswith((".tmp", ".trash")) for p in run_dir.iterdir())
    return step


def test_sigkill_in_the_middle_of_a_save(tmp_path):
    child = run_child(tmp_path, "stall")
    try:
        lines = []
        for line in child.stdout:
            lines.append(line.split())
            if line.startswith("MIDWRITE"):
                break
        assert lines[-1] == ["MIDWRITE", "3"], lines
        assert any(p.name.startswith(".tmp-checkpoint-3") for p in tmp_path.iterdir())
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert assert_complete(tmp_path, 2) == 2


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.04, 0.1])
def test_sigkill_at_random_moments(tmp_path, delay):
    child = run_child(tmp_path, "loop")
    try:
        child.stdout.readline()  # the first save is done: from here, kill anywhere
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    step = assert_complete(tmp_path, 1)
    # the run goes on from there
    save_checkpoint(tmp_path, step + 1, lambda d: None)
    assert checkpoint_step(latest_checkpoint(tmp_path)) == step + 1


# Two real gloo ranks save one checkpoint together; rank 1 writes its part late.
TWO_RANKS = textwrap.dedent("""
    import sys, time
    import torch.distributed as dist
    from vlmrl.checkpoint import latest_checkpoint, save_checkpoint
    dist.init_process_group("gloo")
    rank, run_dir = dist.get_rank(), sys.argv[1]

    class Ranks:
        is_main_process = rank == 0
        def wait_for_everyone(self):
            dist.barrier()

    def write(folder):
        if rank == 1:
            time.sleep(1.0)  # rank 0 must not commit before this part is in
        (folder / f"rank{rank}.bin").write_bytes(bytes([rank]) * 1000)

    for step in (1, 2):
        final = save_checkpoint(run_dir, step, write, keep=1, ranks=Ranks(), token=f"shared{step}")
        # returned on this rank: the checkpoint is already committed
        print(rank, step, latest_checkpoint(run_dir, clean=False) == final, flush=True)
    dist.destroy_process_group()
""")


def test_several_ranks_write_one_checkpoint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)))
             for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [["0", "1", "True", "0", "2", "True"], ["1", "1", "True", "1", "2", "True"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "latest"]
    latest = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in latest.iterdir()) == ["meta.json", "rank0.bin", "rank1.bin"]
    assert (latest / "rank1.bin").read_bytes() == b"\x01" * 1000


def test_rng_state_round_trip(tmp_path):
    env_rng = np.random.default_rng(1)
    shuffle = torch.Generator().manual_seed(2)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    gens = {"env0": env_rng, "shuffle": shuffle}
    save_checkpoint(tmp_path, 0, {"rng": capture_rng_state(gens)})

    def draw():
        return (random.random(), np.random.rand(), torch.rand(1).item(), env_rng.random(),
                torch.randperm(10, generator=shuffle).tolist())

    first = draw()
    draw()
    # weights_only loading works: the state is plain data and tensors
    restore_rng_state(load_state(latest_checkpoint(tmp_path))["rng"], gens)
    assert draw() == first


def test_rng_state_errors():
    state = capture_rng_state({"a": np.random.default_rng(0)})
    with pytest.raises(KeyError, match="'b'"):
        restore_rng_state(state, {"b": np.random.default_rng(0)})
    with pytest.raises(TypeError, match="saved as numpy"):
        restore_rng_state(state, {"a": torch.Generator()})
    with pytest.raises(TypeError, match="not a numpy or torch Generator"):
        capture_rng_state({"x": random.Random()})
