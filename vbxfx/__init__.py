"""vbxfx: compress PyTorch models for the Microchip VectorBlox accelerator as torch.fx passes.

The public names below are imported on first use (PEP 562), so ``import vbxfx`` and the
``vbxfx`` command's ``--help`` / ``--version`` do not load torch, onnx and onnxruntime;
``vbxfx.compress(...)``, ``from vbxfx import compress`` and ``dir(vbxfx)`` work as usual.
To export a new name, add it to ``_EXPORTS`` under the module that defines it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from vbxfx.errors import (CheckError, ConfigError, ExportError, FormatError,  # noqa: F401
                          TraceError, VbxError)

__version__ = "0.1.0"

#: module -> the public names it defines (imported lazily by ``__getattr__``).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "vbxfx.errors": ("VbxError", "FormatError", "ConfigError", "TraceError", "ExportError",
                     "CheckError"),
    "vbxfx.format": ("PairEncoding", "Violation", "apply_encoding", "encode_weight",
                     "explain_violation", "fits", "project_unstructured", "project_weight",
                     "projection_error", "quantize_int8", "unstructured_macs", "weight_repeat"),
    "vbxfx.trace": ("trace", "analyze"),
    "vbxfx.layers": ("LayerInfo", "LayerTable"),
    "vbxfx.export": ("export_onnx", "read_annotations", "ExportReport"),
    "vbxfx.check": ("check_onnx", "CheckReport"),
    "vbxfx.check_tflite": ("check_tflite", "TfliteCheckReport"),
    "vbxfx.modules": ("VBXConv2d", "VBXLinear", "LayerAnnotation", "is_compressed"),
    "vbxfx.passes.finalize": ("finalize",),
    "vbxfx.pipeline": ("compress", "CompressResult"),
    "vbxfx.seed_api": ("compress_vbx3", "compress_vbx3_unstructured"),
    "vbxfx.passes.allocate": ("allocate", "Allocation"),
    "vbxfx.reconstruct": ("reconstruct", "ReconstructResult"),
    "vbxfx.distill": ("distill", "DistillResult"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:                                  # a submodule: vbxfx.export, vbxfx.calib, ...
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps a public function when its submodule of the same name is imported later
    (``vbxfx.trace``, ``vbxfx.reconstruct``, ``vbxfx.distill``): the import system would
    otherwise set the package attribute to the submodule."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and name in _WHERE
                and value.__name__ == f"{__name__}.{name}"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
