"""No import cycles in the project's packages (issue 12): an edge for every import a module runs,
at module level or inside a function (a lazy import that only breaks a cycle is still a cycle);
imports under `if TYPE_CHECKING:` never run and are not edges. And hest_core's layers (its
`__init__.py`): no module imports a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hest_core", "server", "training", "loadtest")
# hest_core's layers, lowest first (hest_core/__init__.py): the foundation modules at the top
# level, then each subpackage, then the entry points. A module may import its own layer and those
# below it, never one above; a new top-level module must be placed here.
LAYERS = (
    (
        "hest_core.errors",
        "hest_core.paths",
        "hest_core.config",
        "hest_core.cachedirs",
        "hest_core.dtypes",
    ),
    ("hest_core.exec",),
    ("hest_core.adapter",),
    ("hest_core.energy",),
    ("hest_core.runtime",),
    ("hest_core", "hest_core.__main__", "hest_core.bench"),
)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _edges(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports when it runs."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from X import Y` runs X, or only the submodule X.Y where Y is one
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    files = sorted((ROOT / package).rglob("*.py"))
    modules = {_module(f) for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    graph = {_module(f): _edges(f, modules) for f in files}
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 1:
            cycle = path[path.index(mod) :] + [mod]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if state.get(mod) == 2 or mod not in graph:
            return
        state[mod] = 1
        for nxt in sorted(graph[mod]):
            if nxt.startswith(package):
                visit(nxt, [*path, mod])
        state[mod] = 2

    for mod in sorted(graph):
        visit(mod, [])


def _layer(mod: str) -> int | None:
    """The layer of a hest_core module: its longest prefix in LAYERS ("hest_core" alone only for
    the package itself)."""
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            inside = mod == p or (p != "hest_core" and mod.startswith(p + "."))
            if inside and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def test_hest_core_layers():
    files = sorted((ROOT / "hest_core").rglob("*.py"))
    modules = {_module(f) for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    unplaced = [_module(f) for f in files if _layer(_module(f)) is None]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    upward = [
        f"{_module(f)} -> {dep}"
        for f in files
        for dep in sorted(_edges(f, modules))
        if dep.startswith("hest_core") and _layer(dep) > _layer(_module(f))
    ]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)


def test_every_hest_core_package_says_what_it_owns_and_may_import():
    for init in sorted((ROOT / "hest_core").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        assert "may import" in doc.lower(), f"{init.relative_to(ROOT)}: say what it may import"
