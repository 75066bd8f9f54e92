"""MetricsLogger (JSON lines, TensorBoard, resume without gaps), the plot, the Wilson interval."""

import json
import math

import pytest
import torch
from PIL import Image

from vlmrl import metrics as M
from vlmrl.errors import UserError
from vlmrl.metrics import MetricsLogger, plot_learning_curve, read_metrics, wilson_interval


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / M.TB_DIR))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_json_lines_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(3):
            log.log(step, {M.SUCCESS_RATE: step / 4, M.APPROX_KL: torch.tensor(0.01 * step),
                           M.VALUE_LOSS: float("nan")})
            # flushed at once: readable while the logger is open
            assert len(read_metrics(tmp_path / M.METRICS_FILE)) == step + 1
    rows = read_metrics(tmp_path / M.METRICS_FILE)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2][M.SUCCESS_RATE] == 0.5 and rows[2][M.APPROX_KL] == pytest.approx(0.02)
    assert rows[0][M.VALUE_LOSS] is None  # non-finite -> null, the file stays strict JSON
    for line in (tmp_path / M.METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert tb_scalars(tmp_path, M.SUCCESS_RATE) == [(0, 0.0), (1, 0.25), (2, 0.5)]


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(6):
            log.log(step, {M.EPISODIC_RETURN: float(step)})
    with open(tmp_path / M.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "charts/episodic_re')  # torn by a crash
    # the checkpoint was taken at step 3: steps 4, 5 and the torn line go, then the run goes on
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        for step in range(4, 6):
            log.log(step, {M.EPISODIC_RETURN: 10.0 * step})
    rows = read_metrics(tmp_path / M.METRICS_FILE)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r[M.EPISODIC_RETURN] for r in rows] == [0, 1, 2, 3, 40, 50]


def test_resume_purges_tensorboard_events_after_the_step(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(5):
            log.log(step, {M.POLICY_LOSS: 1.0})
    with MetricsLogger(tmp_path, resume_step=2) as log:
        for step in range(3, 5):
            log.log(step, {M.POLICY_LOSS: 2.0})
    assert tb_scalars(tmp_path, M.POLICY_LOSS) == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]


def test_fresh_run_refuses_existing_metrics(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {M.ENTROPY: 1.0})
    with pytest.raises(UserError, match="resume"):
        MetricsLogger(tmp_path, tensorboard=False)


def test_bad_values_and_wandb_missing(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(TypeError, match="must be a number"):
            log.log(0, {M.ENTROPY: "high"})
        with pytest.raises(ValueError, match="reserved"):
            log.log(0, {"step": 1})
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install wandb"):
            MetricsLogger(tmp_path / "w", tensorboard=False, wandb=True)


def test_plot_learning_curve(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(10):
            log.log(step, {M.SUCCESS_RATE: step / 10, M.EPISODIC_RETURN: step - 5.0})
    out = plot_learning_curve(tmp_path / M.METRICS_FILE, tmp_path / "plots" / "curve.png", title="t")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 350)  # two panels of 5 x 3.5 in at 100 dpi
    with pytest.raises(UserError, match="none of"):
        plot_learning_curve(tmp_path / M.METRICS_FILE, tmp_path / "x.png", keys=["losses/nothing"])


@pytest.mark.parametrize("k, n, lo, hi", [
    # reference values of the 95% Wilson score interval (Newcombe 1998, Table I; Wikipedia)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (8, 10, 0.4902, 0.9433),
    (50, 100, 0.4038, 0.5962),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo99, hi99 = wilson_interval(8, 10, z=2.576)
    lo95, hi95 = wilson_interval(8, 10)
    assert lo99 < lo95 and hi99 > hi95
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    assert all(math.isfinite(x) for x in wilson_interval(1, 1))
