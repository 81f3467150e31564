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


def test_demo_tables_align_and_long_reasons_go_below_the_table():
    result = demo.SectionResult("T", ["name", "value", "status"], [["a", 1.5, "ok"], ["bb", 22.25, "-"]],
                                explanation="what is measured and why it differs from the ideal")
    result.rows.append(["opencl", "-", f"skipped ({result.note('no OpenCL platform found; ' * 20)})"])
    lines = result.format().splitlines()
    assert lines[:3] == ["T", "=", "what is measured and why it differs from the ideal"]
    header, rule, *rows = lines[3:8]
    width = len(rule)
    assert all(len(line) <= width for line in (header, *rows))
    # numbers right-aligned under a right-aligned header: every value column ends where its rule ends
    ends = [i for i in range(1, width + 1) if i == width or rule[i] == " " and rule[i - 1] == "-"]
    value_end = ends[1]
    assert header[:value_end].endswith("value") and rows[0][:value_end].endswith("1.5")
    assert rows[2].endswith("skipped (note 1)")
    notes = lines[8:]
    assert notes[0].startswith("note 1: no OpenCL platform found;") and len(notes) > 1
    assert all(len(line) <= demo.NOTE_WIDTH for line in notes)


def test_demo_without_opencl_keeps_its_tables_narrow_and_explains_each(tmp_path):
    import os

    env = dict(os.environ, OCL_ICD_VENDORS="/nonexistent-dir")
    result = subprocess.run([sys.executable, "-m", "refimpl", "demo", "--size", "16", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    titles = [i for i, line in enumerate(lines) if line and set(line) == {"="}]
    assert len(titles) == len(demo.SECTIONS)
    for i in titles:
        explanation = lines[i + 1]
        assert explanation and not explanation.startswith("-"), explanation  # a sentence, then the header
        rule = next(line for line in lines[i:] if line.startswith("---"))
        table = lines[lines.index(rule, i) - 1:]
        table = table[:table.index("")] if "" in table else table
        assert all(len(line) <= max(len(rule), demo.NOTE_WIDTH) for line in table), table
    assert "skipped (note 1)" in result.stdout and "note 1: opencl:" in result.stdout
    assert "the shipped sact-resnet14-digits32 (trained" in result.stdout


def test_a_checkpoint_runs_on_its_training_backend_or_says_which_it_takes_instead(monkeypatch):
    from refimpl import backend as backends
    from refimpl.commands.arguments import resolve_backend

    meta = {"extra": {"arguments": {"backend": "cython"}}}
    assert resolve_backend("numpy", meta, "evaluate") == ("numpy", None)  # asked for: no question
    real = backends.get_backend
    if fastpath_usable("cython"):
        assert resolve_backend(None, meta, "evaluate") == ("cython", None)

    def without_cython(name=None):
        if name == "cython":
            raise backends.BackendUnavailableError("the cython backend is unavailable: not compiled. Rebuild it")
        return real(name)

    monkeypatch.setattr(backends, "get_backend", without_cython)
    name, note = resolve_backend(None, meta, "evaluate")
    assert name in ("opencl", "numpy") and name != "cython"
    assert note == (f"ponder evaluate: the model was trained with the cython backend, which cannot run here "
                    f"(the cython backend is unavailable: not compiled); using {name}")
    assert resolve_backend(None, {"extra": {}}, "map") == ("numpy", None)  # no record: the reference


def fastpath_usable(name):
    import fastpath

    return fastpath.available_backends()[name].usable


def _imported_modules(path, package):
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_command_imports_another_and_refimpl_never_names_fastpath():
    commands = {module for module, _ in cli.COMMANDS.values()}
    for module in commands:
        path = ROOT / (module.replace(".", "/") + ".py")
        imported = _imported_modules(path, "refimpl.commands")
        assert not (imported & (commands - {module})), f"{module} imports {imported & commands}"
    for path in (ROOT / "refimpl").rglob("*.py"):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        assert not any(name.split(".")[0] == "fastpath" for name in _imported_modules(path, package)), path
        assert '"fastpath' not in path.read_text(), f"{path} names fastpath in a string"
