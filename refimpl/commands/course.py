"""``ponder course``: the course kit — the student version of the notebooks, the exercise list, the checks.

Examples::

    ponder course student --out student_notebooks    # stubs under hints, hidden tests removed
    ponder course list                                # every exercise and question, by notebook
    ponder course check                               # the instructor version: every solution passes
    ponder course check --src student_notebooks --exercise ex06_2 ex06_3

The work is done by :mod:`refimpl.course`; this module only turns its errors into one-line usage
errors (exit status 2). ``check`` exits with status 1 unless every exercise it ran passes.
"""

from __future__ import annotations

from .arguments import UsageError


def add_arguments(parser):
    from ..course import add_arguments as add_course_arguments

    add_course_arguments(parser)


def run(args):
    from ..course import CourseError
    from ..course import run as run_course

    try:
        return run_course(args)
    except (CourseError, ValueError) as error:
        raise UsageError(str(error)) from None
