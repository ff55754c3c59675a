"""Where the int8 comparison finds the float32 reference of an int8 TFLite file.

``vbxfx export --tflite model.tflite`` keeps onnx2tf's float32 TFLite of the same graph beside
the int8 file; :func:`vbxfx.quant.compare_int8` looks for it there.
"""

from __future__ import annotations

import os

__all__ = ["float_reference_path"]


def float_reference_path(output: str | os.PathLike) -> str:
    """The float32 reference beside an int8 TFLite file: ``model.tflite ->
    model_float32.tflite``.

    >>> float_reference_path("out/model.tflite")
    'out/model_float32.tflite'
    """
    root, ext = os.path.splitext(os.fspath(output))
    return f"{root}_float32{ext or '.tflite'}"
