"""The int8 room: run the int8 TFLite file that the VectorBlox compiler reads and compare it
with the float model (:func:`compare_int8`, ``vbxfx check model.tflite --model SPEC --calib
DATA``).

* :mod:`vbxfx.quant.interpreter`: a real TFLite interpreter (ai-edge-litert) on NCHW batches;
* :mod:`vbxfx.quant.metrics`: top-1 agreement, KL, SQNR (numpy);
* :mod:`vbxfx.quant.analyze`: the end-to-end comparison and the per-layer table of where the
  int8 error enters.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["compare_int8", "Int8Report", "Int8LayerRow", "TfliteRunner", "top1_agreement",
           "kl_divergence", "sqnr_db"]

_WHERE = {"compare_int8": "analyze", "Int8Report": "analyze", "Int8LayerRow": "analyze",
          "TfliteRunner": "interpreter", "top1_agreement": "metrics",
          "kl_divergence": "metrics", "sqnr_db": "metrics"}


def __getattr__(name: str) -> Any:          # lazy: `import vbxfx.quant` stays light
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
