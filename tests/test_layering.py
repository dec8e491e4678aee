"""The package's layering, read from its imports (every import statement, also those inside functions).

- The worker side (runner, CUDA graphs, KV tensors, attention backends, kernels, sampler, model)
  imports nothing from the engine core or the front ends: only itself and plain settings.
- The engine core imports the worker only through its interface (worker/plan.py, worker/worker.py).
- No import cycle among the package's top-level modules and subpackages.
"""
from __future__ import annotations

import ast
from pathlib import Path

import forkserve

PACKAGE = Path(forkserve.__file__).parent
WORKER_SIDE = ("forkserve.worker", "forkserve.kernels", "forkserve.model", "forkserve.sampler", "forkserve.distributed",
               "forkserve.transfer")
SETTINGS = ("forkserve.config", "forkserve.sampling_params")  # plain settings, on both sides
CORE = ("forkserve.engine",)
WORKER_INTERFACE = ("forkserve.worker.plan", "forkserve.worker.worker")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every forkserve module `path` imports (for `from x import y`, x.y where that is a module, else x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if is_module(candidate) else base)
    return {m for m in found if m == "forkserve" or m.startswith("forkserve.")}


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_import_reader_sees_imports() -> None:
    """The reader finds the imports it must judge (inside functions too): a check that reads nothing passes anything."""
    assert "forkserve.worker.worker" in MODULES["forkserve.engine.engine"]
    assert "forkserve.worker.attention.flashinfer" in MODULES["forkserve.worker.worker"]
    assert "forkserve.entrypoints.commands" in MODULES["forkserve.cli"]  # imported inside build_parser
    assert len(MODULES) > 30


def test_worker_side_imports_nothing_from_the_core_or_the_front_ends() -> None:
    bad = {(module, imported) for module, imported_all in MODULES.items() if within(module, WORKER_SIDE)
           for imported in imported_all if not within(imported, WORKER_SIDE + SETTINGS)}
    assert not bad, f"worker-side modules import outside the worker: {sorted(bad)}"


def test_core_imports_the_worker_only_through_its_interface() -> None:
    bad = {(module, imported) for module, imported_all in MODULES.items() if within(module, CORE)
           for imported in imported_all if within(imported, WORKER_SIDE) and not within(imported, WORKER_INTERFACE)}
    assert not bad, f"core modules reach past the worker's interface: {sorted(bad)}"


def top_level(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_import_cycle_among_packages() -> None:
    graph: dict[str, set[str]] = {}
    for module, imported_all in MODULES.items():
        if module == "forkserve":  # the package's face re-exports the API; it is nobody's dependency
            continue
        edges = graph.setdefault(top_level(module), set())
        edges.update(top_level(m) for m in imported_all if m != "forkserve" and top_level(m) != top_level(module))
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, f"import cycles among packages: {cycles}"


def test_engine_core_and_package_files_stay_small() -> None:
    """The step loop stays one readable file (under 300 lines) and no package file grows past 450."""
    lines = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert lines["engine/engine.py"] < 300, lines["engine/engine.py"]
    assert not {path: n for path, n in lines.items() if n > 450}
