"""The documentation builds with warnings as errors, documents every module, shows every notebook
with its figures, typesets equations without a network, and its examples run."""

import html.parser
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Reading order of the site's navigation: perforated convolution first.
NOTEBOOK_ORDER = ["01_perforated_convolution", "02_fast_kernels", "03_opencl", "04_training_from_scratch",
                  "05_accelerating_a_network", "06_act_and_sact", "07_probabilistic_act", "08_act_rnn"]
THEORY_ORDER = ["perforated_convolution", "act_sact", "pact"]

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("pydata_sphinx_theme")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")


def _load_executed_notebooks():
    spec = importlib.util.spec_from_file_location("executed_notebooks", DOCS / "executed_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


executed_notebooks = _load_executed_notebooks()


def executed_notebook_folder(tmp_path_factory):
    """Where this test session keeps executed notebooks; tests/test_notebooks.py reads the same."""
    return tmp_path_factory.getbasetemp() / "executed-notebooks"


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs-html")
    # The build executes the notebooks into this session's folder; the notebook tests reuse them.
    env = {**os.environ, "PONDER_NOTEBOOK_CACHE": str(executed_notebook_folder(tmp_path_factory))}
    env.pop("PONDER_DOCS_EXECUTE", None)
    env.pop("PONDER_DOCS_SOLUTIONS", None)
    # -E: read every page afresh, so every warning is reported; -W: warnings are errors.
    # The timeout is a hang guard: every notebook may use its whole budget, plus the build itself.
    timeout = len(NOTEBOOKS) * executed_notebooks.NOTEBOOK_TIMEOUT_S + 600
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
                             str(DOCS), str(out)], capture_output=True, text=True, timeout=timeout, env=env)
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
    expected += [f"{p.parent.name}/{p.stem}" for folder in ("theory", "howto", "course")
                 for p in (DOCS / folder).glob("*.md")]
    missing = [name for name in expected
               if not (out / ("notebooks/" + name if "/" not in name else name)).with_suffix(".html").is_file()]
    assert not missing, missing


