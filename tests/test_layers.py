"""The package's layers, read from its source with ``ast`` (nothing is imported): no import cycle,
no Ray or MLflow in the plain PyTorch/NumPy floors, and a search space that loads without torch.

Every module under ``jdcl_ray/`` is read, so a new module is checked without listing it. Each
check takes a package folder, and is also run on a small package written to ``tmp_path`` to show
that it fails when it should.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jdcl_ray"
# Plain PyTorch/NumPy: testable without a Ray cluster or an MLflow store (a name stands for the
# module and, for a package, every module in it).
PLAIN = (
    "data",
    "augment",
    "models",
    "losses",
    "objective",
    "metrics",
    "checkpoint",
    "config",
    "distributed",
    "pretrained",
)
EDGE_LIBRARIES = ("ray", "mlflow")


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name: "ray.tune", "jdcl_ray.data", "jdcl_ray.data.longtail"
    line: int
    runtime: bool  # runs when the module is imported: not in a function, not under TYPE_CHECKING


@dataclass
class Module:
    name: str
    where: str  # its file, from the package's parent folder: "jdcl_ray/data/prepare.py"
    path: Path
    is_package: bool
    imports: list[Import] = field(default_factory=list)


Graph = dict[str, Module]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, runtime: bool = True) -> Iterator[tuple[ast.AST, bool]]:
    """Every import statement (and ``importlib.import_module("...")`` call) under ``node``, with
    whether it runs at import time."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _import_nodes(child, False)
        for child in node.orelse:
            yield from _import_nodes(child, runtime)
        return
    if isinstance(node, ast.Import | ast.ImportFrom) or (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        yield node, runtime
    inner = runtime and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child, inner)


def _targets(node: ast.AST, module: Module, known: set[str]) -> list[str]:
    """The modules an import statement loads, by absolute name. ``from P import x`` loads P and,
    where x is a module of the package, P.x too."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.Call):  # importlib.import_module("absolute.name")
        return [node.args[0].value]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = module.name.split(".")
        if not module.is_package:
            package.pop()
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    return [base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)]


def load(folder: Path) -> Graph:
    """Every module of the package in ``folder`` (named after the folder) with its imports."""
    modules: Graph = {}
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [folder.name, *path.relative_to(folder).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, str(path.relative_to(folder.parent)), path, is_package)
    known = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
        for node, runtime in _import_nodes(tree):
            for target in _targets(node, module, known):
                module.imports.append(Import(target, node.lineno, runtime))
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _known_prefix(name: str, graph: Graph) -> str | None:
    while name and name not in graph:
        name = name.rpartition(".")[0]
    return name or None


def edges(graph: Graph, name: str, runtime_only: bool = False) -> dict[str, int]:
    """The package's modules that ``name`` imports, each with the line of its first import.

    Importing ``P.sub.x`` from outside ``P.sub`` also runs ``P/sub/__init__.py`` (an edge to
    ``P.sub``, which reaches whatever that ``__init__`` imports, and no more); from inside, that
    ``__init__`` is already running, so there is no edge back to it.
    """
    found: dict[str, int] = {}
    own = {name, *_ancestors(name)}
    for item in graph[name].imports:
        if runtime_only and not item.runtime:
            continue
        target = _known_prefix(item.target, graph)
        if target is None:
            continue
        for loaded in (*_ancestors(target), target):
            if loaded not in own:
                found.setdefault(loaded, item.line)
    return found


def cycles(graph: Graph) -> list[str]:
    """One line per import cycle (a strongly connected group of modules): a loop through it,
    with the line of each import, and every module of the group."""
    out = {name: edges(graph, name) for name in graph}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(name: str) -> None:  # Tarjan's algorithm
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in out[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while not group or group[-1] != name:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return [_describe_cycle(group, out, graph) for group in groups]


def _describe_cycle(group: list[str], out: dict[str, dict[str, int]], graph: Graph) -> str:
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth first: the shortest loop back to `start` inside the group
        name = queue.pop(0)
        for target in sorted(out[name]):
            if target == start:
                loop = [*paths[name], start]
                steps = " -> ".join(
                    f"{a} ({graph[a].where}:{out[a][b]})" for a, b in itertools.pairwise(loop)
                )
                return f"{steps} -> {start}; modules in the cycle: {', '.join(group)}"
            if target in members and target not in paths:
                paths[target] = [*paths[name], target]
                queue.append(target)
    raise AssertionError(f"no loop found in {group}")


def _top(target: str) -> str:
    return target.split(".")[0]


def in_layer(graph: Graph, layer: str) -> list[str]:
    """The module ``layer`` or, for a package, it and every module in it."""
    return [name for name in sorted(graph) if name == layer or name.startswith(f"{layer}.")]


def loaded_on_import(
    graph: Graph, start: str, libraries: tuple[str, ...] = (), modules: tuple[str, ...] = ()
) -> list[str]:
    """How ``start`` gets one of ``libraries`` (top-level names) or of the package's ``modules``:
    by importing it itself, at the top or inside a function, or through the package modules it
    imports at import time (their ``__init__`` packages included), through theirs, and so on."""
    parents: dict[str, str | None] = {start: None}
    for ancestor in _ancestors(start):  # importing `start` runs its packages' __init__ first
        parents[ancestor] = start
    queue = [start, *_ancestors(start)]
    found = []

    def chain(name: str) -> list[str]:
        names = [name]
        while (parent := parents[names[-1]]) is not None:
            names.append(parent)
        return names[::-1]

    while queue:
        name = queue.pop(0)
        where, runtime_only = graph[name].where, name != start
        hits = [
            (item.target, item.line)
            for item in graph[name].imports
            if _top(item.target) in libraries and (item.runtime or not runtime_only)
        ]
        hits += [(t, line) for t, line in edges(graph, name, runtime_only).items() if t in modules]
        found += [f"{' -> '.join([*chain(name), t])} ({where}:{line})" for t, line in hits]
        for target in edges(graph, name, runtime_only=True):
            if target not in parents:
                parents[target] = name
                queue.append(target)
    return found


# ------------------------------------------------------------------------------ this package


def test_the_package_has_no_import_cycle():
    found = cycles(load(PACKAGE))
    assert not found, "import cycles (lazy imports count too):\n" + "\n".join(found)


def test_plain_layers_import_no_ray_or_mlflow():
    graph = load(PACKAGE)
    layers = [f"{PACKAGE.name}.{name}" for name in PLAIN]
    missing = [layer for layer in layers if layer not in graph]
    assert not missing, f"no such module: {missing} (update PLAIN in tests/test_layers.py)"
    found = [
        problem
        for layer in layers
        for name in in_layer(graph, layer)
        for problem in loaded_on_import(graph, name, EDGE_LIBRARIES)
    ]
    assert not found, "Ray/MLflow in a plain layer:\n" + "\n".join(dict.fromkeys(found))


def test_a_search_space_loads_without_torch_or_the_engine():
    found = loaded_on_import(
        load(PACKAGE),
        f"{PACKAGE.name}.space",
        ("torch", "torchvision"),
        (f"{PACKAGE.name}.engine",),
    )
    assert not found, "jdcl_ray.space loads torch or the engine:\n" + "\n".join(found)


# ---------------------------------------------------------- the checks fail when they should


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` from {relative path: source}; every folder gets an
    ``__init__.py`` (empty unless given)."""
    package = root / "pkg"
    for relative, source in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return package


