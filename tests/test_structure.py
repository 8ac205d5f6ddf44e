"""The package's modules import downward only: no import circle, no import that climbs a layer,
imports inside functions counted.

Walks the source of every module of `pe_export/` with `ast`, so an import hidden in a function body is
an edge like any other, and fails naming every circle and every upward import it finds. The layers
are LAYERS below, the one place they are written (docs/architecture.md explains them).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pe_export": ROOT / "pe_export"}


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


# The layers, bottom first: a module may import from its own layer and the layers below it. A name
# stands for that module and everything under it (`pe_export` for the package root alone); the longest
# matching name decides a module's layer, and a module no name covers fails the test.
LAYERS = (
    (
        "pe_export.errors",
        "pe_export.dtypes",
        "pe_export.registry",
        "pe_export.presets",
        "pe_export.files",
        "pe_export.spec",
        "pe_export.weights",
    ),  # leaves: no torch, no onnx at import
    ("pe_export.scaling", "pe_export.hf_config"),  # RoPE scaling rules; Hugging Face configs read into them
    ("pe_export.custom_ops",),  # the rotation math, the torch custom op and its three ONNX lowerings
    ("pe_export.encodings",),  # one file per encoding, their contracts, probes and float64 references
    ("pe_export.runtimes",),  # one adapter per runtime, the worker process that isolates each
    ("pe_export.verification",),  # tolerances, the parity check, reports, bundles
    ("pe_export.pipeline",),  # spec -> checked, packaged ONNX file -> verified
    ("pe_export.tools",),  # bench, plot, inspect, the compatibility matrix
    ("pe_export.rewriter",),  # whole exported models: find RoPE sites, rewrite, check
    ("pe_export", "pe_export.api", "pe_export.patching"),  # the public API
    ("pe_export.cli",),  # parses and prints
)


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or (module.startswith(name + ".") and name != "pe_export")) and len(name) > best:
                best, found = len(name), i
    if found is None:
        raise AssertionError(f"{module} is in no layer of LAYERS")
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer, as 'importer -> imported'."""
    return sorted(
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )


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


def test_the_layer_check_fails_on_an_upward_import():
    """The check itself can fail: an encoding importing the verification layer is reported."""
    graph = {"pe_export.encodings.rope": {"pe_export.verification.parity"}, "pe_export.verification.parity": set()}
    assert upward(graph) == ["pe_export.encodings.rope (layer 3) -> pe_export.verification.parity (layer 5)"]


def test_every_module_is_in_a_layer_and_imports_downward():
    found = upward(import_graph())
    assert not found, "imports that climb a layer (tests/test_structure.py LAYERS):\n" + "\n".join(found)


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (each line one circle; imports inside functions count):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_rewrite_cli_imports_no_onnxscript():
    """The rewrite's choices live in pe_export.rewriter's light __init__: its CLI module loads no
    onnxscript and no torch (one copy of OPS and RUNTIMES, none typed again in the CLI)."""
    import subprocess
    import sys

    code = "import sys, pe_export.cli.rewrite; print('onnxscript' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"], done.stdout
