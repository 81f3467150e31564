"""What every ``ponder`` command shares: argument types, the help layout, and the user-error type.

Bad values are rejected by the parser itself, so a user sees one line naming the option and what
it accepts (exit status 2) before anything runs::

    ponder demo: error: argument --seed: must be an integer >= 0, got '-1'

A command that finds a bad *input* later (a checkpoint that is not one, an image that is not an
image) raises :class:`UsageError`; the command line prints it the same way, also with status 2.

This module is not a command: commands import it, and it imports no command.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


class UsageError(Exception):
    """A bad argument value or input file found after parsing; shown as one line, exit status 2."""


class UsageExit(SystemExit):
    """How the command line stops on a user error: exit status 2, ``str()`` is the one-line message.

    (A plain ``SystemExit(2)`` would lose the message for callers of :func:`refimpl.cli.main` in
    the same process, such as tests.)
    """

    def __init__(self, message, code=2):
        super().__init__(code)
        self.message = message

    def __str__(self):
        return self.message


class HelpFormatter(argparse.HelpFormatter):
    """Help text that shows the default of every option that has one (``None``/``False`` mean "off")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "(default" in text or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or action.required):
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def required_group(parser):
    """The argument group listing a command's required options under "required arguments"."""
    return parser.add_argument_group("required arguments")


# ---------------------------------------------------------------------------------------------
# Argument types: each raises ArgumentTypeError with the accepted range in its message
# ---------------------------------------------------------------------------------------------


def _number(kind, text, accepted):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
    return value


def _at_least(kind, low, strict=False):
    """Argument type: a finite ``kind`` (int or float) ``>= low`` (``> low`` when ``strict``)."""
    accepted = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {low:g}"

    def parse(text):
        value = _number(kind, text, accepted)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value
    parse.__name__ = f"{kind.__name__}{'>' if strict else '>='}{low:g}"
    return parse


def int_at_least(low):
    """Argument type: an integer >= ``low``."""
    return _at_least(int, low)


def float_at_least(low):
    """Argument type: a finite number >= ``low``."""
    return _at_least(float, low)


non_negative_int = int_at_least(0)
positive_int = int_at_least(1)
non_negative_float = float_at_least(0)
positive_float = _at_least(float, 0, strict=True)  # a finite number > 0


def float_in(low, high, closed_low=True, closed_high=False):
    """Argument type: a number in ``[low, high)`` (brackets as ``closed_low`` / ``closed_high`` say)."""
    accepted = f"a number in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"

    def parse(text):
        value = _number(float, text, accepted)
        above = low <= value if closed_low else low < value
        below = value <= high if closed_high else value < high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value
    return parse


def key_value(text):
    """Argument type of ``--option KEY=VALUE``: ``(key, value)``, the value read as JSON.

    A value that is not JSON (``widths=8,16``) is rejected with an example of the JSON form, since
    passing it on as a string would only fail later, far from the option that caused it.
    """
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE (e.g. tau=0.01 or widths=[8,16,32]), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        pass
    if value.replace(",", "").replace(".", "").replace("-", "").isdigit():
        raise argparse.ArgumentTypeError(f"{key}: a list is written in JSON, e.g. {key}=[{value}], got {text!r}")
    return key, value  # a bare word: a string option such as mode=relaxed


def key_value_text(text):
    """Argument type of a repeatable ``--option``: the text unchanged, once :func:`key_value` accepts it."""
    key_value(text)
    return text


def backend_choices():
    """Every backend name known here (the NumPy reference and those installed packages advertise)."""
    from ..backend import known_backends

    return known_backends()


def add_backend_argument(parser, default="numpy", help_text="convolution backend"):
    """``--backend NAME`` restricted to the known backends (``default=None``: chosen by the command)."""
    choices = backend_choices()
    parser.add_argument("--backend", choices=choices, default=default, metavar="{" + ",".join(choices) + "}",
                        help=help_text)


def existing_path(text):
    """Argument type: a path, unchanged (existence is checked by the reader, which knows what it wants)."""
    return Path(text)


# ---------------------------------------------------------------------------------------------
# Backend choice for a trained model
# ---------------------------------------------------------------------------------------------


def trained_backend(meta):
    """The backend a ``ponder train`` checkpoint was trained with (``None`` when it does not say)."""
    return (meta.get("extra", {}).get("arguments") or {}).get("backend")


def resolve_backend(requested, meta, command):
    """The backend to run a checkpoint on, and a line saying why when it is not the obvious one.

    ``requested`` (a name) wins. Otherwise the backend the model was trained with, if it runs here,
    else the fastest usable one (cython, then opencl, then numpy).

    Returns
    -------
    name : str
    note : str or None — one line to print (a fallback), None when nothing needs saying
    """
    from ..backend import BackendUnavailableError, get_backend

    if requested is not None:
        return requested, None
    preferred = trained_backend(meta) or "numpy"
    reasons = {}
    for name in dict.fromkeys([preferred, "cython", "opencl", "numpy"]):
        if name not in backend_choices():
            continue
        try:
            get_backend(name)
        except (BackendUnavailableError, ValueError) as exc:
            reasons[name] = str(exc).split(". ")[0]
            continue
        if name == preferred:
            return name, None
        return name, (f"ponder {command}: the model was trained with the {preferred} backend, which cannot run "
                      f"here ({reasons.get(preferred, 'not installed')}); using {name}")
    return "numpy", None