def test_a_cycle_is_found_and_named_even_through_a_lazy_import(tmp_path):
    package = write_package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": "def later():\n    from . import a\n",
            "c.py": "import pkg.a\n",  # imports into the cycle, is not part of it
        },
    )
    (found,) = cycles(load(package))
    assert found.startswith("pkg.a (pkg/a.py:1) -> pkg.b (pkg/b.py:2) -> pkg.a"), found
    assert found.endswith("modules in the cycle: pkg.a, pkg.b"), found


def test_a_package_init_ties_modules_only_through_what_it_imports(tmp_path):
    files = {
        "top.py": "from pkg.sub.leaf import value\n",
        "sub/leaf.py": "value = 1\n",
        "sub/other.py": "import pkg.top\n",
        "sub/__init__.py": "",
    }
    assert cycles(load(write_package(tmp_path / "empty_init", files))) == []
    files["sub/__init__.py"] = "from pkg.sub.other import *\n"  # now importing leaf runs other
    (found,) = cycles(load(write_package(tmp_path / "full_init", files)))
    assert "modules in the cycle: pkg.sub, pkg.sub.other, pkg.top" in found, found


def test_ray_or_mlflow_in_a_plain_layer_is_found_at_any_depth(tmp_path):
    package = write_package(
        tmp_path,
        {
            "data/load.py": "import numpy\n\ndef read():\n    import ray.data\n",
            "metrics.py": "from pkg import tracking\n",
            "tracking.py": "import mlflow\n\ndef later():\n    import ray\n",
            "report.py": "import mlflow\n",  # not a plain layer
        },
    )
    graph = load(package)
    assert in_layer(graph, "pkg.data") == ["pkg.data", "pkg.data.load"]
    assert loaded_on_import(graph, "pkg.data.load", EDGE_LIBRARIES) == [
        "pkg.data.load -> ray.data (pkg/data/load.py:4)"
    ]
    assert loaded_on_import(graph, "pkg.data", EDGE_LIBRARIES) == []  # `read` must be called
    assert loaded_on_import(graph, "pkg.metrics", EDGE_LIBRARIES) == [
        "pkg.metrics -> pkg.tracking -> mlflow (pkg/tracking.py:1)"
    ]


def test_torch_or_the_engine_behind_the_space_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "space.py": "from pkg.config import Config\n\ndef run():\n    from pkg import engine\n",
            "config.py": "from pkg import augment\n\ndef later():\n    import torchvision\n",
            "augment.py": "import torch.nn\n",
            "engine.py": "",
        },
    )
    found = loaded_on_import(load(package), "pkg.space", ("torch", "torchvision"), ("pkg.engine",))
    assert found == [
        "pkg.space -> pkg.engine (pkg/space.py:4)",
        "pkg.space -> pkg.config -> pkg.augment -> torch.nn (pkg/augment.py:1)",
    ]
