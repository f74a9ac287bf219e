"""The package layout stays as docs/layout.md draws it: small modules, one direction of imports (the ops <- the
settings <- the transformers glue <- the patching layer <- the tools), no import cycles (imports inside functions
included, so none hides one), no module importing another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sb_hf"
MAX_LINES = 420  # "files under ~400 lines"
# Each layer may import its own and the layers before it (by module name prefix; the first match wins).
LAYERS = [("sb_hf.ops", 0), ("sb_hf.config", 1), ("sb_hf.integrations", 2), ("sb_hf.patches", 3), ("sb_hf", 4)]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    return next(rank for prefix, rank in LAYERS if name == prefix or name.startswith(prefix + "."))


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every sb_hf import of a module, wherever it is."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "sb_hf"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "sb_hf":
                continue
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            found += [(f"{base}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((base, rest, node.lineno))
    return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concept (docs/layout.md)"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_one_way_and_take_no_private_names(name):
    for target, names, line in imports(name):
        assert target in MODULES, f"{name}:{line} imports {target}, which does not exist"
        assert layer(target) <= layer(name), f"{name}:{line} imports {target}, a later layer (docs/layout.md)"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{name}:{line} imports private names {private} of {target}; make them public or move them"


def test_no_import_cycles():
    graph = {name: sorted({target for target, _, _ in imports(name) if target != name}) for name in MODULES}
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name)


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a planted private import are reported."""
    (tmp_path / "sb_hf").mkdir()
    (tmp_path / "sb_hf" / "__init__.py").write_text("")
    (tmp_path / "sb_hf" / "a.py").write_text("def f():\n    from .b import _g\n")
    (tmp_path / "sb_hf" / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "sb_hf")
    planted = {module_name(p): p for p in sorted((tmp_path / "sb_hf").rglob("*.py"))}
    monkeypatch.setattr(__import__(__name__), "MODULES", planted)
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="private names"):
        test_imports_go_one_way_and_take_no_private_names("sb_hf.a")
