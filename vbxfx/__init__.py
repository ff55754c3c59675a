"""vbxfx: compress PyTorch models for the Microchip VectorBlox accelerator as torch.fx passes.

The package is laid out by stage (``docs/architecture.md``): :mod:`vbxfx.analysis` (trace,
layer records, MAC counts), :mod:`vbxfx.allocation` (sensitivities, knapsack, overrides),
:mod:`vbxfx.format` and :mod:`vbxfx.modules` (the VBX sparsity technique), :mod:`vbxfx.refit`
(calibrated refit, distillation), :mod:`vbxfx.export` (ONNX), :mod:`vbxfx.check` (ONNX and
TFLite checks), :mod:`vbxfx.cli`, :mod:`vbxfx.inputs` (model specs, calibration data) and
:mod:`vbxfx.integrations`; the graph passes are :mod:`vbxfx.passes`.

The public names below are imported on first use (PEP 562), so ``import vbxfx`` and the
``vbxfx`` command's ``--help`` / ``--version`` do not load torch, onnx and onnxruntime;
``vbxfx.compress(...)``, ``from vbxfx import compress`` and ``dir(vbxfx)`` work as usual.
To export a new name, add it to ``_EXPORTS`` under the module that defines it. Old module
paths (``vbxfx.trace``, ``vbxfx.check_tflite``, ...) keep working (:mod:`vbxfx.lazy`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from vbxfx.errors import (CheckError, ConfigError, ExportError, FormatError,  # noqa: F401
                          TraceError, VbxError)
from vbxfx.lazy import attach, install_moved_finder

__version__ = "0.1.0"

#: module -> the public names it defines (imported lazily by ``__getattr__``).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "vbxfx.errors": ("VbxError", "FormatError", "ConfigError", "TraceError", "ExportError",
                     "CheckError"),
    "vbxfx.format": ("PairEncoding", "Violation", "apply_encoding", "encode_weight",
                     "explain_violation", "fits", "project_unstructured", "project_weight",
                     "projection_error", "quantize_int8", "unstructured_macs", "weight_repeat"),
    "vbxfx.analysis.trace": ("trace",),
    "vbxfx.analysis.layers": ("LayerInfo", "LayerTable"),
    "vbxfx.export": ("export_onnx", "read_annotations", "ExportReport"),
    "vbxfx.check.onnx_check": ("check_onnx", "CheckReport"),
    "vbxfx.check.tflite_check": ("check_tflite", "TfliteCheckReport"),
    "vbxfx.modules": ("VBXConv2d", "VBXLinear", "LayerAnnotation", "is_compressed"),
    "vbxfx.passes.finalize": ("finalize",),
    "vbxfx.pipeline": ("analyze", "compress", "CompressResult"),
    "vbxfx.seed_api": ("compress_vbx3", "compress_vbx3_unstructured"),
    "vbxfx.passes.allocate": ("allocate", "Allocation"),
    "vbxfx.refit.reconstruct": ("reconstruct", "ReconstructResult"),
    "vbxfx.refit.distill": ("distill", "DistillResult"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)

install_moved_finder()


class _Package(types.ModuleType):
    """Keeps a public function when a module path of the same name is imported later
    (``import vbxfx.trace``, the old path of :mod:`vbxfx.analysis.trace`): the import system
    would otherwise set the package attribute to that module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and name in _WHERE
                and value.__name__ == f"{__name__}.{name}"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
