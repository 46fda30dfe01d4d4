"""The package structure: no import cycle among the modules of pipeline/ and data_prep/, no file
too long to read, and each shared file name written in one module only.

Imports are read with ``ast`` (no module is executed): those at module level and those inside
functions (lazy imports close a cycle as surely, only later). ``from pkg import name`` is an import of
the submodule ``pkg.name`` when there is one, else of ``pkg/__init__.py``; ``import a.b`` and
``from a.b import x`` import ``a.b`` itself (its parent packages are already initializing, or done).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``PACKAGES`` (a package is its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The dotted name a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    return {m for m in out if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, path, modules) for m, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component
    with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_one_cycle(graph, c) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search)."""
    start = min(component)
    parents = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_no_import_cycle_among_pipeline_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_import_walker_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The walker itself: a cycle closed by a lazy import, a relative import and a ``from pkg import
    submodule`` is found; ``from pkg import name`` counts as an import of pkg/__init__."""
    modules = {
        "p": tmp_path / "p" / "__init__.py",
        "p.a": tmp_path / "p" / "a.py",
        "p.b": tmp_path / "p" / "b.py",
    }
    for path in modules.values():
        path.parent.mkdir(exist_ok=True)
    modules["p"].write_text("from p.a import thing\n")
    modules["p.a"].write_text("from . import b\nthing = 1\n")
    modules["p.b"].write_text("def f():\n    from p import thing\n")
    graph = {m: imports_of(m, path, modules) for m, path in modules.items()}
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}}
    assert cycles(graph) == [["p", "p.a", "p.b", "p"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


MAX_LINES = 450


def test_no_source_file_over_450_lines():
    """A file past ~450 lines holds several concerns: split it by concern, not by line count."""
    long = {
        str(p.relative_to(REPO)): n
        for p in project_modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# Each name a save folder, a data folder or a Hugging Face folder shares: the one module that spells it.
OWNERS = {
    "tokenizer.json": "pipeline/hf_names.py",
    "manifest.json": "data_prep/manifest.py",
    "index.json": "data_prep/manifest.py",
}


def test_each_shared_file_name_is_written_in_its_owner_only():
    """Everyone else imports the owner's constant, so a rename cannot miss a reader."""
    found = {}
    for path in project_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in OWNERS:
                found.setdefault(node.value, set()).add(str(path.relative_to(REPO)))
    assert found == {name: {owner} for name, owner in OWNERS.items()}
