"""The package by stage: no import cycle, few loose modules, small files, every package
installed, and the old module paths of the public names still importable."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import tomllib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 450
MAX_LOOSE = 10


def _modules() -> dict[str, pathlib.Path]:
    """``{dotted name: file}`` of the package, ``passes/`` as ``vbxfx.passes``."""
    found = {}
    for top, prefix in ((ROOT / "vbxfx", ["vbxfx"]), (ROOT / "passes", ["vbxfx", "passes"])):
        for path in top.rglob("*.py"):
            parts = prefix + list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _target(module: str, name: str, modules: dict) -> str | None:
    """The module that ``from module import name`` loads: a submodule, or the module that
    defines the (possibly lazily exported) name."""
    if f"{module}.{name}" in modules:
        return f"{module}.{name}"
    if module not in modules:
        return None
    value = getattr(importlib.import_module(module), name, None)
    home = getattr(value, "__module__", None)
    return home if home in modules else module


def import_graph() -> nx.DiGraph:
    """Every import between vbxfx modules, function-level imports included (an import inside
    a function is still a dependency, and a cycle there only waits for the call)."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.split(".")[0] != "vbxfx":
                    continue
                targets = [t for a in node.names if (t := _target(base, a.name, modules))]
            for target in targets:
                # a module's own parent packages are imported before it anyway
                if target != name and not name.startswith(target + "."):
                    graph.add_edge(name, target)
    return graph


def test_no_import_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 100          # the walk did find the imports
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert cycles == []


def test_the_graph_sees_a_cycle_when_there_is_one():
    """The check above can fail: a function-level import back into a module that imports it
    is found."""
    graph = import_graph()
    graph.add_edge("vbxfx.analysis.layers", "vbxfx.analysis.layer_records")
    assert any(len(c) > 1 for c in nx.strongly_connected_components(graph))


#: The rooms from the bottom up: a module may import only rooms of its own rank or lower.
LAYERS = [("errors", "lazy", "meta", "model_state"), ("format", "inputs"), ("analysis", "modules"),
          ("allocation", "shrink"), ("refit",), ("passes",), ("export", "pipeline"), ("check",),
          ("quant",), ("integrations", "testing"), ("seed_api",), ("cli",), ("__main__",)]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vbxfx"


def test_rooms_import_only_lower_rooms():
    rank = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
    upward = sorted((a, b) for a, b in import_graph().edges
                    if _room(a) != "vbxfx" and rank[_room(a)] < rank[_room(b)])
    assert upward == []
    assert set(rank) >= {_room(m) for m in _modules()} - {"vbxfx"}


def test_few_loose_modules():
    loose = sorted(p.stem for p in (ROOT / "vbxfx").glob("*.py")
                   if p.stem not in ("__init__", "__main__"))
    assert len(loose) <= MAX_LOOSE, loose


def test_no_file_over_the_limit():
    files = [p for d in ("vbxfx", "passes", "tests", "tools") for p in (ROOT / d).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_pyproject_installs_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert listed == packages
    assert config["package-dir"]["vbxfx.passes"] == "passes"


def test_old_module_paths_give_the_same_objects():
    from vbxfx.lazy import MOVED

    for old, homes in MOVED.items():
        module = importlib.import_module(old)
        assert module.__all__ and homes[0] in sys.modules, old
        for name in module.__all__:
            assert getattr(module, name) is not None, (old, name)
    from vbxfx.analysis.layers import LayerTable
    from vbxfx.layers import LayerTable as old_table
    from vbxfx.trace import analyze, trace             # analyze moved to vbxfx.pipeline
    from vbxfx.check_tflite import check_tflite, run_tflite_check
    from vbxfx.check import check_onnx, main_check, OutputRow   # a module then, a package now
    import vbxfx

    assert old_table is LayerTable and trace is vbxfx.trace and analyze is vbxfx.analyze
    assert check_tflite is vbxfx.check_tflite and callable(run_tflite_check)
    assert check_onnx is vbxfx.check_onnx and callable(main_check) and OutputRow
    with pytest.raises(AttributeError, match="no_such_name"):
        importlib.import_module("vbxfx.sensitivity").no_such_name
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("vbxfx.no_such_module")


def test_old_paths_in_a_fresh_interpreter_keep_the_public_functions():
    """``import vbxfx.trace`` (now an alias) must not replace the function ``vbxfx.trace``,
    and pickles that name a moved class still load."""
    code = """
import pickle, vbxfx
import vbxfx.trace, vbxfx.reconstruct, vbxfx.distill, vbxfx.layers
assert callable(vbxfx.trace) and callable(vbxfx.reconstruct) and callable(vbxfx.distill)
from vbxfx.analysis.layers import OpInfo
old = pickle.dumps(OpInfo, protocol=0).replace(b"vbxfx.analysis.layers", b"vbxfx.layers")
assert pickle.loads(old) is OpInfo
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