class _PageParser(html.parser.HTMLParser):
    """Collects a page's images inside notebook cell outputs, the sources of its scripts and
    stylesheets, and its links, in document order."""

    def __init__(self):
        super().__init__()
        self.output_images, self.loads, self.links = 0, [], []
        self._open = []  # (tag, is a cell output) for the open elements

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        in_output = any(output for _, output in self._open) or "cell_output" in classes
        if tag == "img" and in_output:
            self.output_images += 1
        if tag == "script" and attrs.get("src"):
            self.loads.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") in ("stylesheet", "preload", "modulepreload"):
            self.loads.append(attrs["href"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag not in ("img", "link", "meta", "br", "hr", "input", "source"):  # void elements never close
            self._open.append((tag, "cell_output" in classes))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break


def _parse(page):
    parser = _PageParser()
    parser.feed(page.read_text())
    return parser


def _image_outputs(nb):
    return sum(1 for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
               if any(kind.startswith("image/") for kind in output.get("data", {})))


def _plots(nb):
    return any(re.search(r"\bplt\.|matplotlib", cell.source) for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_page_shows_its_outputs_and_figures(path, built_docs, tmp_path_factory):
    """Every figure the executed notebook holds is an image on its page, and a notebook that plots
    shows at least one; a notebook that cannot run here says so at the top of its page instead."""
    result, out = built_docs
    page = out / "notebooks" / f"{path.stem}.html"
    assert page.is_file(), "no page for the notebook:\n" + result.stderr[-3000:]
    source = nbformat.read(path, as_version=4)
    if executed_notebooks.unusable_requirements(source):
        assert "could not run on the machine that built this site" in page.read_text()
        return
    folder = executed_notebook_folder(tmp_path_factory)
    cached = executed_notebooks.cached_path(path, folder)
    assert cached.is_file(), f"the docs build left no executed copy of {path.name} in {folder}"
    nb = nbformat.read(cached, as_version=4)
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "executed copy has no output"
    figures = _image_outputs(nb)
    if _plots(source):
        assert figures >= 1, f"{path.name} plots, but its executed copy holds no image"
    assert _parse(page).output_images == figures, f"{path.name}: page shows a different number of figures"


@pytest.mark.slow
def test_no_page_loads_anything_from_another_site(built_docs):
    """Equations are typeset by the MathJax copy in _static (not a CDN), and no page loads a script
    or stylesheet from elsewhere, so the site reads offline."""
    _, out = built_docs
    remote = {}
    for page in out.rglob("*.html"):
        loads = [src for src in _parse(page).loads if re.match(r"(https?:)?//", src)]
        if loads:
            remote[str(page.relative_to(out))] = loads
    assert not remote, remote
    page = _parse(out / "theory" / "perforated_convolution.html")
    mathjax = [src for src in page.loads if "mathjax" in src.lower()]
    assert mathjax == ["../_static/mathjax/tex-chtml.js"], page.loads
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()


@pytest.mark.slow
def test_navigation_follows_the_reading_order(built_docs):
    _, out = built_docs
    links = [re.sub(r"\.html(#.*)?$", "", link) for link in _parse(out / "index.html").links]
    notebooks = [link.removeprefix("notebooks/") for link in links if link.startswith("notebooks/")]
    assert list(dict.fromkeys(notebooks)) == NOTEBOOK_ORDER
    theory = [link.removeprefix("theory/") for link in links if link.startswith("theory/")]
    assert list(dict.fromkeys(theory)) == THEORY_ORDER
    assert "course/index" in links


@pytest.mark.slow
def test_course_page_includes_the_measured_runtimes(built_docs):
    _, out = built_docs
    page = (out / "course" / "index.html").read_text()
    table = page[page.index("Measured when this site was built"):]
    for path in NOTEBOOKS:
        # Each notebook's row links its page and gives the seconds it took, or says it did not run.
        row = re.search(rf'href="../notebooks/{path.stem}.html".*?</tr>', table, flags=re.S)
        assert row, f"no row for {path.name} in the course page's runtime table"
        ran = not executed_notebooks.unusable_requirements(nbformat.read(path, as_version=4))
        expected = r"<td><p>\d+ s</p></td>" if ran else r"<td><p>not executed"
        assert re.search(expected, row.group(0)), row.group(0)


@pytest.mark.slow
def test_docs_build_without_executing_the_notebooks(tmp_path):
    """What a machine that cannot run a notebook gets: the page, unexecuted, under a note, and no
    warning (the same path as a notebook whose backend is unusable there)."""
    env = {**os.environ, "PONDER_DOCS_EXECUTE": "0", "PONDER_NOTEBOOK_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
                             str(DOCS), str(tmp_path / "html")], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in NOTEBOOKS:
        page = tmp_path / "html" / "notebooks" / f"{path.stem}.html"
        assert "without its outputs" in page.read_text(), path.name
        assert _parse(page).output_images == 0, path.name
    assert not (tmp_path / "cache").exists(), "nothing may be executed"


@pytest.mark.slow
def test_the_site_shows_no_solution_and_no_hidden_test(built_docs):
    """The notebooks as the site renders them (docs/notebooks/, written by the build) keep no
    region between nbgrader's solution or hidden-test delimiters."""
    delimiters = {*executed_notebooks.SOLUTION, *executed_notebooks.HIDDEN_TESTS}
    for path in NOTEBOOKS:
        shown = nbformat.read(DOCS / "notebooks" / path.name, as_version=4)
        lines = [line.strip() for cell in shown.cells for line in cell.source.split("\n")]
        # A delimiter may carry a hint after it ("### BEGIN SOLUTION hint: ..."): match the start.
        left = [line for line in lines if line.startswith(tuple(delimiters))]
        assert not left, (path.name, left)


def test_solutions_become_stubs_and_hidden_tests_disappear():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
                                          "    ### END SOLUTION\n\nprint(double(21))"),
                nbformat.v4.new_code_cell("assert double(1) == 2\n### BEGIN HIDDEN TESTS\n"
                                          "assert double(-3) == -6\n### END HIDDEN TESTS"),
                nbformat.v4.new_markdown_cell("Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION")]
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    student = executed_notebooks.without_solutions(nb)
    assert student.cells[0].source == ("def double(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"
                                       "\nprint(double(21))")
    assert student.cells[0].outputs[0].text == "42\n"  # the expected output stays
    assert student.cells[1].source == "assert double(1) == 2"
    assert student.cells[2].source == "Why?\n\nYOUR ANSWER HERE"


def test_notebook_order_lists_every_notebook():
    assert sorted(NOTEBOOK_ORDER) == sorted(p.stem for p in NOTEBOOKS)


def test_readme_and_docs_say_how_to_install_jupyter():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("jupyter") for req in extras["notebooks"]), extras["notebooks"]
    for page in (ROOT / "README.md", DOCS / "index.md", DOCS / "course" / "index.md"):
        text = page.read_text()
        assert 'pip install -e ".[notebooks]"' in text, page
        assert "jupyter lab notebooks/" in text, page


