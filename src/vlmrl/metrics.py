"""Training metrics: JSON lines (the record of truth), TensorBoard, optional Weights & Biases.

``metrics.jsonl`` holds one object per ``log`` call: ``{"step": int, "time": float, "<name>": value}``
with CleanRL-style names (the constants below). Non-finite values are written as null so that the
file stays strict JSON. Each line is flushed as it is written.

On resume, ``MetricsLogger(run_dir, resume_step=s)`` first cuts the file back to the lines with
step <= s (the checkpoint's step), and TensorBoard purges its events after s, so a resumed run has
neither a gap nor duplicates.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmrl.errors import UserError
from vlmrl.files import filter_jsonl

# every name the trainer logs, one constant each (CleanRL's names where CleanRL has one)
EPISODES = "charts/episodes"
SUCCESS_RATE = "charts/success_rate"
EPISODIC_RETURN = "charts/episodic_return"
EPISODIC_LENGTH = "charts/episodic_length"
INVALID_ACTION_RATE = "charts/invalid_action_rate"
RESPONSE_LENGTH = "charts/response_length"
ENV_STEPS = "charts/env_steps"
ENV_STEPS_PER_SECOND = "charts/env_steps_per_second"
TOKENS_PER_SECOND = "charts/tokens_per_second"
UPDATE_SECONDS = "charts/update_seconds"
PPO_EPOCHS = "charts/ppo_epochs"
LEARNING_RATE = "charts/learning_rate"
NAN_SKIPPED = "charts/nan_skipped"
# group runs only: the mean over groups of the std of the episode returns within a group (0: no group
# had a better and a worse episode, so no learning signal), and the episodes cut by the step budget
GROUP_RETURN_STD = "charts/group_return_std"
EPISODES_CUT = "charts/episodes_cut"
LOSS = "losses/loss"
POLICY_LOSS = "losses/policy_loss"
VALUE_LOSS = "losses/value_loss"
ENTROPY = "losses/entropy"
APPROX_KL = "losses/approx_kl"
CLIPFRAC = "losses/clipfrac"
KL_REF = "losses/kl_ref"
EXPLAINED_VARIANCE = "losses/explained_variance"
EVAL_SUCCESS_RATE = "eval/success_rate"
EVAL_SUCCESS_CI95_LOW = "eval/success_ci95_low"
EVAL_SUCCESS_CI95_HIGH = "eval/success_ci95_high"
EVAL_EPISODIC_RETURN = "eval/episodic_return"
EVAL_INVALID_ACTION_RATE = "eval/invalid_action_rate"

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricsLogger:
    """Write metrics to ``<run_dir>/metrics.jsonl`` (+ ``<run_dir>/tb`` and wandb when asked).

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: also write TensorBoard events under ``<run_dir>/tb``.
        wandb: also log to Weights & Biases (must be installed; raises UserError otherwise).
        resume_step: the step of the checkpoint being resumed; None for a fresh run, which refuses
            a run directory that already has metrics rather than mix two runs in one file.
        wandb_project, wandb_run, config: passed to ``wandb.init`` (config: a plain dict).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        wandb: bool = False,
        resume_step: int | None = None,
        wandb_project: str | None = None,
        wandb_run: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                raise UserError(
                    f"{self.path} already has metrics: resume that run or choose a new output directory"
                )
        else:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at or after it that a crashed run left behind.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge)
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise UserError("wandb logging was asked for but wandb is not installed: "
                                "pip install wandb, or turn wandb off") from None
            self._wandb = wandb_lib.init(
                project=wandb_project, name=wandb_run, config=dict(config or {}),
                dir=str(self.run_dir), resume="allow" if resume_step is not None else None,
            )

    def log(self, step: int, metrics: Mapping[str, float | int | None]) -> None:
        """Record ``metrics`` at ``step``; values must be numbers (or None for 'not measured')."""
        row: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in metrics.items():
            if name in ("step", "time"):
                raise ValueError(f"{name!r} is reserved in metrics.jsonl")
            row[name] = _clean(name, value)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in row.items() if k not in ("step", "time") and v is not None}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: str | os.PathLike, max_step: int) -> int:
    """Keep only the complete lines with step <= ``max_step`` (atomically); return how many stay."""
    return filter_jsonl(path, lambda row: isinstance(row.get("step"), int) and row["step"] <= max_step)


def plot_learning_curve(
    metrics_path: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Iterable[str] = (SUCCESS_RATE, EPISODIC_RETURN),
    title: str | None = None,
) -> Path:
    """Plot each of ``keys`` present in the metrics file against step, one panel each, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            series[key] = points
    if not series:
        raise UserError(f"{metrics_path} has none of {', '.join(keys)} to plot: train for a few updates first")
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items(), strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_xlabel("update")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (z = 1.96: 95%); (0, 1) when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n successes.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _clean(name: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if hasattr(value, "item"):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- the machine a figure was measured on (the benchmarks' first line) -------------------------
def load_average() -> str:
    """The 1, 5 and 15 minute load averages as text; "n/a" where the OS has none."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def run_seed_processes(script: str | os.PathLike, args: list[str], seeds: list[int], jobs: int, out: Path,
                       name: str) -> None:
    """``python script *args --seed S --out <out>/seed-S`` for every seed, each its own process (output in
    ``<out>/seed-S.log``), at most ``jobs`` at a time, one OpenMP/MKL thread each (tiny matmuls on
    contended threads are slower than on one). A seed that fails is one ``UserError`` naming its log.
    The benchmarks that report figures over seeds (learning.py, estimators.py) run their seeds so."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(seed: int) -> tuple[int, int]:
        cmd = [sys.executable, str(Path(script).resolve()), *args, "--seed", str(seed), "--out", str(out / f"seed-{seed}")]
        with open(out / f"seed-{seed}.log", "w") as log:
            code = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        print(f"[{name}] seed {seed}: {'done' if code == 0 else f'failed (exit {code})'}, "
              f"log {out / f'seed-{seed}.log'}", flush=True)
        return seed, code

    print(f"{len(seeds)} seeds ({' '.join(map(str, seeds))}), {jobs} at a time, one process each; logs in "
          f"{out}/seed-*.log", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = dict(pool.map(one, seeds))
    failed = [s for s in seeds if codes[s] != 0]
    if failed:
        raise UserError(f"seed(s) {', '.join(map(str, failed))} failed: see " +
                        ", ".join(str(out / f"seed-{s}.log") for s in failed))


def machine_line(details: str) -> str:
    """``"<UTC date>; <CPU model>, <n> logical cores, <details>, load average <1 5 15 min>"``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{date}; {cpu}, {os.cpu_count()} logical cores, {details}, load average {load_average()}"
