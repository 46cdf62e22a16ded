"""The package is layered: no module imports, at import time, one that imports it back, and no
subpackage of megatron_foresight depends on another that depends on it (read from the source,
so a cycle fails here before it fails someone's import). Imports inside functions are the plug
points (stages, environments' built-in modules, heavy optional libraries) and are not counted."""

import ast
from pathlib import Path

from helpers.run import REPO

PACKAGE = REPO / "megatron_foresight"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str) -> set[str]:
    """megatron_foresight modules imported by statements run at import time (module body, and
    `if` / `try` blocks there, except `if TYPE_CHECKING:`)."""
    out, stack = set(), list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [
                n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("megatron_foresight")} - {module}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = _top_level_imports(ast.parse(path.read_text()), name)
        graph[name] = {m for m in imported if m in modules}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731 - megatron_foresight.<part>
    out: dict[str, set[str]] = {}
    for module, imported in graph.items():
        out.setdefault(top(module), set()).update(
            top(m) for m in imported if top(m) != top(module) and m != "megatron_foresight")
    return out


def test_no_module_imports_itself_back():
    assert _cycles(_graph()) == []


def test_no_subpackage_depends_on_one_that_depends_on_it():
    cycles = _cycles(_packages(_graph()))
    graph = _graph()
    detail = [[f"{m} -> {d}" for m in graph for d in graph[m]
               if any(m.startswith(p + ".") or m == p for p in c)
               and any(d.startswith(p + ".") or d == p for p in c)
               and m.split(".")[:2] != d.split(".")[:2]] for c in cycles]
    assert cycles == [], detail


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles(_packages({"megatron_foresight.x.m": {"megatron_foresight.y.n"},
                              "megatron_foresight.y.n": {"megatron_foresight.x.k"},
                              "megatron_foresight.x.k": set()})) == [
        ["megatron_foresight.x", "megatron_foresight.y"]]
