"""Annotated ONNX export for the VectorBlox toolchain (schema: ``docs/onnx_schema.md``).

>>> import vbxfx
>>> vbxfx.export.SCHEMA
'vbxfx.compression/1'
"""

from vbxfx.export.annotations import SCHEMA, SCHEMA_VERSION, LayerAnnotation
from vbxfx.export.onnx_export import ExportReport, export_onnx
from vbxfx.export.reader import read_annotations

__all__ = ["export_onnx", "read_annotations", "ExportReport", "LayerAnnotation", "SCHEMA",
           "SCHEMA_VERSION"]
