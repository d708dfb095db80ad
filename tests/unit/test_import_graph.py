"""The library's import graph: no cycles, and dependencies point down (issue 15, item 4).

Every ``.py`` under the library packages is parsed with ``ast``; every import counts, the ones
inside functions included (a cycle hidden by a function-local import is still a cycle). An import
names the most specific project module it loads: ``from a import b`` is ``a.b`` when ``a/b.py``
or ``a/b/`` exists, else ``a``; relative imports are resolved against the importing module.

Directions (``ALLOWED``): train -> anything; parallelism, offload -> models; checkpoint ->
models.errors only (it learns model metadata from the family's checkpoint adapter, never from
a model's code); models -> models; models.errors (the user-error classes) -> nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("train", "parallelism", "offload", "checkpoint", "models")
PROJECT = (*LIBRARY, "tests", "benchmarks")  # imports of these names are project imports

# Importer package -> the module prefixes it may import ("models" = models and models.*;
# "models.errors" = that module only). A package not listed as a target of another is
# invisible to it: nothing below train imports train, and parallelism, offload and checkpoint
# never import each other.
ALLOWED: dict[str, tuple[str, ...]] = {
    "train": LIBRARY,
    "parallelism": ("parallelism", "models"),
    "offload": ("offload", "models"),
    "checkpoint": ("checkpoint", "models.errors"),
    "models": ("models",),
}
LEAVES = ("models.errors",)  # modules that import nothing from the project

# Known violations allowed while their fix lands: each entry is one import edge the checks
# ignore; test_pending_entries_are_still_needed fails once its import is gone. Empty: the
# issue-15 rewrite removed the last ones (train/ cycles, checkpoint -> models.moe, offload ->
# parallelism).
PENDING: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    """``a/b/c.py`` -> ``a.b.c``; ``a/b/__init__.py`` -> ``a.b``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str:
    """The longest prefix of ``name`` that is a known module (``name``'s top level if none)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return parts[0]


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names of everything ``module`` imports (``from a import b`` gives ``a.b``)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: drop (level - 1) parts of the package, or level of a module
                pkg = module.split(".")
                drop = node.level - 1 if is_package else node.level
                pkg = pkg[: len(pkg) - drop]
                base = ".".join([*pkg, base] if base else pkg)
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def build_graph(root: Path = ROOT, packages: tuple[str, ...] = LIBRARY) -> dict[str, set[str]]:
    """Module -> the project modules it imports (self-imports dropped)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = _imported_names(tree, mod, path.name == "__init__.py")
        targets = {_resolve(n, modules) for n in names if n.split(".")[0] in PROJECT}
        graph[mod] = targets - {mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def forbidden_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges that break ``ALLOWED`` or ``LEAVES``, sorted."""
    bad = []
    for src, targets in graph.items():
        allowed = () if src in LEAVES else ALLOWED.get(src.split(".")[0], ())
        bad += [(src, t) for t in targets if not any(_within(t, a) for a in allowed)]
    return sorted(bad)


def without_pending(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in ts if (m, t) not in PENDING} for m, ts in graph.items()}


def _lines(edges: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}" for a, b in edges)


def test_no_import_cycle():
    cycle = find_cycle(without_pending(build_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_down():
    bad = forbidden_edges(without_pending(build_graph()))
    assert not bad, "forbidden imports (see ALLOWED):\n" + _lines(bad)


def test_errors_module_is_a_leaf():
    assert build_graph()["models.errors"] == set()


def test_pending_entries_are_still_needed():
    """An entry whose import is gone, or that neither breaks a rule nor closes a cycle, must go."""
    graph = build_graph()
    needed = set(forbidden_edges(graph)) | cycle_edges(graph)
    stale = sorted(PENDING - needed)
    assert not stale, "delete these PENDING entries:\n" + _lines(stale)


def cycle_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every edge that lies on some cycle (both ends in one strongly connected component)."""
    reach = {m: _reachable(graph, m) for m in graph}
    return {(a, b) for a, ts in graph.items() for b in ts if b in reach and a in reach[b]}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


# -- the checker itself catches what it is meant to -------------------------------------------


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "offload").mkdir()
    (tmp_path / "offload" / "__init__.py").write_text("")
    (tmp_path / "offload" / "a.py").write_text("from offload import b\n")
    (tmp_path / "offload" / "b.py").write_text("def f():\n    from . import c\n")
    (tmp_path / "offload" / "c.py").write_text("import offload.a as a\n")
    graph = build_graph(tmp_path, ("offload",))
    assert graph["offload.b"] == {"offload.c"}
    assert find_cycle(graph) == ["offload.a", "offload.b", "offload.c", "offload.a"]
    assert find_cycle({**graph, "offload.c": set()}) is None
    assert cycle_edges(graph) == {
        ("offload.a", "offload.b"),
        ("offload.b", "offload.c"),
        ("offload.c", "offload.a"),
    }


def test_checker_finds_forbidden_edges(tmp_path):
    for pkg in ("models", "checkpoint", "train"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "models" / "errors.py").write_text("from models import gpt\n")
    (tmp_path / "models" / "gpt.py").write_text(
        "def f():\n    from train.data import x\n    import tests.ckpt_utils\n"
    )
    (tmp_path / "train" / "data.py").write_text("from models.gpt import g\n")
    (tmp_path / "checkpoint" / "io.py").write_text("from ..models.errors import E\nimport models\n")
    graph = build_graph(tmp_path, ("models", "checkpoint", "train"))
    assert forbidden_edges(graph) == [
        ("checkpoint.io", "models"),  # the models package, not only models.errors
        ("models.errors", "models.gpt"),  # the leaf imports nothing
        ("models.gpt", "tests"),  # library code never imports the tests
        ("models.gpt", "train.data"),
    ]
