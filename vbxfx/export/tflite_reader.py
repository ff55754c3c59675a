"""Read a TFLite flatbuffer without TensorFlow: tensors, quantization, constant data, operators.

A light reader for :func:`vbxfx.check_tflite` over the generated accessors of the ``tflite``
package (``pip install 'vbxfx[tflite]'``: ``tflite`` and ``flatbuffers``, pure Python, no
TensorFlow). Only the main subgraph (subgraph 0) is read, as the VectorBlox compiler does.

>>> from vbxfx.export.tflite_reader import read_tflite             # doctest: +SKIP
>>> model = read_tflite("model_full_integer_quant.tflite")          # doctest: +SKIP
>>> op = model.operators[1]; op.op                                  # doctest: +SKIP
'CONV_2D'
>>> w = model.tensors[op.inputs[1]]; w.dtype, w.shape, w.quantization.axis  # doctest: +SKIP
('int8', (32, 3, 3, 3), 0)
>>> model.data(w).shape                                             # doctest: +SKIP
(32, 3, 3, 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from vbxfx.errors import CheckError

__all__ = ["TFLITE_IDENTIFIER", "is_tflite", "read_tflite", "TfliteModel", "TfliteTensor",
           "TfliteOperator", "Quantization"]

#: The flatbuffer file identifier of TFLite models, at bytes 4..7.
TFLITE_IDENTIFIER = b"TFL3"

# tflite.TensorType values -> numpy dtypes (little-endian, as the format stores them)
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
           7: "int16", 9: "int8", 10: "float64", 12: "uint64", 15: "uint32", 16: "uint16"}
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string",
               6: "bool", 7: "int16", 8: "complex64", 9: "int8", 10: "float64",
               11: "complex128", 12: "uint64", 13: "resource", 14: "variant", 15: "uint32",
               16: "uint16", 17: "int4", 18: "bfloat16"}


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``.

    One scale (per tensor) or one per slice along ``axis`` (per channel)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    scale_offset: int | None = None        # where the float32 scales start in the file
    zero_point_offset: int | None = None   # where the int64 zero points start

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor of the main subgraph; ``data_offset`` is where its constant data starts in
    the file (None for activations), ``data_size`` its length in bytes."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: Quantization | None
    data_offset: int | None
    data_size: int


@dataclass(frozen=True)
class TfliteOperator:
    """One operator, in execution order; ``inputs``/``outputs`` are tensor indices (-1: none)."""

    index: int
    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    #: CONV_2D / DEPTHWISE_CONV_2D: padding ("SAME"/"VALID"), stride (h, w), dilation (h, w),
    #: fused activation ("NONE", "RELU", "RELU6", ...), depthwise: depth_multiplier
    options: dict = field(default_factory=dict)


@dataclass
class TfliteModel:
    """The main subgraph of a TFLite file (see :func:`read_tflite`)."""

    path: str
    version: int
    description: str
    tensors: list[TfliteTensor] = field(default_factory=list)
    operators: list[TfliteOperator] = field(default_factory=list)
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    raw: bytes = field(default=b"", repr=False)

    def data(self, tensor: TfliteTensor) -> np.ndarray | None:
        """The constant value of ``tensor`` (a read-only array of its shape), None if it has
        none.

        Raises:
            CheckError: the data does not hold ``prod(shape)`` values of the tensor's type.
        """
        if tensor.data_offset is None or tensor.data_size == 0:
            return None
        if tensor.dtype not in _DTYPES.values():
            raise CheckError(f"{self.path}: tensor {tensor.name!r} has type {tensor.dtype}, "
                             "which this reader does not decode")
        dtype = np.dtype(tensor.dtype).newbyteorder("<")
        count = int(np.prod(tensor.shape, dtype=np.int64))
        if count * dtype.itemsize != tensor.data_size:
            raise CheckError(f"{self.path}: tensor {tensor.name!r} of shape {tensor.shape} "
                             f"({tensor.dtype}) holds {tensor.data_size} bytes, "
                             f"{count * dtype.itemsize} expected")
        return np.frombuffer(self.raw, dtype=dtype, count=count,
                             offset=tensor.data_offset).reshape(tensor.shape)


def is_tflite(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that carries the TFLite identifier ``TFL3`` at byte 4."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == TFLITE_IDENTIFIER


def _schema():
    try:
        from tflite.Model import Model
    except ImportError as e:
        raise CheckError("reading TFLite files needs the tflite package: "
                         "pip install 'vbxfx[tflite]' (tflite and flatbuffers, no TensorFlow)"
                         ) from e
    return Model


def read_tflite(path: str | os.PathLike) -> TfliteModel:
    """Read the main subgraph of the TFLite file at ``path``.

    Raises:
        CheckError: missing file, not a TFLite file, a flatbuffer that does not parse, no
            subgraph, or the ``tflite`` package is not installed.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckError(f"a TFLite file name is expected, got {type(path).__name__}")
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise CheckError(f"{where}: no such file" if not os.path.exists(where)
                         else f"{where}: not a file")
    with open(where, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[4:8] != TFLITE_IDENTIFIER:
        raise CheckError(f"{where}: not a TFLite file (no {TFLITE_IDENTIFIER.decode()!r} "
                         "identifier at byte 4)")
    model_cls = _schema()
    try:
        return _parse(model_cls.GetRootAs(raw, 0), raw, where)
    except CheckError:
        raise
    except Exception as e:  # a truncated or corrupt flatbuffer raises from deep inside
        raise CheckError(f"{where}: the TFLite flatbuffer does not parse "
                         f"({type(e).__name__}: {str(e)[:200]})") from e


def _parse(fb, raw: bytes, where: str) -> TfliteModel:
    if fb.SubgraphsLength() < 1:
        raise CheckError(f"{where}: the TFLite file holds no subgraph")
    graph = fb.Subgraphs(0)
    desc = fb.Description()
    model = TfliteModel(where, int(fb.Version()), desc.decode("utf-8", "replace") if desc else "",
                        raw=raw)
    from tflite.utils import BUILTIN_OPCODE2NAME
    codes = []
    for k in range(fb.OperatorCodesLength()):
        oc = fb.OperatorCodes(k)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = BUILTIN_OPCODE2NAME.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM" and oc.CustomCode():
            name = f"CUSTOM:{oc.CustomCode().decode('utf-8', 'replace')}"
        codes.append(name)
    for t in range(graph.TensorsLength()):
        model.tensors.append(_tensor(fb, graph.Tensors(t), t, len(raw), where))
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = int(op.OpcodeIndex())
        if not 0 <= code < len(codes):
            raise CheckError(f"{where}: operator {k} has opcode index {code}, the file lists "
                             f"{len(codes)} operator codes")
        ins = tuple(int(op.Inputs(j)) for j in range(op.InputsLength()))
        outs = tuple(int(op.Outputs(j)) for j in range(op.OutputsLength()))
        for t in ins + outs:
            if t >= len(model.tensors):
                raise CheckError(f"{where}: operator {k} ({codes[code]}) refers to tensor {t}, "
                                 f"the subgraph has {len(model.tensors)}")
        model.operators.append(TfliteOperator(k, codes[code], ins, outs,
                                              _conv_options(op, codes[code])))
    model.inputs = tuple(int(graph.Inputs(j)) for j in range(graph.InputsLength()))
    model.outputs = tuple(int(graph.Outputs(j)) for j in range(graph.OutputsLength()))
    return model


def _tensor(fb, t, index: int, file_size: int, where: str) -> TfliteTensor:
    name = t.Name().decode("utf-8", "replace") if t.Name() else f"tensor_{index}"
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    kind = int(t.Type())
    q = t.Quantization()
    quant = None
    if q is not None and q.ScaleLength():
        scale = np.array(q.ScaleAsNumpy(), dtype=np.float32)
        zero = (np.array(q.ZeroPointAsNumpy(), dtype=np.int64) if q.ZeroPointLength()
                else np.zeros(scale.size, dtype=np.int64))
        tab = q._tab                          # the generated accessors' table: vector starts
        quant = Quantization(scale, zero, int(q.QuantizedDimension()),
                             int(tab.Vector(tab.Offset(8))),
                             int(tab.Vector(tab.Offset(10))) if q.ZeroPointLength() else None)
    offset, size = None, 0
    b = int(t.Buffer())
    if 0 < b < fb.BuffersLength():
        buf = fb.Buffers(b)
        if buf.DataLength():
            vec = buf._tab.Offset(4)          # the generated accessors' table, flatbuffers API
            offset, size = int(buf._tab.Vector(vec)), int(buf.DataLength())
        elif int(buf.Offset()) > 1:           # data stored after the flatbuffer (files > 2 GB)
            offset, size = int(buf.Offset()), int(buf.Size())
        if offset is not None and offset + size > file_size:
            raise CheckError(f"{where}: the data of tensor {name!r} runs past the end of the file")
    return TfliteTensor(index, name, shape, _TYPE_NAMES.get(kind, f"type{kind}"), quant, offset,
                        size)


def _conv_options(op, name: str) -> dict:
    """Padding, stride and dilation of a CONV_2D / DEPTHWISE_CONV_2D operator ({} otherwise)."""
    if name not in ("CONV_2D", "DEPTHWISE_CONV_2D") or op.BuiltinOptions() is None:
        return {}
    import tflite

    table = op.BuiltinOptions()
    opts = tflite.Conv2DOptions() if name == "CONV_2D" else tflite.DepthwiseConv2DOptions()
    opts.Init(table.Bytes, table.Pos)
    acts = {v: k for k, v in vars(tflite.ActivationFunctionType).items() if not k.startswith("_")}
    extra = {} if name == "CONV_2D" else {"depth_multiplier": int(opts.DepthMultiplier())}
    return {"padding": "SAME" if opts.Padding() == tflite.Padding.SAME else "VALID",
            "stride": (int(opts.StrideH()), int(opts.StrideW())),
            "dilation": (int(opts.DilationHFactor()), int(opts.DilationWFactor())),
            "activation": acts.get(int(opts.FusedActivationFunction()), "OTHER"), **extra}
