import json
import subprocess
import sys

from vlmrl.cli import main


def test_eval_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "EZPoints", "--policy", "expert", "--episodes", "5", "--json", str(out), "--quiet"]) == 0
    assert "success rate" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["success_rate"] == 1.0 and data["episodes"] == 5 and len(data["success_ci95"]) == 2


def test_render_writes_pngs(tmp_path):
    from PIL import Image

    assert main(["render", "EZPoints", "--seed", "1", "--out", str(tmp_path), "--steps", "2"]) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size[0] > 300  # observation plus the prompt beside it


def test_unknown_task_is_one_line_and_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "vlmrl.cli", "eval", "Chess"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["vlmrl: error: unknown task 'Chess': choose one of NumberLine, EZPoints, Points24, Blackjack, ALFWorld, ALFWorld-THOR"]


def test_bad_number_is_rejected_by_argparse():
    proc = subprocess.run([sys.executable, "-m", "vlmrl.cli", "eval", "NumberLine", "--episodes", "-3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "positive" in proc.stderr and "Traceback" not in proc.stderr


def _subcommands():
    from vlmrl.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    return sorted(sub.choices)


def test_every_help_prints_and_exits_0(capsys):
    import pytest

    commands = _subcommands()
    assert {"demo", "sft", "train", "eval", "render"} <= set(commands)
    for argv in [["--help"]] + [[c, "--help"] for c in commands]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        out = capsys.readouterr().out
        assert done.value.code == 0, argv
        assert out.startswith("usage: vlmrl"), (argv, out[:200])
