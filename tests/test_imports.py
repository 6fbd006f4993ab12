"""The layout holds: imports inside lm_ce/ flow one way, down the layers of packages (imports inside functions
count), with no cycle between modules and no private name taken from another module; scripts/ has no cycle either;
each package's __init__ says what it may import; no module is over 350 lines and no function takes more than 7
parameters."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lm_ce"

# Bottom to top. A module may import from its own package (or top-level module) and from the layers below; the
# packages of one layer are siblings that do not import each other.
LAYERS = [
    ("errors",),
    ("files", "compat", "config"),
    ("data", "model", "sums"),
    ("rundir",),
    ("scoring",),
    ("analysis", "reports", "tasks"),
    ("suite",),
    ("runner",),
    ("explain",),
    ("integrations", "cli"),
]
MAX_LINES = 350
MAX_PARAMETERS = 7


def module_name(path: Path, root: Path) -> str:
    """'data.documents' for root/data/documents.py, 'data' for root/data/__init__.py, '' for root/__init__.py."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, package: str) -> list[tuple[str, list[str], int]]:
    """(imported module of the tree, names taken from it, line) for every import in the file, at any depth, with
    `from pkg import module` read as an import of that module."""
    me = module_name(path, root)
    here = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                target = ".".join([*base, *(node.module.split(".") if node.module else [])]).strip(".")
            elif node.module == package or (node.module or "").startswith(package + "."):
                target = node.module[len(package) + 1:]
            else:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}".strip(".") for n in names if f"{target}.{n}".strip(".") in modules]
            found += [(m, [], node.lineno) for m in submodules]
            rest = [n for n in names if f"{target}.{n}".strip(".") not in modules]
            if rest:
                found.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name[len(package) + 1:], [], node.lineno) for a in node.names
                      if a.name.startswith(package + ".")]
    return found


def graph_of(root: Path, package: str = "lm_ce") -> tuple[dict[str, set[str]], list[str]]:
    """({module: the modules of the tree it imports}, ["a/b.py:12 imports _x from c", ...])."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for path in paths:
        me = module_name(path, root)
        for target, names, line in imports_of(path, root, package):
            if target not in modules or target == me:
                continue
            if target:  # the package's own __init__ (`from lm_ce import __version__`) imports lazily
                graph[me].add(target)
            private += [f"{path.relative_to(root)}:{line} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    return graph, private


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a.b imports c.d' for each import that goes up a layer or across to a sibling package."""
    bad = []
    for module, targets in sorted(graph.items()):
        if not module:
            continue
        for target in sorted(targets):
            if module.split(".")[0] == target.split(".")[0]:
                continue
            if layer_of(target) >= layer_of(module):
                bad.append(f"{module} imports {target}")
    return bad


def test_no_import_cycle_inside_lm_ce():
    cycle = cycle_in(graph_of(PACKAGE)[0])
    assert cycle is None, "import cycle inside lm_ce/: " + " -> ".join(cycle)


def test_imports_go_down_the_layers():
    unplaced = {m.split(".")[0] for m in graph_of(PACKAGE)[0] if m} - {p for layer in LAYERS for p in layer}
    assert not unplaced, f"modules or packages of lm_ce/ in no layer: {sorted(unplaced)}; add them to LAYERS"
    bad = upward_imports(graph_of(PACKAGE)[0])
    assert not bad, "imports against the layers: " + "; ".join(bad)


def test_each_package_says_what_it_may_import():
    """The `May import:` line of each package's __init__ names exactly the lower layers' packages it uses at most."""
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        name = init.parent.name
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        line = next((ln for ln in doc.splitlines() if ln.startswith("May import:")), None)
        assert line, f"{init}: its docstring has no 'May import:' line"
        below = {p for layer in LAYERS[: layer_of(name)] for p in layer}
        used = {t.split(".")[0] for m, ts in graph_of(PACKAGE)[0].items() if m.split(".")[0] == name for t in ts}
        used -= {name}
        said = line[len("May import:"):].strip().rstrip(".")
        if said.startswith("every package but "):
            allowed = below
        elif said.startswith("nothing"):
            allowed = set()
        else:
            allowed = {w.strip() for w in said.split(",")}
        assert allowed <= below, f"{init}: says it may import {sorted(allowed - below)}, which are not below it"
        assert used <= allowed, f"{init}: imports {sorted(used - allowed)}, which its 'May import' line leaves out"


def test_no_module_imports_a_private_name_of_another():
    private = graph_of(PACKAGE)[1]
    assert not private, "private names imported across modules: " + "; ".join(private)


def test_no_import_cycle_in_the_benchmark_scripts():
    graph = graph_of(ROOT / "scripts", package="bench")[0]
    cycle = cycle_in({k: v for k, v in graph.items()})
    assert cycle is None, "import cycle inside scripts/: " + " -> ".join(cycle)


def test_modules_and_functions_stay_small():
    """No module of lm_ce/ or scripts/ over MAX_LINES lines; no function with more than MAX_PARAMETERS parameters."""
    long, wide = [], []
    for root in (PACKAGE, ROOT / "scripts"):
        for path in sorted(root.rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if len(text.splitlines()) > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = node.args
                    count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                    count -= bool(a.args) and a.args[0].arg in ("self", "cls")
                    if count > MAX_PARAMETERS:
                        wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count})")
    assert not long, "modules over 350 lines: " + ", ".join(long)
    assert not wide, "functions with more than 7 parameters: " + ", ".join(wide)


def test_the_checks_find_a_cycle_through_a_function_an_upward_import_and_a_private_name(tmp_path):
    """The checks themselves, on a made-up package: a cycle closed by an import inside a function, an import of a
    sibling package, and `from .a import _x`."""
    pkg = tmp_path / "lm_ce"
    (pkg / "data").mkdir(parents=True)
    (pkg / "model").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from lm_ce.data import b\n_x = 1\n")
    (pkg / "data" / "b.py").write_text("def f():\n    import lm_ce.data.c\n")
    (pkg / "data" / "c.py").write_text("def g():\n    from .a import _x\n")
    (pkg / "model" / "d.py").write_text("from lm_ce.data.a import b\nfrom ..data import a as first\n")
    graph, private = graph_of(pkg)
    assert graph["data.a"] == {"data.b"} and graph["data.b"] == {"data.c"} and graph["data.c"] == {"data.a"}
    assert graph["model.d"] == {"data.a"}
    assert cycle_in(graph) == ["data.a", "data.b", "data.c", "data.a"]
    assert private == ["data/c.py:2 imports _x from data.a"]
    assert upward_imports(graph) == ["model.d imports data.a"]  # siblings of one layer
    assert cycle_in({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_design_page_names_every_module():
    """docs/design.md walks the packages and names every module of lm_ce/ (package/module.py, or module.py)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and f"`{p.relative_to(PACKAGE)}`" not in text]
    assert not missing, "docs/design.md does not name: " + ", ".join(missing)
