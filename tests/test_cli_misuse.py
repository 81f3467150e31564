"""Misusing the ``ponder`` command line: one line naming the option or file, exit status 2, no traceback.

Every case runs the real entry point in a fresh interpreter (``python -m refimpl``), as a user
would; bad option values are refused by the parser, bad input files by the command that reads them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest

from refimpl import cli


def ponder(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result, *names):
    """Exit status 2; stderr is one line naming every string in ``names``; no traceback anywhere."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A damaged checkpoint, a text file, a folder and a small trained SACT checkpoint."""
    root = tmp_path_factory.mktemp("misuse")
    corrupt = root / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this zip archive is cut short")
    notes = root / "notes.txt"
    notes.write_text("some notes, not a checkpoint and not an image\n")
    folder = root / "run"
    folder.mkdir()
    sact = root / "sact"
    assert cli.main(["train", "--model", "sact-resnet8", "--option", "widths=[2,2,2]", "--data", "cluttered-digits",
                     "--canvas", "16", "--digit-scale", "1", "--n-train", "8", "--n-val", "4", "--n-test", "4",
                     "--epochs", "1", "--batch-size", "8", "--quiet", "--out", str(sact)]) == 0
    return {"corrupt": corrupt, "notes": notes, "folder": folder, "sact": sact / "checkpoint.npz", "root": root}


# --- bad option values: refused by the parser --------------------------------------------------

