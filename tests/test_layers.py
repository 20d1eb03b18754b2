"""The package's import graph: layers point down only, no cycle between modules or folders, no function-local
import of an edgeface module (those hid the cycles), and the dev install runs the working tree."""

from __future__ import annotations

import ast
import graphlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import edgeface

REPO = Path(__file__).resolve().parents[1]

# Lowest first; a module may import only from its own layer or those before it.
LAYERS = [
    ("core", ["edgeface.core"]),
    ("models, runtimes", ["edgeface.models", "edgeface.runtimes"]),
    ("inference", ["edgeface.inference"]),
    ("evaluation", ["edgeface.evaluation"]),
    ("export", ["edgeface.export"]),
    ("training", ["edgeface.training"]),
    ("bench, boards", ["edgeface.benchmarks", "edgeface.boards"]),
    ("cli", ["edgeface"]),
]


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the installed package: name -> (file, is a package's __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    # the packages pyproject installs (folders mapped in by package-dir are not on edgeface.__path__)
    todo = list(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    while todo:
        package = todo.pop()
        if package in found:
            continue
        spec = importlib.util.find_spec(package)
        if spec.origin is None:  # a data folder (namespace package), e.g. edgeface.assets
            continue
        found[package] = (Path(spec.origin), True)
        for folder in spec.submodule_search_locations:
            for entry in sorted(Path(folder).iterdir()):
                if entry.suffix == ".py" and entry.name != "__init__.py":
                    found[f"{package}.{entry.stem}"] = (entry, False)
                elif (entry / "__init__.py").is_file():
                    todo.append(f"{package}.{entry.name}")
    return found


def _third_party(path: Path) -> set[str]:
    """Top-level names of the non-edgeface modules ``path`` imports at module level."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n != "edgeface"}


def _imports(path: Path, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported edgeface module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    # `if TYPE_CHECKING:` blocks and `try:` at module level are still module level
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    base = _package_of(module, is_package)
    result = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                prefix = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{prefix}.{node.module}" if node.module else prefix
            else:
                source = node.module or ""
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        for name in names:
            if name == "edgeface" or name.startswith("edgeface."):
                while name not in known:
                    name = name.rpartition(".")[0]
                result.append((name, node.lineno, id(node) in top_level))
    return result


def _layer(module: str, is_package: bool) -> int:
    package = _package_of(module, is_package)
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if package == prefix or package.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    assert best is not None, module
    return best[0]


MODULES = _modules()
KNOWN = set(MODULES)
EDGES = {m: _imports(path, m, pkg, KNOWN) for m, (path, pkg) in MODULES.items()}


def test_dev_install_runs_the_working_tree():
    assert Path(edgeface.__file__).resolve().parent == REPO / "edgeface", (
        "edgeface is imported from a copy; install the checkout with `pip install -e .` (scripts/setup-venv.sh)")
    for package, folder in [("edgeface.export", "export"), ("edgeface.runtimes", "runtimes"),
                            ("edgeface.benchmarks", "benchmarks"), ("edgeface.boards", "boards")]:
        assert Path(importlib.util.find_spec(package).origin).resolve().parent == REPO / folder
    # and from the checkout itself, where ./edgeface shadows the installed package's root
    code = "import edgeface.export, edgeface.runtimes.base as b; print(b.__file__)"
    out = subprocess.run([sys.executable, "-c", code],
                         cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == REPO / "runtimes" / "base.py"
    assert not (REPO / "build").exists(), "a stale build/ copy sits in the tree"


# What the device install brings (pyproject's dependencies, by import name), plus the standard library.
DEVICE_IMPORTS = {"numpy", "cv2", "PIL", "jsonschema", "tqdm", "onnxruntime"} | set(sys.stdlib_module_names)


def _heavy(module: str) -> set[str]:
    """Modules outside the device install that importing ``module`` loads (through its module-level imports)."""
    seen, todo, heavy = set(), [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        heavy |= _third_party(MODULES[m][0]) - DEVICE_IMPORTS
        todo += [t for t, _, top in EDGES[m] if top]
        todo += [m.rpartition(".")[0]] if "." in m else []  # a submodule import runs its package's __init__
    return heavy


def test_function_local_imports_only_defer_heavy_dependencies():
    """An edgeface module imported inside a function hides the dependency graph; allowed only to defer what a
    device install lacks (PyTorch, the converters, matplotlib), which the import must then bring."""
    local = [f"{MODULES[m][0].relative_to(REPO)}:{line} imports {target} inside a function"
             for m, edges in EDGES.items() for target, line, top in edges if not top and not _heavy(target)]
    assert not local, "function-local imports of light edgeface modules (import them at the top):\n" + "\n".join(
        sorted(set(local)))


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _, _ in edges if t != m} for m, edges in EDGES.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle between modules: {' -> '.join(exc.args[1])}")


def test_no_import_cycle_between_folders():
    graph: dict[str, set[str]] = {}
    for m, edges in EDGES.items():
        folder = _package_of(m, MODULES[m][1])
        graph.setdefault(folder, set())
        for t, _, _ in edges:
            target_folder = _package_of(t, MODULES[t][1])
            # a package's __init__ re-exporting its own submodules is not a cycle
            if target_folder != folder and not target_folder.startswith(folder + "."):
                graph[folder].add(target_folder)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle between folders: {' -> '.join(exc.args[1])}")


def test_layers_point_down():
    up = []
    for m, edges in EDGES.items():
        rank = _layer(m, MODULES[m][1])
        for target, line, _ in edges:
            if _layer(target, MODULES[target][1]) > rank:
                up.append(f"{MODULES[m][0].relative_to(REPO)}:{line} ({LAYERS[rank][0]}) imports {target} "
                          f"({LAYERS[_layer(target, MODULES[target][1])][0]})")
    assert not up, "imports pointing up:\n" + "\n".join(up)
