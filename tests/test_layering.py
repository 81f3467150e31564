"""The import structure of ``refimpl``: no cycles, counting imports inside functions too.

A cycle hides which module is the foundation: following a call from a public function should
only go *down* (public function → backend → kernels → plan). The graph is read from the source
with :mod:`ast`, so an import written inside a function counts the same as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "refimpl"


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """``{module: set of refimpl modules it imports}`` (every import statement, at any depth)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module
                targets.add(stem)
                targets.update(f"{stem}.{alias.name}" for alias in node.names)  # `from . import x`
        graph[name] = {t for t in targets if t in modules and t != name and t != "refimpl"}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_refimpl_has_no_import_cycle():
    # The whole package, the command line included: a command reaches the library, never the
    # reverse, and no command module imports another.
    graph = import_graph()
    assert "refimpl.plan" in graph and graph["refimpl.backend"]  # the graph was really read
    assert any(m.startswith("refimpl.commands.") for m in graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_convolution_stack_is_layered_bottom_up():
    # plan at the bottom; kernels and checks above it; the backend seam above them; the public
    # functions on top — each imports only from below.
    graph = import_graph()
    below = {
        "refimpl.plan": {"refimpl._checks"},
        "refimpl.numpy_kernels": {"refimpl.conv"},
        "refimpl.backend_checks": {"refimpl._checks", "refimpl.conv", "refimpl.plan"},
        "refimpl.backend": {"refimpl.backend_checks", "refimpl.numpy_kernels"},
    }
    for module, allowed in below.items():
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"
    for public in ("refimpl.perforation", "refimpl.implicit"):
        assert "refimpl.backend" in graph[public]
        assert all(public not in graph[m] for m in below), f"something below imports {public}"
