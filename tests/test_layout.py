"""The layout rules of the architecture (docs/DESIGN.md): small files and functions, no import
cycles inside the package, one routing-plan class, the pipeline's stage files in every backend.

These read the source tree (no imports of the code under test), so they run in a second.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("flexmoe_kernels", "training", "benchmarks")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if (isinstance(target, ast.Attribute) and target.attr == "jit") or (
            isinstance(target, ast.Name) and target.id == "jit"
        ):
            return True
    return False


def test_no_file_over_600_lines():
    big = {str(p.relative_to(ROOT)): n for p in _py_files(*CODE_DIRS)
           if (n := p.read_text(encoding="utf-8").count("\n")) > MAX_FILE_LINES}
    assert not big, f"files over {MAX_FILE_LINES} lines: {big}"


def test_no_function_over_80_lines_outside_triton_kernels():
    long = []
    for p in _py_files(*CODE_DIRS):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the package modules a file imports, at module level or inside
    functions (a deferred import that only hides a cycle is still a cycle)."""
    mod = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(package):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles_in_the_package():
    files = _py_files("flexmoe_kernels")
    modules = {_module_name(p): p for p in files}
    graph = {m: {t for t in _imports(p, "flexmoe_kernels") if t in modules and t != m}
             for m, p in modules.items()}
    # Edges between a package and its own submodules are how packages work, not cycles.
    graph = {a: {b for b in t if not (a.startswith(b + ".") or b.startswith(a + "."))} for a, t in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_cycles_in_training():
    """The training package (installed as ``flexmoe_training``): no cycle either, deferred
    imports included (demo.pipeline <-> demo.stages through load_tokenizer was one)."""
    files = _py_files("training")
    modules = {_module_name(p): p for p in files}
    graph = {}
    for m, p in modules.items():
        names = {t.replace("flexmoe_training", "training", 1) for t in _imports(p, "flexmoe_training")}
        names |= _imports(p, "training")
        graph[m] = {t for t in names if t in modules and t != m}
    graph = {a: {b for b in t if not (a.startswith(b + ".") or b.startswith(a + "."))} for a, t in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_exactly_one_routing_plan_class():
    plans = []
    for p in _py_files("flexmoe_kernels"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("RoutingPlan"):
                plans.append(f"{p.relative_to(ROOT)}::{node.name}")
    assert plans == ["flexmoe_kernels/ops/plan.py::RoutingPlan"], plans


@pytest.mark.parametrize("backend,stages", [
    ("reference", ("routing", "permute", "experts", "combine", "backend")),
    ("triton", ("routing", "routing_kernels", "grouped_gemm", "grouped_gemm_kernels", "configs", "launch", "backend")),
    ("cuda", ("_ext", "routing", "permute", "experts", "combine", "backend")),
])
def test_every_backend_has_its_stage_files(backend, stages):
    folder = ROOT / "flexmoe_kernels" / "ops" / backend
    missing = [s for s in stages if not (folder / f"{s}.py").is_file()]
    assert not missing, f"{folder} lacks {missing}"
    for s in stages:  # every stage module states its contract
        tree = ast.parse((folder / f"{s}.py").read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{backend}/{s}.py has no module docstring"
