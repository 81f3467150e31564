"""The exercises of the notebooks, one test each: run the exercise's cells, then check the result.

Students select by notebook or exercise with the markers registered in pyproject.toml::

    pytest -m nb01                 # every exercise of notebook 01
    pytest -m ex06_3               # exercise 3 of notebook 06
    PONDER_NOTEBOOKS=my_notebooks pytest -m nb06    # check your own copies

By default the notebooks are the instructor version in ``notebooks/`` (solutions in place), which
is what CI runs; ``PONDER_NOTEBOOKS=DIR`` points the tests at a folder of student notebooks (as
written by ``python -m refimpl.course student --out DIR``). Each test executes the exercise's
solution and test cells (:func:`refimpl.course.exercise_namespace`) — never the notebook's slow
cells — and then the independent check of :mod:`exercise_checks`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("nbformat")

from exercise_checks import CHECKS  # noqa: E402
from refimpl import course  # noqa: E402


def notebook_dir():
    folder = os.environ.get("PONDER_NOTEBOOKS")
    if not folder:
        return course.default_notebook_dir()
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"PONDER_NOTEBOOKS must name a folder of notebooks, got {folder!r} (not a directory)")
    return Path(folder)


def exercise_params():
    return [pytest.param(exercise, marks=[getattr(pytest.mark, f"nb{notebook}"), getattr(pytest.mark, exercise)],
                         id=exercise)
            for exercise, (notebook, _) in sorted(CHECKS.items())]


@pytest.mark.parametrize("exercise", exercise_params())
def test_exercise(exercise):
    notebook, check = CHECKS[exercise]
    path = course.find_notebook(notebook_dir(), notebook)
    namespace = course.exercise_namespace(path, exercise, roles=("solution", "tests"))
    check(namespace)
