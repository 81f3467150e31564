"""The ``ponder`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
this file only lists them, so adding a command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("refimpl.commands.demo", "perforate a convolution of a photo with every mask and fill"),
    "bench": ("fastpath.bench", "benchmark every backend (numpy, cython, opencl, torch) on reference layers"),
    "train": ("refimpl.commands.train", "train a model (resnet14, nin, ...) on an offline data set; writes checkpoint, history, curves"),
    "evaluate": ("refimpl.commands.evaluate", "evaluate a checkpoint written by ponder train"),
    "map": ("refimpl.commands.map", "draw the computation-time map of an ACT/SACT checkpoint over an image"),
    "parity": ("refimpl.commands.parity", "train an ACT RNN on parity (act | pact | pondernet) and report ponder steps"),
    "perforate": ("refimpl.commands.perforate", "greedily perforate a trained network to a target speedup; profile JSON and speed-error plot with baselines"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="ponder", description="Adaptive computation in convolutional networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
