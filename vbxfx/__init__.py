"""vbxfx: compress PyTorch models for the Microchip VectorBlox accelerator as torch.fx passes."""

from vbxfx.errors import CheckError, ConfigError, ExportError, FormatError, TraceError, VbxError
from vbxfx.format import (PairEncoding, Violation, apply_encoding, encode_weight, explain_violation,
                          fits, project_unstructured, project_weight, projection_error,
                          quantize_int8, unstructured_macs, weight_repeat)
from vbxfx.layers import LayerInfo, LayerTable
from vbxfx.trace import analyze, trace
from vbxfx.export import ExportReport, export_onnx, read_annotations
from vbxfx.check import CheckReport, check_onnx
from vbxfx.check_tflite import TfliteCheckReport, check_tflite
from vbxfx.modules import VBXConv2d, VBXLinear, LayerAnnotation, is_compressed
from vbxfx.passes.finalize import finalize
from vbxfx.pipeline import CompressResult, compress
from vbxfx.seed_api import compress_vbx3, compress_vbx3_unstructured
from vbxfx.passes.allocate import Allocation, allocate
from vbxfx.reconstruct import ReconstructResult, reconstruct

__version__ = "0.1.0"

__all__ = [
    "VbxError", "FormatError", "ConfigError", "TraceError", "ExportError", "CheckError",
    "PairEncoding", "Violation", "apply_encoding", "encode_weight", "explain_violation", "fits",
    "project_unstructured", "project_weight", "projection_error", "quantize_int8",
    "unstructured_macs", "weight_repeat",
    "trace", "analyze", "LayerInfo", "LayerTable",
    "export_onnx", "read_annotations", "ExportReport", "check_onnx", "CheckReport",
    "check_tflite", "TfliteCheckReport",
    "VBXConv2d", "VBXLinear", "LayerAnnotation", "is_compressed", "finalize", "compress",
    "CompressResult", "compress_vbx3", "compress_vbx3_unstructured",
    "allocate", "Allocation", "reconstruct", "ReconstructResult",
]
