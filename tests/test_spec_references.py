"""Every reference to the specification resolves inside the repository.

``docs/spec.md`` defines numbered sections, each with an explicit target ``(spec-7-2)=`` above
its heading ``### 7.2 ...``. Code, docstrings, scripts and tests cite a section as
``docs/spec.md §7.2``; Markdown (documentation pages, notebooks) links to ``spec.md#spec-7-2``
(see the page's §1.5). The tests here fail when

* a tracked file cites a section number or a target that the page does not define, or a
  Markdown link's text names another section than its target;
* a tracked file refers to something outside the repository: the external contract file this page
  replaces, the shared folder beside the repository, or the issue tracker (the word "issue"
  followed by a number, or by a possessive).

The forbidden patterns below necessarily contain the strings they forbid, so this file is left out
of that scan.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_PAGE = ROOT / "docs" / "spec.md"
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

TARGET = re.compile(r"^\((spec-\d+(?:-\d+)*)\)=[ \t]*$", re.M)
HEADING = re.compile(r"^#{2,6} (\d+(?:\.\d+)*)\.? ", re.M)
# "docs/spec.md §3.4, §3.5 and §6.1", "spec §7.5", "docs/spec.md §1.1–1.2": every number is checked.
TEXT_CITATION = re.compile(r"\bspec(?:\.md)?\s*(§\s*\d+(?:\.\d+)*(?:\s*(?:,|and|or|to|–|-)\s*§?\s*\d+(?:\.\d+)*)*)")
NUMBER = re.compile(r"\d+(?:\.\d+)*")
# Markdown links "spec.md#spec-7-2" and MyST references "<spec-7-2>".
ANCHOR = re.compile(r"spec\.md#(spec-[\w-]+)|<(spec-[\w-]+)>")
LINK = re.compile(r"\[spec §(\d+(?:\.\d+)*)\]\([^)\s]*spec\.md#spec-([\w-]+)\)")

OUTSIDE = {
    "the external contract's section sign": re.compile(r"SPEC §"),
    "the external contract by name": re.compile(r"\bSPEC\b|\bSPEC\.md\b|\bDESIGN\.md\b"),
    "the shared folder beside the repository": re.compile(r"\.\./shared/"),
    "an issue by number": re.compile(r"\b[Ii]ssues? #?\d+"),
    "an issue's possessive": re.compile(r"\bthe issue" + "'s", re.I),
    "an issue by name": re.compile(r"\(issue\b|\bthe [A-Z][A-Za-z]* issue\b"),
}


def _section(target):
    """``spec-7-2`` -> ``7.2``."""
    return target[len("spec-"):].replace("-", ".")


def defined_sections():
    return {_section(t) for t in TARGET.findall(SPEC_PAGE.read_text(encoding="utf-8"))}


def tracked_text_files():
    """(path relative to the root, text) of every tracked file that reads as UTF-8 text."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"needs a git checkout to list the tracked files: {error}")
    files = []
    for name in listing.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        try:
            files.append((name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # images and other binary files
    assert files, "git ls-files listed no readable file"
    return files


def citations(text):
    """(section number, line number, the citation as written) of every citation in ``text``."""
    found = []
    for match in TEXT_CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found += [(number, line, match.group(0)) for number in NUMBER.findall(match.group(1))]
    for match in ANCHOR.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append((_section(match.group(1) or match.group(2)), line, match.group(0)))
    return found


def outside_references(files):
    found = []
    for name, text in files:
        if name == THIS_FILE:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for what, pattern in OUTSIDE.items():
                if pattern.search(line):
                    found.append(f"{name}:{number}: {what}: {line.strip()[:120]}")
    return found


def test_every_target_names_the_heading_below_it():
    text = SPEC_PAGE.read_text(encoding="utf-8")
    targets = list(TARGET.finditer(text))
    assert len(targets) >= 10, "docs/spec.md defines too few section targets"
    for match in targets:
        heading = HEADING.match(text, match.end() + 1)
        assert heading, f"{match.group(0)} is not directly followed by a numbered heading"
        assert heading.group(1) == _section(match.group(1)), (match.group(0), heading.group(0))
    numbers = [_section(m.group(1)) for m in targets]
    assert len(numbers) == len(set(numbers)), "a section number is defined twice"


def test_citation_patterns_find_what_they_should():
    # The scanners themselves can fail: a citation they missed would pass unchecked.
    text = ("see docs/spec.md §3.4, §3.5 and §6.1\n(spec §1.1–1.2)\n"
            "[spec §7.5](../docs/spec.md#spec-7-5) and {ref}`spec §2 <spec-2>`\n")
    assert [c[0] for c in citations(text)] == ["3.4", "3.5", "6.1", "1.1", "1.2", "7.5", "2", "7.5", "2"]
    assert [c[1] for c in citations(text)] == [1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert citations("PerforationSpec, the spec is silent, §7 alone") == []
    bad = [("a.py", "(SPEC §2)"), ("b.md", "see .." + "/shared/DESIGN.md"), ("c.py", "# GPU-sized (issue " + "4)"),
           ("d.md", "The issue" + "'s closing note"), ("e.py", "Experiments of the PACT issue"),
           ("f.py", "targets (issue: training stack)"), ("g.md", "the contract (SPEC) left room")]
    assert len({line.split(":")[0] for line in outside_references(bad)}) == len(bad)
    assert outside_references([("h.py", "class PerforationSpec: an issue of numerics")]) == []


def test_every_cited_section_is_defined():
    defined = defined_sections()
    missing = [f"{name}:{line}: {written!r} -> §{number}"
               for name, text in tracked_text_files() for number, line, written in citations(text)
               if number not in defined]
    assert not missing, "sections cited but not defined in docs/spec.md:\n" + "\n".join(missing)


def test_links_name_the_section_they_point_to():
    wrong = [f"{name}: [spec §{shown}] points to spec-{anchor}"
             for name, text in tracked_text_files() for shown, anchor in LINK.findall(text)
             if shown.replace(".", "-") != anchor]
    assert not wrong, "\n".join(wrong)


def test_docs_and_notebooks_refer_to_nothing_outside_the_repository():
    files = [(n, t) for n, t in tracked_text_files() if not n.endswith(".py")]
    found = outside_references(files)
    assert not found, "references that lead outside the repository:\n" + "\n".join(found)


def test_code_refers_to_nothing_outside_the_repository():
    files = [(n, t) for n, t in tracked_text_files() if n.endswith(".py")]
    found = outside_references(files)
    assert not found, "references that lead outside the repository:\n" + "\n".join(found)


def test_the_act_golden_table_of_the_spec_is_what_the_code_computes():
    """The page's §7.5 table, parsed, against the halting math: the page cannot drift from the code."""
    import numpy as np

    from refimpl.halting import halting_forward, ponder_cost_grad

    text = SPEC_PAGE.read_text(encoding="utf-8")
    section = text[text.index("(spec-7-5)="):text.index("(spec-8)=")]
    rows = [line for line in section.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 3, rows

    def numbers(cell):
        return [float(v.replace("−", "-")) for v in cell.split(",")]

    for row in rows:
        h, n, remainder, rho, p, drho = [c.strip() for c in row.strip("|").split("|")]
        result = halting_forward(np.array(numbers(h)), eps=0.01)
        assert int(result.n_units) == int(n), row
        np.testing.assert_allclose(result.remainder, float(remainder), atol=1e-12, err_msg=row)
        np.testing.assert_allclose(result.rho, float(rho), atol=1e-12, err_msg=row)
        np.testing.assert_allclose(result.p, numbers(p), atol=1e-12, err_msg=row)
        np.testing.assert_array_equal(ponder_cost_grad(np.array(numbers(h))), numbers(drho))
