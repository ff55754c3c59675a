"""Tolerances of the onnxruntime-vs-torch comparison, by the torch model's floating dtype.

An output passes when ``max|onnx - torch| <= atol + rtol * max|torch|``. The file is always
float32 (:func:`vbxfx.export_onnx` exports float16 / bfloat16 / float64 models in float32),
so the tolerance is set by the torch side's precision. float32: onnxruntime and torch differ
by about 1e-6 of an output's magnitude on resnet18, mobilenet_v3 and yolov8n; one int8 step
in a classifier weight moves it by about 1e-4. float16 torch against the float32 file: 5e-4
of the output on resnet18 (1.7e-4 on vbxfx's DemoNet), bfloat16: 4.6e-3 (2.3e-3).
This module imports nothing heavy: the command line reads it for its ``--help``.

>>> tolerances_for("float16")
(0.01, 1e-05)
"""

from __future__ import annotations

from typing import Any

__all__ = ["TOLERANCES", "tolerances_for"]

#: dtype name -> (rtol, atol).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-6),
    "float64": (1e-5, 1e-6),      # compared against the float32 file
    "float16": (1e-2, 1e-5),
    "bfloat16": (5e-2, 1e-5),
}


def tolerances_for(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` for a torch dtype or its name (``torch.float16`` or ``"float16"``);
    float32's for anything else."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES.get(name, TOLERANCES["float32"])
