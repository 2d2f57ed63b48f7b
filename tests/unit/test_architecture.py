"""The layout's rules, checked on the source: imports flow one way, no circles (not even
under TYPE_CHECKING or inside functions), no mutable module state.

    process  ->  proxy  ->  backend  ->  security, observe  ->  wire, errors, config, ...
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "dvara_lib"
#: Higher layers may import lower ones only; the root modules are the shared vocabulary.
LAYERS = {"process": 4, "proxy": 3, "backend": 2, "security": 1, "observe": 1}
ROOT_LAYER = 0
_MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "deque", "count", "Lock", "RLock",
                  "Event", "local", "WeakSet", "WeakValueDictionary", "OrderedDict"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every dvara_lib module that name imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS[parts[1]], parts[1]
    return ROOT_LAYER, "root"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_the_packages():
    edges = graph()
    assert {"dvara_lib.proxy.relay", "dvara_lib.backend.pool", "dvara_lib.wire"} <= set(edges)
    assert "dvara_lib.backend.pool" in edges["dvara_lib.proxy.dataplane"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_no_import_circles():
    assert cycles(graph()) == []


def test_imports_flow_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        rank, package = layer(module)
        for target in targets:
            target_rank, target_package = layer(target)
            if target_package != package and target_rank >= rank:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


@pytest.mark.parametrize("path", sorted(modules().values()), ids=lambda p: p.name)
def test_no_mutable_module_state(path: Path):
    """No ``global`` rebinding; module-level names bound to mutable objects are
    UPPER_CASE tables that are never changed."""
    tree = ast.parse(path.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)]
    tables = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)
                     and not t.id.startswith("__")]
            if _mutable(node.value):
                assert all(n.lstrip("_").isupper() for n in names), (path, names)
                tables.update(names)
    changed = [ast.unparse(n) for n in ast.walk(tree) if _changes(n, tables)]
    assert changed == [], path


def _changes(node: ast.AST, tables: set[str]) -> bool:
    """node changes one of the module's tables (an item set or deleted, a mutator call)."""
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        return any(isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                   and t.value.id in tables for t in targets)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = node.func.value
        return isinstance(owner, ast.Name) and owner.id in tables and node.func.attr in _MUTATORS
    return False


_MUTATORS = {"append", "extend", "insert", "add", "update", "pop", "popitem", "clear",
             "remove", "discard", "setdefault"}


def _mutable(value: ast.expr) -> bool:
    if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp,
                          ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        func = value.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return called in _MUTABLE_CALLS
    return False
