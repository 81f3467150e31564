"""Sphinx configuration for the ponder documentation.

Layout (drop a page into a folder and it appears; nothing here needs editing):

* ``theory/*.md``, ``howto/*.md`` — hand-written pages, picked up by glob toctrees in ``index.md``;
* ``notebooks/`` — copied at configuration time from the repository's ``notebooks/*.ipynb`` and
  rendered by myst-nb **without executing them** (``nb_execution_mode = "off"``): the notebooks are
  stored without outputs and executed by the test suite (``tests/test_notebooks.py``), so the docs
  build stays fast and a broken notebook fails a test rather than the docs. Notebooks link for
  their Jupyter readers, relative to ``notebooks/``; the copy rewrites ``../docs/X`` to ``../X``
  and ``../refimpl/a.py`` / ``../fastpath/a.py`` to that module's API page;
* ``api/`` — one page per module of ``refimpl`` and ``fastpath``, generated at configuration time
  from :func:`pkgutil.walk_packages`, so a new module is documented without editing anything.

``notebooks/`` and ``api/`` are build products (ignored by git). Build with
``sphinx-build -W --keep-going docs docs/_build/html``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "ponder"
author = "The ponder developers"
copyright = "2026, the ponder developers"
release = importlib.import_module("refimpl").__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages and notebooks (includes myst-parser)
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # executed by tests/test_notebooks.py instead; stored without outputs

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


def copy_notebooks():
    """Mirror ../notebooks/*.ipynb into docs/notebooks/ (rendered, not executed), links rewritten."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    for name, source in sources.items():
        nb = json.loads(source.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                cell["source"] = _REPO_LINK.sub(_docs_link, text)
        _write_if_changed(target / name, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()


generate_api_pages()
copy_notebooks()
