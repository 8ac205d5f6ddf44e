"""The package's modules import downward only: no import circle, imports inside functions counted.

Walks the source of every module of the installed layout (`pe_export/`, `custom_ops/` as
`pe_export.custom_ops`, `cli/` as `pe_export.cli`) with `ast`, so an import hidden in a function body
is an edge like any other, and fails naming every circle it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pe_export": ROOT / "pe_export", "pe_export.custom_ops": ROOT / "custom_ops", "pe_export.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    """{dotted module name: source file} for every module of the package."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its source (top level, functions, classes)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:  # `from pkg import sub` imports the submodule when there is one
                targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    resolved = set()
    for t in targets:
        while t and t not in known:  # `import a.b.c` names a.b.c; an attribute path falls back to its module
            t = t.rpartition(".")[0]
        if t and t != name:
            resolved.add(t)
    return resolved


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_inside_functions(tmp_path):
    """The check itself can fail: a circle made only of a function-level import is found."""
    (tmp_path / "a.py").write_text("import pkg.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import a\n")
    known = {"pkg.a", "pkg.b"}
    graph = {n: imports(n, tmp_path / f"{n[-1]}.py", known) for n in known}
    assert circles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (each line one circle; imports inside functions count):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_rewrite_clis_import_free_copies_match_the_library():
    """cli/rewrite.py keeps copies of the rewriter's choices so that `--help` imports no onnxscript."""
    from pe_export.cli import rewrite
    from pe_export.rewriter import core, verify

    assert rewrite.OPS == core.OPS and rewrite.RUNTIMES == verify.RUNTIMES
    assert rewrite.DEFAULT_RUNTIMES == verify.DEFAULT_RUNTIMES
