"""The ``ponder`` command line.

Each subcommand is a module exposing ``add_arguments(parser)`` and ``run(args)``. The commands of
``refimpl`` are listed in :data:`COMMANDS`; other installed packages add theirs through the
``ponder.commands`` entry points (``fastpath`` registers ``bench`` there), so ``refimpl`` never
names ``fastpath``.

Errors reach the user as one line: a bad option value from the parser, a bad input file (a
:class:`refimpl.commands.arguments.UsageError`, a checkpoint or data-set error, a backend that
cannot run here) from the command; all of these exit with status 2 (raised as
:class:`~refimpl.commands.arguments.UsageExit`, whose text is that line, so callers of
:func:`main` in the same process see it too). Anything else is an internal error: one line,
status 1, unless ``--debug`` (or ``PONDER_DEBUG=1``) asks for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

from .commands.arguments import HelpFormatter, UsageError, UsageExit

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("refimpl.commands.demo", "perforate a convolution of a photo with every mask and fill"),
    "train": ("refimpl.commands.train", "train a model (resnet14, nin, ...) on an offline data set; writes checkpoint, history, curves"),
    "evaluate": ("refimpl.commands.evaluate", "evaluate a checkpoint written by ponder train"),
    "map": ("refimpl.commands.map", "draw the computation-time map of an ACT/SACT checkpoint over an image"),
    "course": ("refimpl.commands.course", "the course kit: write the student notebooks, list the exercises, check solutions"),
    "parity": ("refimpl.commands.parity", "train an ACT RNN on parity (act | pact | pondernet) and report ponder steps"),
    "perforate": ("refimpl.commands.perforate", "greedily perforate a trained network to a target speedup; profile JSON and speed-error plot with baselines"),
    "reproduce": ("refimpl.commands.reproduce", "reproduce a claim of the thesis over several seeds: intervals, verdict, figure (resumable)"),
}

#: Entry-point group through which installed packages add commands (``name = "package.module"``).
COMMAND_ENTRY_POINTS = "ponder.commands"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``ponder CMD: error: argument --x: ...``."""

    def error(self, message):
        line = f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)"
        print(line, file=sys.stderr)
        raise UsageExit(line)


def installed_commands():
    """``{name: (module name, one-line help)}``: :data:`COMMANDS` and those of the entry points."""
    commands = dict(COMMANDS)
    for ep in sorted(metadata.entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        if ep.name not in commands:
            module = ep.value.partition(":")[0]
            commands[ep.name] = (module, None)
    return commands


def build_parser():
    parser = Parser(prog="ponder", description="Adaptive computation in convolutional networks.",
                    formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (module_name, help_text) in installed_commands().items():
        module = importlib.import_module(module_name)
        help_text = help_text or getattr(module, "HELP", None) or (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module_name)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return parser


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _user_errors():
    """Exception types that describe a bad argument or input, not a bug: shown as one line, status 2."""
    from .backend import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .datasets import DatasetFormatError

    return (UsageError, CheckpointError, DatasetFormatError, BackendUnavailableError, FileNotFoundError,
            IsADirectoryError, PermissionError)


def main(argv=None):
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PONDER_DEBUG") == "1"
    prog = f"ponder {args.command}"
    try:
        return importlib.import_module(args._module).run(args) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        line = f"{prog}: error: {_one_line(exc)}"
        print(line, file=sys.stderr)
        raise UsageExit(line) from exc
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(run again with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    sys.exit(main())
