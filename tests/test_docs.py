"""The documentation builds with warnings as errors, documents every module, and its examples run."""

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("pydata_sphinx_theme")


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs-html")
    # -E: read every page afresh, so every warning is reported; -W: warnings are errors.
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
                             str(DOCS), str(out)], capture_output=True, text=True, timeout=600)
    return result, out


@pytest.mark.slow
def test_docs_build_without_warnings(built_docs):
    result, out = built_docs
    problems = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "sphinx -W failed:\n" + "\n".join(problems or [result.stderr[-3000:]])
    assert (out / "index.html").is_file()


def _modules():
    names = []
    for package in ("refimpl", "fastpath"):
        pkg = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=package + ".")
                  if not m.name.endswith(".__main__")]
    return names


@pytest.mark.slow
def test_every_module_has_an_api_page(built_docs):
    _, out = built_docs
    missing = [name for name in _modules() if not (out / "api" / f"{name}.html").is_file()]
    assert not missing, f"no API page for {missing}"
    page = (out / "api" / "refimpl.perforation.html").read_text()
    assert "nearest_index" in page  # autodoc really pulled the docstrings in


@pytest.mark.slow
def test_every_notebook_and_page_is_built(built_docs):
    _, out = built_docs
    expected = [p.stem for p in (ROOT / "notebooks").glob("*.ipynb")]
    expected += [f"{p.parent.name}/{p.stem}" for folder in ("theory", "howto") for p in (DOCS / folder).glob("*.md")]
    missing = [name for name in expected
               if not (out / ("notebooks/" + name if "/" not in name else name)).with_suffix(".html").is_file()]
    assert not missing, missing


@pytest.mark.parametrize("page", sorted((DOCS / "howto").glob("*.md")), ids=lambda p: p.name)
def test_howto_python_examples_run(page, tmp_path, monkeypatch):
    """The ```python blocks of a how-to page run in order, in one namespace, as a reader would."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"howto_{page.stem}"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
