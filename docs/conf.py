"""Sphinx configuration for the ponder documentation.

Layout:

* ``theory/*.md``, ``howto/*.md``, ``course/*.md`` — hand-written pages, listed in reading order by
  the toctrees of ``index.md``: a new page goes into its place there (a page in no toctree is a
  warning, so ``-W`` fails until it has one). Notebooks are listed there the same way;
* ``notebooks/`` — copied at configuration time from the repository's ``notebooks/*.ipynb``
  **with their outputs**: each notebook is executed (from ``notebooks/``, as in Jupyter) by
  ``executed_notebooks.py`` beside this file, which keeps the executed copy in a cache that the
  notebook tests share, so CI executes every notebook once. myst-nb then renders the stored
  outputs (``nb_execution_mode = "off"``). A notebook that needs a backend this machine cannot
  run (metadata ``ponder.requires``) is shown without outputs, under a note saying why; a notebook
  that fails is a build warning (an error under ``-W``). ``PONDER_DOCS_EXECUTE=0`` skips execution
  (for a quick look at prose edits; each notebook page then says it shows no outputs). The site is
  the students' view: exercise solutions (nbgrader's ``### BEGIN SOLUTION`` regions) are shown as
  stubs, with the outputs the solutions produced; ``PONDER_DOCS_SOLUTIONS=1`` builds an
  instructors' site that shows them.
  Notebooks link for their Jupyter readers, relative to ``notebooks/``; the copy rewrites
  ``../docs/X`` to ``../X`` and ``../refimpl/a.py`` / ``../fastpath/a.py`` to that module's API page;
* ``api/`` — one page per module of ``refimpl`` and ``fastpath``, generated at configuration time
  from :func:`pkgutil.walk_packages`, so a new module is documented without editing anything;
* ``_generated/reproduce_results.md`` — the results section of ``reproduce.md``, written at
  configuration time by :func:`refimpl.reproduce.report.results_markdown` from the committed
  ``ponder reproduce`` summaries in ``_static/reproduce/`` (a claim without one says so).

Equations are typeset by a copy of MathJax served with the site (``sphinx-mathjax-offline``), so
the pages read offline and load nothing from a CDN.

``notebooks/`` and ``api/`` are build products (ignored by git). Build with
``sphinx-build -W --keep-going docs docs/_build/html``.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import executed_notebooks  # noqa: E402  (beside this file)
from sphinx.util import logging  # noqa: E402

logger = logging.getLogger("ponder.docs")
# How busy the machine was before the notebooks ran: the course page's runtime table quotes it.
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

project = "ponder"
author = "The ponder developers"
copyright = "2026, the ponder developers"
release = importlib.import_module("refimpl").__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static/mathjax, not from a CDN
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages and notebooks (includes myst-parser)
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_generated", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# The notebooks arrive executed (see copy_notebooks); myst-nb renders their stored outputs.
nb_execution_mode = "off"

# Napoleon turns parameter types into cross-references; a bare type name that several modules
# define (``Layer``, ``labels``, ...) is ambiguous and Sphinx warns, although the rendered type is
# right. Only that warning category is silenced; broken references still fail the build.
suppress_warnings = ["ref.python"]

html_theme = "pydata_sphinx_theme"
html_title = "ponder"
html_static_path = ["_static"]
html_theme_options = {"navigation_with_keys": False}

API_PACKAGES = ("refimpl", "fastpath")


def _write_if_changed(path, text):
    """Rewrite only on change, so incremental builds don't rebuild every page."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate_api_pages():
    """One page per module of the import packages, found with :func:`pkgutil.walk_packages`.

    Only packages are imported here (to walk into them); a module that fails to import is left to
    autodoc, which reports it as a warning on that module's page instead of stopping the build.
    """
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    modules = {}  # name -> is a package
    for package in API_PACKAGES:
        modules[package] = True
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
            if not info.name.endswith(".__main__"):  # importing it would run the command line
                modules[info.name] = info.ispkg
    names = sorted(modules, key=lambda n: (n.split(".")[0] != "refimpl", n))
    for name in names:
        # A package's page shows only its docstring: its re-exported names are documented
        # on the pages of the modules that define them (avoids duplicate descriptions).
        options = ":no-members:" if modules[name] else ":members:\n:show-inheritance:"
        _write_if_changed(api / f"{name}.md", f"# `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n   "
                          + options.replace("\n", "\n   ") + "\n```\n")
    for stale in api.glob("*.md"):
        if stale.stem not in names and stale.name != "index.md":
            stale.unlink()
    toc = "\n".join(names)
    _write_if_changed(api / "index.md", "# API reference\n\nGenerated from the docstrings of every module "
                      "of `refimpl` (the NumPy reference) and `fastpath` (the fast backends).\n\n"
                      f"```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n")


