"""An int8 TFLite file whose numbers can be changed in place: activation scales and zero
points, int8 filters, int32 biases and their scales.

Nothing is added, removed or moved: every value is written over the bytes it already has, so
the flatbuffer stays valid and the VectorBlox compiler reads the same graph. The calibration
passes (:mod:`vbxfx.quant.ranges`, :mod:`vbxfx.quant.rounding`) work on this view and on the
float32 file onnx2tf wrote from the same saved model, whose operators pair with the int8
file's one by one (:func:`pair_operators`).

>>> f = Int8File("model.tflite")                                      # doctest: +SKIP
>>> f.set_activation(12, scale=0.02, zero_point=-128)                 # doctest: +SKIP
>>> f.save("calibrated.tflite")                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vbxfx.errors import CheckError
from vbxfx.export.tflite_reader import TfliteModel, TfliteOperator, read_tflite

__all__ = ["Int8File", "OperatorPair", "pair_operators", "FILTERED", "ENDS"]

#: Operators with an int8 filter and an int32 bias.
FILTERED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
#: Operators at the file's ends that the float32 file does not have.
ENDS = ("QUANTIZE", "DEQUANTIZE")


@dataclass(frozen=True)
class OperatorPair:
    """An operator of the int8 file and the same operator of the float32 file."""

    q: TfliteOperator
    f: TfliteOperator


def pair_operators(qmodel: TfliteModel, fmodel: TfliteModel) -> list[OperatorPair]:
    """The two files' operators side by side (QUANTIZE/DEQUANTIZE left out).

    Raises:
        CheckError: the two files do not hold the same operators in the same order (they
            were not written from one saved model).
    """
    qops = [op for op in qmodel.operators if op.op not in ENDS]
    fops = [op for op in fmodel.operators if op.op not in ENDS]
    if [op.op for op in qops] != [op.op for op in fops] or not _same_shapes(qmodel, fmodel,
                                                                             qops, fops):
        if sorted(op.op for op in qops) != sorted(op.op for op in fops):
            raise CheckError(f"{fmodel.path} does not hold the operators of {qmodel.path} "
                             f"({len(fops)} vs {len(qops)} besides QUANTIZE/DEQUANTIZE): give "
                             "the float32 file onnx2tf wrote with the int8 one")
        from vbxfx.quant.pairing import pair_by_graph   # the order differs: follow the data
        qops, fops = map(list, zip(*pair_by_graph(qmodel, fmodel))) if qops else ([], [])
    for q, f in zip(qops, fops):
        for a, b in zip(q.outputs, f.outputs):
            if a >= 0 and b >= 0 and qmodel.tensors[a].shape != fmodel.tensors[b].shape:
                raise CheckError(f"{qmodel.path}: operator {q.index} ({q.op}) writes shape "
                                 f"{qmodel.tensors[a].shape}, the float32 file's "
                                 f"{fmodel.tensors[b].shape}")
        if f.op in FILTERED and fmodel.tensors[f.inputs[1]].dtype != "float32":
            raise CheckError(f"{fmodel.path} is not a float32 TFLite file (operator {f.index} "
                             f"has a {fmodel.tensors[f.inputs[1]].dtype} filter): give the "
                             "float32 file onnx2tf wrote with the int8 one")
    return [OperatorPair(q, f) for q, f in zip(qops, fops)]


def _same_shapes(qmodel: TfliteModel, fmodel: TfliteModel, qops, fops) -> bool:
    return all(qmodel.tensors[a].shape == fmodel.tensors[b].shape
               for q, f in zip(qops, fops) for a, b in zip(q.outputs, f.outputs)
               if a >= 0 and b >= 0)


class Int8File:
    """The bytes of an int8 TFLite file, with writable views of its numbers.

    Raises:
        CheckError: see :func:`vbxfx.export.tflite_reader.read_tflite`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.model: TfliteModel = read_tflite(path)
        self.path = self.model.path
        self.buf = bytearray(self.model.raw)

    # ------------------------------------------------------------------ reading

    def tensor(self, index: int):
        return self.model.tensors[index]

    def activation(self, index: int) -> tuple[float, int] | None:
        """``(scale, zero_point)`` of a per-tensor quantized int8 activation, else None."""
        t = self.model.tensors[index]
        q = t.quantization
        if (t.dtype != "int8" or t.data_offset is not None or q is None or q.scale.size != 1
                or q.scale_offset is None or q.zero_point_offset is None):
            return None
        scale = np.frombuffer(self.buf, np.float32, 1, q.scale_offset)[0]
        zero = np.frombuffer(self.buf, np.int64, 1, q.zero_point_offset)[0]
        return float(scale), int(zero)

    def _view(self, index: int, dtype: str) -> np.ndarray:
        t = self.model.tensors[index]
        if t.dtype != dtype or t.data_offset is None:
            raise CheckError(f"{self.path}: tensor {t.name!r} is not a constant {dtype} tensor")
        count = int(np.prod(t.shape, dtype=np.int64))
        return np.frombuffer(self.buf, np.dtype(dtype), count, t.data_offset).reshape(t.shape)

    def constant(self, index: int) -> np.ndarray:
        """The constant data of tensor ``index`` in its own type, writable."""
        return self._view(index, self.model.tensors[index].dtype)

    def weights(self, index: int) -> np.ndarray:
        """The int8 filter of tensor ``index``, writable."""
        return self._view(index, "int8")

    def bias(self, index: int) -> np.ndarray:
        """The int32 bias of tensor ``index``, writable."""
        return self._view(index, "int32")

    def scales(self, index: int) -> np.ndarray:
        """The float32 scales of a constant tensor (one per channel or one), writable."""
        q = self.model.tensors[index].quantization
        if q is None or q.scale_offset is None:
            raise CheckError(f"{self.path}: tensor {index} has no quantization scales")
        return np.frombuffer(self.buf, np.float32, q.scale.size, q.scale_offset)

    # ------------------------------------------------------------------ writing

    def set_activation(self, index: int, scale: float, zero_point: int) -> None:
        """Give an int8 activation a new scale and zero point (int8: -128..127)."""
        if self.activation(index) is None:
            raise CheckError(f"{self.path}: tensor {index} is not a per-tensor int8 activation")
        if not (scale > 0 and np.isfinite(scale) and -128 <= zero_point <= 127):
            raise CheckError(f"{self.path}: tensor {index}: scale {scale} / zero point "
                             f"{zero_point} is not an int8 quantization")
        q = self.model.tensors[index].quantization
        np.frombuffer(self.buf, np.float32, 1, q.scale_offset)[0] = scale
        np.frombuffer(self.buf, np.int64, 1, q.zero_point_offset)[0] = zero_point

    def requantize_bias(self, op: TfliteOperator, input_scale: float) -> None:
        """Re-express ``op``'s int32 bias for a new input scale (bias scale = input scale x
        filter scale, the TFLite int8 rule); its float value stays the same."""
        if op.op not in FILTERED or len(op.inputs) < 3 or op.inputs[2] < 0:
            return
        bias, bias_scale = self.bias(op.inputs[2]), self.scales(op.inputs[2])
        value = bias.astype(np.float64) * bias_scale
        new_scale = input_scale * self.scales(op.inputs[1]).astype(np.float64)
        self.write_bias(op, value, new_scale)

    def write_bias(self, op: TfliteOperator, value: np.ndarray,
                   scale: np.ndarray | None = None) -> None:
        """Store the float bias ``value`` of ``op`` as int32 (at ``scale``, or the bias's own)."""
        bias, bias_scale = self.bias(op.inputs[2]), self.scales(op.inputs[2])
        if scale is not None:
            bias_scale[:] = np.asarray(scale, dtype=np.float32)
        q = np.round(np.asarray(value, np.float64) / bias_scale.astype(np.float64))
        bias[...] = np.clip(q, -(2 ** 31 - 1), 2 ** 31 - 1).astype(np.int32)

    def content(self) -> bytes:
        return bytes(self.buf)

    def save(self, path: str | os.PathLike) -> None:
        """Write the file (through a temporary name, so a failure leaves no half file)."""
        path = os.fspath(path)
        partial = path + ".partial"
        with open(partial, "wb") as f:
            f.write(self.buf)
        os.replace(partial, path)
