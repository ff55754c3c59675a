"""Check: what vbxfx wrote is what the hardware will run.

- :mod:`vbxfx.check.onnx_check`: :func:`check_onnx`, an annotated (or foreign) ONNX file:
  ONNX checker, every weight's fit after int8, annotations, onnxruntime against torch;
- :mod:`vbxfx.check.tflite_check`: :func:`check_tflite`, the int8 TFLite file that
  ``vnnx_compile`` reads, layer by layer;
- :mod:`vbxfx.check.tflite_expect`: what vbxfx declared, matched to the TFLite layers;
- :mod:`vbxfx.check.tolerances`: onnxruntime-vs-torch tolerances by dtype;
- :mod:`vbxfx.check.command`: ``vbxfx check`` (builds its parser without torch or onnx).
"""

from vbxfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "vbxfx.check.onnx_check": ("check_onnx", "CheckReport", "LayerRow", "DEFAULT_RTOL",
                               "DEFAULT_ATOL"),
    "vbxfx.export.numerics": ("OutputRow",),
    "vbxfx.check.tflite_check": ("check_tflite", "TfliteCheckReport", "TfliteLayerRow"),
    "vbxfx.check.command": ("add_check_arguments", "run_check_command", "main_check",
                            "is_tflite_path", "run_tflite_check"),
})
