"""Imports inside lm_ce/ flow one way: no cycle (imports inside functions count), and no module imports
another's private (`_name`) names."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lm_ce"


def module_name(path: Path) -> str:
    return "__init__" if path.name == "__init__.py" else path.stem


def imports_of(tree: ast.AST, modules: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported lm_ce module, names taken from it, line) for every import in the tree, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and node.module is None:  # from . import x, y
                found += [(n, [], node.lineno) for n in names if n in modules]
            elif node.level == 1:  # from .x import y (or from .x.y import z)
                found.append((node.module.split(".")[0], names, node.lineno))
            elif node.level == 0 and node.module == "lm_ce":  # from lm_ce import x
                found += [(n, [], node.lineno) for n in names if n in modules]
            elif node.level == 0 and node.module and node.module.startswith("lm_ce."):
                found.append((node.module.split(".")[1], names, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lm_ce."):
                    found.append((alias.name.split(".")[1], [], node.lineno))
    return found


def graph_of(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the lm_ce modules it imports}, ["a.py:12 imports _x from b", ...]) for a package directory."""
    paths = sorted(package.glob("*.py"))
    modules = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for path in paths:
        me = module_name(path)
        for target, names, line in imports_of(ast.parse(path.read_text(encoding="utf-8")), modules):
            if target not in modules or target == me:
                continue
            if target != "__init__":  # `from . import __version__` reads the package, which imports lazily
                graph[me].add(target)
            private += [f"{path.name}:{line} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
        private += private_attributes(path, modules)
    return graph, private


def private_attributes(path: Path, modules: set[str]) -> list[str]:
    """["a.py:12 reads b._x", ...]: private names read through a module imported as a name (`from . import b`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 and node.module is None or node.module == "lm_ce"):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
    return [f"{path.name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
            and node.attr.startswith("_") and not node.attr.startswith("__")]


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_inside_lm_ce():
    cycle = cycle_in(graph_of(PACKAGE)[0])
    assert cycle is None, "import cycle inside lm_ce/: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    private = graph_of(PACKAGE)[1]
    assert not private, "private names imported across modules: " + "; ".join(private)


def test_the_checks_find_a_cycle_through_a_function_and_a_private_import(tmp_path):
    """The checks themselves: a cycle closed by an import inside a function, and `from .a import _x`."""
    (tmp_path / "a.py").write_text("from . import b\n_x = 1\n")
    (tmp_path / "b.py").write_text("def f():\n    import lm_ce.c\n")
    (tmp_path / "c.py").write_text("def g():\n    from .a import _x\n")
    (tmp_path / "d.py").write_text("from lm_ce.a import b\nfrom . import a as first\nfirst._x\n")
    graph, private = graph_of(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle_in(graph) == ["a", "b", "c", "a"]
    assert private == ["c.py:2 imports _x from a", "d.py:3 reads a._x"]
    assert cycle_in({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
