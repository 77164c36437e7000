"""The package's import graph (issue 24): no circles among cslm_jax's modules, counting imports
inside functions too (a circle there works only by the order modules happen to load);
`errors.py` imports nothing of the package; no private name is imported across modules."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "cslm_jax"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]):
    """(module, imported module, imported name or None, line) for every cslm_jax import."""
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cslm_jax"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in mods:
                        yield name, sub, None, node.lineno
                    else:
                        yield name, node.module, alias.name, node.lineno
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        yield name, alias.name, None, node.lineno


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_and_errors_depends_on_nothing():
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for src, dst, _, _ in _imports(mods):
        if dst in mods and dst != src:
            edges[src].add(dst)
    assert _circles(edges) == []
    assert edges["cslm_jax.errors"] == set()
    # the check finds a circle where there is one
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{src}:{line} imports {dst}.{name}"
        for src, dst, name, line in _imports(_modules())
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert private == []