_REPO_LINK = re.compile(r"\]\(\.\./([^)\s#]+)(#[^)\s]*)?\)")


def _docs_link(match):
    """A Markdown link written relative to notebooks/, as seen from docs/notebooks/."""
    path, anchor = match.group(1), match.group(2) or ""
    if path.startswith("docs/"):
        return f"](../{path[len('docs/'):]}{anchor})"
    if path.split("/")[0] in API_PACKAGES and path.endswith(".py"):
        module = path[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        return f"](../api/{module}.md)"
    return match.group(0)


def _note_cell(text):
    """A markdown cell that opens the page with a MyST note."""
    return {"cell_type": "markdown", "id": "ponder-site-note", "metadata": {}, "source": f"```{{note}}\n{text}\n```"}


def _image_outputs(nb):
    return sum(1 for cell in nb["cells"] if cell["cell_type"] == "code" for output in cell.get("outputs", [])
               if any(kind.startswith("image/") for kind in output.get("data", {})))


def _runtime_table(rows):
    """The course page's table of execution times, from what this build executed (or read back)."""
    lines = [f"Built on a machine with {os.cpu_count()} CPU cores (load average {LOAD_AT_START:.1f} when "
             "the build started).", "",
             "| notebook | runs in | figures |", "|---|---|---|"]
    for name, nb, note in rows:
        seconds = nb.get("metadata", {}).get("ponder", {}).get("execution_seconds")
        runs_in = f"{seconds:.0f} s" if note is None and seconds is not None else "not executed (see its page)"
        lines.append(f"| [{name}](../notebooks/{name}) | {runs_in} | {_image_outputs(nb) if note is None else '–'} |")
    return "\n".join(lines) + "\n"


def copy_notebooks():
    """Mirror ../notebooks/*.ipynb into docs/notebooks/ with their outputs, links rewritten;
    write the table of their execution times that the course page includes."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    rows = []
    for name, source in sources.items():
        nb, note, error = executed_notebooks.for_the_site(source)
        if error:
            last_lines = "\n".join(error.strip().splitlines()[-15:])
            logger.warning(f"notebook {name} failed to execute; its page shows no outputs:\n{last_lines}")
        nb = json.loads(json.dumps(nb))  # plain dicts and lists, whatever nbformat returned
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                cell["source"] = _REPO_LINK.sub(_docs_link, text)
        # An unexecuted notebook may lack the language its kernel reports; myst-nb needs it to
        # highlight the code cells.
        nb["metadata"].setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})
        if note:
            title = next((i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "markdown"
                          and cell["source"].lstrip().startswith("# ")), -1)
            nb["cells"].insert(title + 1, _note_cell(note))  # under the title, which names the page
        _write_if_changed(target / name, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        rows.append((name, nb, note))
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    generated = DOCS / "_generated"
    generated.mkdir(exist_ok=True)
    _write_if_changed(generated / "notebook_runtimes.md", _runtime_table(rows))


def generate_reproduce_results():
    """The results section of reproduce.md from the committed medium-tier summaries."""
    from refimpl.reproduce.report import results_markdown

    generated = DOCS / "_generated"
    generated.mkdir(exist_ok=True)
    _write_if_changed(generated / "reproduce_results.md",
                      results_markdown(DOCS / "_static" / "reproduce", tier="medium"))


generate_api_pages()
generate_reproduce_results()
copy_notebooks()
