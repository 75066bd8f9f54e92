"""Atomic checkpoints and RNG state capture.

Layout of a run directory::

    checkpoint-<step>/      complete checkpoints only (meta.json + what the writer wrote)
    latest                  one line: the name of the newest complete checkpoint
    .tmp-checkpoint-*       a save in progress, or the debris of a crash: never loaded

A save writes everything into a temporary folder beside the final one, fsyncs the files and the
folder, renames it to ``checkpoint-<step>`` (atomic on POSIX within one file system), and only then
replaces the ``latest`` pointer (write a temporary file, fsync, ``os.replace``). A crash at any
point therefore leaves either the previous checkpoint or the new one, never a half one under a
``checkpoint-`` name. Old checkpoints are renamed away before they are deleted, for the same reason.

One run saves into a run directory at a time. Within it, several ranks may write parts of one save
(``ranks=``): all write into the same temporary folder, and rank 0 alone commits it once every rank
has written, so a checkpoint never lacks the part of a slower rank (the ranks share one file system;
rank 0's fsync covers their files).
torch is imported lazily so that a process that only writes its own files does not pay for it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlmrl.files import write_atomic

PREFIX = "checkpoint-"
LATEST = "latest"
META = "meta.json"
STATE = "state.pt"
_TMP = ".tmp-" + PREFIX
_TRASH = ".trash-" + PREFIX
_NAME = re.compile(rf"^{PREFIX}(\d+)$")

Writer = Callable[[Path], None]


class Ranks(Protocol):
    """The processes of one save, e.g. an ``accelerate.Accelerator``."""

    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any] | Writer,
    keep: int | None = 3,
    *,
    ranks: Ranks | None = None,
    token: str | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it; return its path.

    Args:
        run_dir: the run directory (created if missing).
        step: the training step (update index) the checkpoint belongs to, >= 0.
        state: a dict saved with ``torch.save`` as ``state.pt`` (read back with ``load_state``),
            or a function that writes whatever it likes into the folder it is given (e.g. a
            model's ``save_pretrained`` plus ``torch.save`` of the optimizer).
        keep: keep only the ``keep`` newest checkpoints (by step); None keeps all.
        ranks: for a save that several processes write: every rank calls this with the same
            arguments; each runs the writer into the same temporary folder (a dict is written by
            the main rank only), and the main rank commits once all have written. It returns on
            every rank once the checkpoint is committed.
        token: names the temporary folder ``.tmp-checkpoint-<step>-<token>``; required with
            ``ranks`` (the ranks must agree on it), unique per call by default.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    if ranks is not None and not token:
        raise ValueError("a save by several ranks needs a token they all share")
    main = ranks is None or ranks.is_main_process
    barrier = ranks.wait_for_everyone if ranks is not None else (lambda: None)
    run = Path(run_dir)
    final = run / f"{PREFIX}{step}"
    tmp = run / f"{_TMP}{step}-{token or f'{os.getpid()}-{uuid.uuid4().hex[:8]}'}"
    if main:
        run.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    barrier()  # the folder exists before any rank writes into it
    try:
        if callable(state):
            state(tmp)
        elif main:
            import torch

            torch.save(dict(state), tmp / STATE)
        barrier()  # every rank has written its part
        if main:
            # The marker goes last: a checkpoint folder without it is never trusted.
            (tmp / META).write_text(json.dumps({"step": step, "format": 1}) + "\n")
            _fsync_tree(tmp)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    if main:
        if final.exists():  # saving the same step again (e.g. after a resume): replace it
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(run)
        write_atomic(run / LATEST, final.name + "\n")
        if keep is not None:
            for _, path in list_checkpoints(run)[:-keep]:
                if path != final:
                    _remove(path)
    barrier()  # no rank goes on (or reads ``latest``) before the commit
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``run_dir`` as (step, path), oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = []
    for path in run.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and _is_complete(path, int(m.group(1))):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike, clean: bool = True) -> Path | None:
    """The newest complete checkpoint, or None.

    The ``latest`` pointer wins when it names a complete checkpoint; otherwise the highest step
    found. With ``clean`` the debris of interrupted saves (``.tmp-``/``.trash-`` folders) is
    deleted; call it when no save is running (at start-up, before resuming).
    """
    run = Path(run_dir)
    if not run.is_dir():
        return None
    if clean:
        for path in run.iterdir():
            if path.name.startswith((_TMP, _TRASH, f".{LATEST}.")):  # debris of interrupted saves
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    complete = list_checkpoints(run)
    if not complete:
        return None
    pointer = run / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        for _, path in complete:
            if path.name == name:
                return path
    return complete[-1][1]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step recorded in a checkpoint folder."""
    return int(json.loads((Path(path) / META).read_text())["step"])


def load_state(checkpoint: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """The dict saved by ``save_checkpoint(..., state=dict)``, loaded onto the CPU.

    ``weights_only=True`` (torch's safe loader) suffices for tensors, state dicts and the output of
    ``capture_rng_state``; pass False only for checkpoints you wrote yourself with other objects.
    """
    import torch

    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=weights_only)


# --- random number generators -------------------------------------------------------------------

def capture_rng_state(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every RNG state needed to continue a run exactly, as plain data ``torch.save`` can store.

    Global ones: Python ``random``, ``np.random``, torch CPU and (if present) CUDA. ``generators``
    names explicit ones: ``np.random.Generator`` (e.g. each env's ``np_random``) or
    ``torch.Generator`` (e.g. the minibatch shuffler).
    """
    import torch

    legacy = np.random.get_state(legacy=False)
    legacy["state"] = {"key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"])}
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": legacy,
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if isinstance(gen, np.random.Generator):
            state["generators"][name] = {"kind": "numpy", "state": gen.bit_generator.state}
        elif isinstance(gen, torch.Generator):
            state["generators"][name] = {"kind": "torch", "state": gen.get_state()}
        else:
            raise TypeError(f"generator {name!r} is a {type(gen).__name__}, not a numpy or torch Generator")
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> None:
    """Put back what ``capture_rng_state`` captured; ``generators`` are restored in place by name."""
    import torch

    random.setstate(_as_tuple(state["python"]))
    legacy = dict(state["numpy"])
    legacy["state"] = {"key": np.asarray(legacy["state"]["key"], dtype=np.uint32),
                       "pos": legacy["state"]["pos"]}
    np.random.set_state(legacy)
    torch.set_rng_state(state["torch"])
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"the checkpoint has no RNG state for generator {name!r} (has {sorted(saved)})")
        kind, value = saved[name]["kind"], saved[name]["state"]
        if isinstance(gen, np.random.Generator) and kind == "numpy":
            gen.bit_generator.state = value
        elif isinstance(gen, torch.Generator) and kind == "torch":
            gen.set_state(value)
        else:
            raise TypeError(f"generator {name!r} is a {type(gen).__name__} but was saved as {kind}")


# --- helpers ---------------------------------------------------------------------------------------

def _is_complete(path: Path, step: int) -> bool:
    try:
        return checkpoint_step(path) == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no crash leaves a partly deleted one under its name."""
    trash = path.with_name(f"{_TRASH}{path.name[len(PREFIX):]}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_tuple(x: Any) -> Any:
    # torch.save keeps tuples, but a JSON round trip would turn them into lists.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
