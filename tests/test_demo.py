"""``vlmrl demo``: the SFT policy evaluated in a second process beside PPO gives the figures of the
serial run."""

import json

from vlmrl.demo import run_demo

SMALL = {"sft": {"episodes": 6, "steps": 3, "batch_size": 4}, "episodes": 6,
         "train_kw": {"num_envs": 8, "num_steps": 2, "total_updates": 2, "max_new_tokens": 24}}


def test_parallel_evaluation_prints_the_serial_figures(tiny_numberline, tmp_path, capsys):
    runs = {}
    for parallel in (False, True):
        out = tmp_path / f"parallel-{parallel}"
        runs[parallel] = run_demo(out, seed=1, progress=False, model=tiny_numberline, parallel=parallel, **SMALL)
        assert json.loads((out / "demo.json").read_text())["before"] == runs[parallel]["before"]
    text = capsys.readouterr().out
    assert "evaluate SFT (in a second process, beside PPO)" in text
    for key in ("before", "after"):
        assert runs[True][key] == runs[False][key]
    assert runs[True]["before"]["episodes"] == 6
    assert set(runs[True]["seconds"]) == set(runs[False]["seconds"])
