"""The int8 room: run the int8 TFLite file that the VectorBlox compiler reads and compare it
with the float model (:func:`compare_int8`, ``vbxfx check model.tflite --model SPEC --calib
DATA``).

- :mod:`vbxfx.quant.interpreter`: a real TFLite interpreter (ai-edge-litert) on NCHW batches;
- :mod:`vbxfx.quant.metrics`: top-1 agreement, KL, SQNR (numpy);
- :mod:`vbxfx.quant.layerwise`: every int8 tensor against the float32 file's, torch names;
- :mod:`vbxfx.quant.analyze`: :func:`compare_int8`, the end-to-end figures and the per-layer
  table of where the int8 error enters;
- :mod:`vbxfx.quant.files`: where the float32 reference lies beside the int8 file;
- :mod:`vbxfx.quant.command`: the ``--calib`` options of ``vbxfx check``;
- :mod:`vbxfx.quant.calibrate`: :func:`calibrate_int8`, what ``vbxfx export --tflite`` does to
  the converter's int8 file to keep it close to float, through :mod:`vbxfx.quant.patch` (the
  file's numbers written in place), :mod:`vbxfx.quant.ranges` (activation ranges of least
  error) and :mod:`vbxfx.quant.rounding` (biases corrected on the data; OPTQ rounding of the
  filters inside their patterns as an option);
- :mod:`vbxfx.quant.qat`: :func:`finetune_int8`, fine-tuning of the float model under the
  int8 grids the converter will use (fake quantization that keeps every pattern and pair),
  before export.
"""

from vbxfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "vbxfx.quant.analyze": ("compare_int8", "Int8Report", "Int8LayerRow"),
    "vbxfx.quant.interpreter": ("TfliteRunner",),
    "vbxfx.quant.metrics": ("top1_agreement", "kl_divergence", "sqnr_db"),
    "vbxfx.quant.files": ("float_reference_path",),
    "vbxfx.quant.calibrate": ("calibrate_int8", "CalibrationReport"),
    "vbxfx.quant.qat": ("finetune_int8", "fake_quant_model", "Int8FinetuneResult"),
})
