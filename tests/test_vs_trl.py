"""benchmarks/vs_trl.py (vlmrl's GRPO against TRL's GRPOTrainer) runs end to end with a tiny budget.

Each side runs in its own subprocess, as in a real measurement; the test needs trl (the `bench`
extra, installed by scripts/test.sh) and skips with a message without it.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_without_trl_it_says_so_in_one_line_and_exits_2(monkeypatch, capsys):
    vs_trl = load_script()
    monkeypatch.setitem(sys.modules, "trl", None)  # find_spec then reports it missing
    with pytest.raises(SystemExit) as exit_info:
        vs_trl.main(["--model", "unused"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "trl is not installed" in printed[0]


@pytest.mark.slow
def test_both_sides_run_the_same_work_and_report_every_figure(tiny_numberline, tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install -c constraints.txt -e '.[bench]'): vs_trl.py not run")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    vs_trl = load_script()
    out = tmp_path / "vs_trl.json"
    summary = vs_trl.main(["--model", tiny_numberline, "--steps", "2", "--prompts", "2", "--group-size", "4",
                           "--minibatch-size", "4", "--grad-accum-steps", "2", "--max-new-tokens", "6",
                           "--sft-steps", "0", "--eval-episodes", "2", "--threads", "1", "--repeats", "1", "--json", str(out),
                           "--sampler", "cdf"])
    printed = capsys.readouterr().out
    for text in ("machine:", "| vlmrl |", "| trl |", "check, tokens generated per step", "check, loss",
                 "loss_type='luspo'", "vlmrl / TRL end-to-end", "samples per CPU-second", "load average", "trl 1.16.0",
                 "sampler='cdf'"):
        assert text in printed, text
    (result,) = summary["models"].values()
    assert json.loads(out.read_text())["models"].keys() == summary["models"].keys()
    for side in ("vlmrl", "trl"):
        (r,) = result["results"][side]
        assert r["steps"] == 2 and r["samples_per_step"] == 8 and r["samples_per_second"] > 0
        assert r["rows_per_generate"] == [8, 8]  # one batched generate of prompts x group per step
        assert all(8 <= n <= 8 * 6 for n in r["tokens_per_step"])  # 1..max_new_tokens per answer
        assert r["peak_rss_mb"] > 100 and r["threads"] == [1]
        assert 0.0 <= r["held_out"]["success_rate"] <= 1.0