@pytest.mark.parametrize("args, names", [
    (["demo", "--seed", "-1"], ["--seed", ">= 0", "'-1'"]),
    (["demo", "--backend", "cuda"], ["--backend", "'cuda'", "numpy"]),
    (["demo", "--rate", "1"], ["--rate", "[0, 1)"]),
    (["demo", "--size", "2"], ["--size", ">= 8"]),
    (["train", "--out", "x", "--lr", "-1"], ["--lr", "> 0"]),
    (["train", "--out", "x", "--epochs", "0"], ["--epochs", ">= 1"]),
    (["train", "--out", "x", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["train", "--out", "x", "--model", "resnet9"], ["--model", "'resnet9'", "resnet14"]),
    (["train", "--out", "x", "--model", "nin", "--data", "digits", "--option", "widths=8,16"],
     ["--option", "widths=[8,16]"]),
    (["train", "--out", "x", "--option", "tau"], ["--option", "KEY=VALUE"]),
    (["train", "--model", "nin", "--data", "digits"], ["--out", "required"]),
    (["evaluate", "--checkpoint", "c.npz", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["evaluate", "--checkpoint", "c.npz", "--backend", "cuda"], ["--backend", "'cuda'"]),
    (["map", "--checkpoint", "c.npz", "--image", "camera", "--size", "0"], ["--size", ">= 1"]),
    (["parity", "--objective", "act", "--size", "0"], ["--size", ">= 1"]),
    (["parity", "--objective", "act", "--prior-rate", "0"], ["--prior-rate", "(0, 1]"]),
    (["parity", "--objective", "halt"], ["--objective", "'halt'", "pondernet"]),
    (["perforate", "--checkpoint", "c.npz", "--out", "o", "--stride-factors", "1", "0"],
     ["--stride-factors", ">= 1", "'0'"]),
    (["perforate", "--checkpoint", "c.npz", "--out", "o", "--stride-factors", "-1"], ["--stride-factors", ">= 1"]),
    (["perforate", "--checkpoint", "c.npz", "--out", "o", "--target-speedup", "0.5"], ["--target-speedup", ">= 1"]),
    (["bench", "--backends", "cuda"], ["--backends", "cuda", "numpy,cython,opencl"]),
    (["bench", "--layers", "resnet99"], ["--layers", "resnet99"]),
    (["bench", "--rates", "0.5,1.5"], ["--rates", "[0, 1)"]),
    (["bench", "--repeat", "0"], ["--repeat", ">= 1"]),
])
def test_a_bad_option_value_is_one_line_naming_the_option(args, names):
    line = assert_one_line_error(ponder(*args), *names)
    assert line.startswith(f"ponder {args[0]}: error: ")


# --- bad input files: refused by the command that reads them -------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "map", "perforate"])
@pytest.mark.parametrize("kind, says", [
    ("corrupt", "damaged or not a ponder checkpoint"),
    ("notes", "is a text file"),
    ("folder", "is a folder"),
    ("missing", "does not exist"),
])
def test_a_bad_checkpoint_is_one_line_naming_the_file(files, command, kind, says):
    path = files["root"] / "missing.npz" if kind == "missing" else files[kind]
    extra = {"evaluate": [], "map": ["--image", "camera"], "perforate": ["--out", files["root"] / "perf"]}[command]
    line = assert_one_line_error(ponder(command, "--checkpoint", path, *extra), str(path), says)
    assert "checkpoint" in line and "allow_pickle" not in line


def test_an_image_that_is_not_an_image_is_one_line_naming_the_file(files):
    line = assert_one_line_error(ponder("map", "--checkpoint", files["sact"], "--image", files["notes"]),
                                 "--image", str(files["notes"]))
    assert "not an image file" in line and "Could not find a backend" not in line
    assert_one_line_error(ponder("map", "--checkpoint", files["sact"], "--image", files["folder"]),
                          str(files["folder"]), "is a folder")
    assert_one_line_error(ponder("map", "--checkpoint", files["sact"], "--image", files["root"] / "nowhere.png"),
                          "nowhere.png", "neither an existing file nor a photo name")


def test_a_missing_data_folder_is_one_line_naming_it(tmp_path):
    nowhere = tmp_path / "no-cifar"
    assert_one_line_error(ponder("train", "--model", "resnet8", "--data", "cifar10", "--cifar-dir", nowhere,
                                 "--out", tmp_path / "r"), str(nowhere), "does not exist")


def test_a_checkpoint_without_a_map_is_one_line(tmp_path):
    run = tmp_path / "nin"
    assert cli.main(["train", "--model", "nin", "--data", "digits", "--option", "widths=[2,2,2]", "--epochs", "1",
                     "--quiet", "--out", str(run)]) == 0
    assert_one_line_error(ponder("map", "--checkpoint", run / "checkpoint.npz", "--image", "camera"),
                          "--checkpoint", "'nin'", "no computation-time map")


def test_train_with_a_bad_model_option_is_one_line(tmp_path):
    assert_one_line_error(ponder("train", "--model", "nin", "--data", "digits", "--option", "widths=[2,2]",
                                 "--out", tmp_path / "r"), "widths")


# --- the entry point itself ----------------------------------------------------------------------

def test_the_console_script_finds_bench_through_its_entry_point():
    script = shutil.which("ponder", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script is not None, "the ponder console script is not installed next to this interpreter"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "bench" in result.stdout
    assert_one_line_error(subprocess.run([script, "bench", "--backends", "cuda"], capture_output=True, text=True,
                                         timeout=120), "--backends")


def test_an_internal_error_is_one_line_unless_debug(monkeypatch, capsys):
    from refimpl.commands import parity

    def broken(args):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(parity, "run", broken)
    with pytest.raises(SystemExit) as stop:
        cli.main(["parity", "--objective", "act"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("ponder parity: internal error: RuntimeError: something unexpected "
                   "(run again with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something"):
        cli.main(["parity", "--objective", "act", "--debug"])
    with pytest.raises(RuntimeError, match="something"):
        cli.main(["--debug", "parity", "--objective", "act"])


def test_every_option_with_a_default_shows_it_in_help():
    parser = cli.build_parser()
    commands = dict(parser._subparsers._group_actions[0].choices)
    for name, sub in list(commands.items()):  # and the subcommands of a command (ponder course student, ...)
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        commands.update({f"{name} {n}": p for action in nested for n, p in action.choices.items()})
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and not action.required:
                help_text = sub._get_formatter()._expand_help(action)
                assert "default" in help_text, f"ponder {name} {action.option_strings[0]}: {help_text!r}"
        required = [a.option_strings[0] for a in sub._actions if a.required and a.option_strings]
        if required:
            section = text.split("required arguments:", 1)
            assert len(section) == 2, f"ponder {name}: no 'required arguments' section"
            for option in required:
                assert option in section[1], f"ponder {name}: {option} not listed as required"


def test_bench_prints_one_blas_line_in_a_fixed_order_and_aligned_tables():
    from fastpath import bench

    a = {"internal_api": "openblas", "version": "0.3.30", "architecture": "SkylakeX", "num_threads": 2,
         "prefix": "libscipy_openblas"}
    b = dict(a, version="0.3.31")
    assert bench.blas_line([b, a]) == bench.blas_line([a, b])
    assert bench.blas_line([b, a]).count("BLAS") == 1 and bench.blas_line([b, a]).index("0.3.30") < \
        bench.blas_line([b, a]).index("0.3.31")
    results = [bench.Result("resnet64", "cython", "forward", 0.5, 0.44, 1.0, [1.0], 2.0, 1.0, 1.5, 0.84, None),
               bench.Result("resnet64", "opencl-kernel", "forward", 0.0, 0.0, 2.0, [2.0], 1.0, 1.0, 1.0, 1.0, 0.5)]
    header, rule, *rows = bench.format_table(results, "forward").splitlines()[1:]
    assert len({len(header), len(rule), *map(len, rows)}) == 1  # every line as wide as the rule
    assert rows[0].split()[2:4] == ["0.50", "0.44"]  # requested, then realised rate
