"""Names imported on first use, and the module paths that moved.

``import vbxfx`` and building the command line's parser must not load torch, onnx and
onnxruntime, so the package and its subpackages export their public names lazily (PEP 562),
as ``attach`` sets up::

    __getattr__, __dir__, __all__ = attach(__name__, {"vbxfx.check.onnx_check": ("check_onnx",)})

Modules that moved into a subpackage keep their old import paths (``vbxfx.trace``,
``vbxfx.check_tflite``, ...): :data:`MOVED` names where each one's names live now, and
:func:`install_moved_finder` lets ``import`` find them there. An old path is a thin module
whose attributes are looked up in its new homes, so ``from vbxfx.layers import LayerTable``
gives the very class that ``vbxfx.analysis.layers`` defines.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["attach", "MOVED", "install_moved_finder"]

#: old module path -> the modules that hold its names now, searched in order.
MOVED: dict[str, tuple[str, ...]] = {
    "vbxfx.trace": ("vbxfx.analysis.trace", "vbxfx.pipeline"),
    "vbxfx.trace_errors": ("vbxfx.analysis.trace_errors", "vbxfx.errors"),
    "vbxfx.layers": ("vbxfx.analysis.layers",),
    "vbxfx.layer_records": ("vbxfx.analysis.layer_records",),
    "vbxfx.weight_use": ("vbxfx.analysis.weight_use",),
    "vbxfx.op_macs": ("vbxfx.analysis.op_macs",),
    "vbxfx.knapsack": ("vbxfx.allocation.knapsack",),
    "vbxfx.overrides": ("vbxfx.allocation.overrides",),
    "vbxfx.sensitivity": ("vbxfx.allocation.sensitivity",),
    "vbxfx.reconstruct": ("vbxfx.refit.reconstruct",),
    "vbxfx.distill": ("vbxfx.refit.distill",),
    "vbxfx.check_command": ("vbxfx.check.command",),
    "vbxfx.check_tflite": ("vbxfx.check.tflite_check", "vbxfx.check.command"),
    "vbxfx.tflite_expect": ("vbxfx.check.tflite_expect",),
    "vbxfx.tolerances": ("vbxfx.check.tolerances",),
    "vbxfx.console": ("vbxfx.cli.console",),
    "vbxfx.report": ("vbxfx.cli.report",),
    "vbxfx.model_spec": ("vbxfx.inputs.model_spec",),
    "vbxfx.calib": ("vbxfx.inputs.calib",),
    "vbxfx.demo": ("vbxfx.inputs.demo",),
}


def attach(package: str, exports: Mapping[str, tuple[str, ...]]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, exporting ``exports``
    (``{module: names}``) on first use; other attributes resolve to submodules."""
    where = {name: module for module, names in exports.items() for name in names}
    names = [name for group in exports.values() for name in group]

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
            setattr(sys.modules[package], name, value)
            return value
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__, names


class _MovedModule(types.ModuleType):
    """An old module path: every attribute is looked up in the modules that hold it now."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved: the names of {name} now live in {', '.join(homes)}.")
        self.__dict__["_homes"] = homes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        homes = self.__dict__["_homes"]
        if name == "__all__":
            return [n for home in homes for n in getattr(importlib.import_module(home),
                                                          "__all__", ())]
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(homes)}) has no "
                             f"attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for home in self.__dict__["_homes"]
                       for n in dir(importlib.import_module(home))})


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths of :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install_moved_finder() -> None:
    """Put the finder of the old module paths first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
