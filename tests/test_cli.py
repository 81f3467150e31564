"""The ``ponder`` command line, the demo, and the README's set-up commands."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl import cli
from refimpl.commands import demo
from refimpl.masks import MASK_TYPES
from refimpl.perforation import FILLS

ROOT = Path(__file__).resolve().parents[1]


def ponder(*args, cwd=None):
    """Run the command line as a user would, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "refimpl", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_lists_the_demo():
    result = ponder("--help")
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout
    assert "usage: ponder" in result.stdout


def test_every_listed_command_imports_and_has_help():
    for name, (module, _) in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0, f"ponder {name} --help failed"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "figures"
    result = ponder("demo", "--out", str(out), "--rate", "0.6", "--seed", "3")
    return result, out


def _table(stdout):
    """Rows of the first table: lines between the first dashed rule and the next blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    header = lines[start - 2].split()
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(dict(zip(header, line.split())))
    return rows


def test_demo_succeeds_and_prints_every_mask_and_fill(demo_run):
    result, _ = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _table(result.stdout)
    assert {(r["mask"], r["fill"]) for r in rows} == {("dense", "-")} | {(m, f) for m in MASK_TYPES for f in FILLS}
    for row in rows:
        assert float(row["max|err|"]) <= 1e-5, row
        if row["mask"] != "dense":
            assert float(row["rate"]) == 0.6
            assert abs(float(row["realised"]) - 0.6) < 0.05, row  # grid rounds per axis
            # FLOPs scale with the computed fraction (the ideal speedup is 1 / (1 - realised)).
            assert float(row["ideal-speedup"]) == pytest.approx(1 / (1 - float(row["realised"])), rel=0.01)
    assert "all checks passed" in result.stdout


def test_demo_writes_the_png(demo_run):
    result, out = demo_run
    png = out / "perforation.png"
    assert png.is_file()
    assert f"wrote {png}" in result.stdout
    from matplotlib import image

    pixels = image.imread(png)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    assert pixels.std() > 0.05  # a picture, not a blank canvas


def test_demo_fails_when_a_check_fails(tmp_path, monkeypatch, capsys):
    """The exit status is the checks' verdict: with a negative tolerance every check must fail."""
    monkeypatch.setitem(demo.TOLERANCE, np.dtype(np.float32), -1.0)
    monkeypatch.setattr(demo, "SECTIONS", [demo.perforation_section])  # the checked section, only
    args = cli.build_parser().parse_args(["demo", "--out", str(tmp_path), "--size", "24"])
    assert demo.run(args) == 1
    assert "FAILED checks" in capsys.readouterr().out


def test_demo_fill_check_catches_a_wrong_fill():
    from refimpl.perforation import PerforationPlan

    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[3, 3] = True
    plan = PerforationPlan(mask)
    out = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    assert demo._check_fill(out, plan, "zero", "x")  # skipped positions are not zero
    filled = out.copy()
    filled[0, 0][~mask] = 0.0
    assert demo._check_fill(filled, plan, "zero", "x") == []


def test_demo_rejects_a_rate_outside_0_1():
    result = ponder("demo", "--rate", "1.5")
    assert result.returncode == 2
    assert "argument --rate: must be a number in [0, 1)" in result.stderr


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    assert "ponder demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _readme_commands()[1] in ci_lines
    assert "set -euo pipefail" in ci_lines
