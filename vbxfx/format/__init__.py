"""The VectorBlox weight formats (``docs/format.md``): the one module that knows them.

Structured ("comp", repeat 1/2/4) and unstructured ("ucomp") formats: layout, exact
projection with pairing, fit checks after int8 quantization, encoding, MAC costs.
"""

from vbxfx.format.cost import BLOCK, REPEATS, check_repeat, hardware_macs, padded_channels
from vbxfx.format.encoding import (PairEncoding, apply_encoding, encode_unstructured, encode_weight,
                                  pattern_coefficients)
from vbxfx.format.layout import block_position, from_blocks, from_vectors, to_blocks, to_vectors
from vbxfx.format.quant import dequantize_int8, quantize_int8
from vbxfx.format.unstructured import budget_from_compression, project_unstructured, unstructured_macs
from vbxfx.format.weights import (Violation, explain_violation, fits, project_weight,
                                  projection_error, require_fit, weight_repeat)

__all__ = [
    "BLOCK", "REPEATS", "check_repeat", "hardware_macs", "padded_channels",
    "PairEncoding", "apply_encoding", "encode_unstructured", "encode_weight", "pattern_coefficients",
    "block_position", "from_blocks", "from_vectors", "to_blocks", "to_vectors",
    "dequantize_int8", "quantize_int8",
    "budget_from_compression", "project_unstructured", "unstructured_macs",
    "Violation", "explain_violation", "fits", "project_weight", "projection_error",
    "require_fit", "weight_repeat",
]