def test_offline_mathjax_is_in_the_docs_and_test_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("docs", "test"):
        assert any(req.startswith("sphinx-mathjax-offline") for req in extras[extra]), extra


def _write_notebook(path, source="print(6 * 7)", metadata=None):
    """A two-cell notebook (title, one code cell) without outputs."""
    nb = nbformat.v4.new_notebook(metadata=metadata or {})
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)
    return path


def test_executed_copies_are_reused_only_for_the_same_inputs(tmp_path):
    path = _write_notebook(tmp_path / "tiny.ipynb")
    nb, seconds = executed_notebooks.executed(path, tmp_path / "cache")
    assert seconds is not None
    assert nb.cells[1].outputs[0].text == "42\n"
    again, seconds = executed_notebooks.executed(path, tmp_path / "cache")
    assert seconds is None and again.cells[1].outputs[0].text == "42\n"
    _write_notebook(path, source="print(6 * 9)")  # another notebook: executed afresh
    changed, seconds = executed_notebooks.executed(path, tmp_path / "cache")
    assert seconds is not None and changed.cells[1].outputs[0].text == "54\n"
    assert len(list((tmp_path / "cache").glob("tiny-*.ipynb"))) == 1, "the copy of the old inputs stays"
    assert nbformat.read(path, as_version=4).cells[1].outputs == []  # the source stays without outputs


def test_a_failing_notebook_is_reported_and_shown_without_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("PONDER_DOCS_EXECUTE", raising=False)
    path = _write_notebook(tmp_path / "broken.ipynb", source="raise ValueError('broken on purpose')")
    nb, note, error = executed_notebooks.for_the_site(path, tmp_path / "cache")
    assert "failed to execute" in note
    assert "broken on purpose" in error
    assert not list((tmp_path / "cache").glob("*.ipynb")), "a failed execution must not be cached"


def test_a_notebook_needing_an_unusable_backend_is_not_executed(tmp_path, monkeypatch):
    import fastpath

    monkeypatch.delenv("PONDER_DOCS_EXECUTE", raising=False)
    unusable = {**fastpath.available_backends(), "opencl": fastpath.BackendStatus("opencl", False, "no OpenCL platform")}
    monkeypatch.setattr(fastpath, "available_backends", lambda: unusable)
    path = _write_notebook(tmp_path / "needs_opencl.ipynb", metadata={"ponder": {"requires": ["opencl"]}})
    nb, note, error = executed_notebooks.for_the_site(path, tmp_path / "cache")
    assert error is None
    assert "`opencl` backend (no OpenCL platform)" in note
    assert nb.cells[1].outputs == []
    assert not (tmp_path / "cache").exists()


def test_an_unknown_required_backend_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PONDER_DOCS_EXECUTE", raising=False)
    path = _write_notebook(tmp_path / "needs_cuda.ipynb", metadata={"ponder": {"requires": ["cuda"]}})
    with pytest.raises(ValueError, match=r"ponder.requires names unknown backends \['cuda'\]"):
        executed_notebooks.for_the_site(path, tmp_path / "cache")


@pytest.mark.parametrize("page", sorted((DOCS / "howto").glob("*.md")), ids=lambda p: p.name)
def test_howto_python_examples_run(page, tmp_path, monkeypatch):
    """The ```python blocks of a how-to page run in order, in one namespace, as a reader would."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"howto_{page.stem}"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
