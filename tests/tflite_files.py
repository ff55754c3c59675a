"""Write small TFLite files with the flatbuffers builder (no TensorFlow), for the reader tests.

``write_tflite(path, layers)`` lays out one subgraph in which every layer reads its own input
tensor. A layer is a dict::

    {"op": "CONV_2D" | "FULLY_CONNECTED" | "DEPTHWISE_CONV_2D",
     "filter": int8 array ([O, kh, kw, I], [O, I] or [1, kh, kw, C]),
     "scale": float or [O] floats, "input": (1, H, W, I) / (1, I), "output": (1, Ho, Wo, O) / (1, O),
     "name": "..."}          # optional: "zero_point", "axis"

``independent_ucomp(q)`` counts unstructured multipliers in plain Python, apart from vbxfx.

``float_model=True`` stores float32 filters and activations (like onnx2tf's
``model_float32.tflite``).
"""

from __future__ import annotations

from collections import Counter

import flatbuffers
import numpy as np
import tflite as T  # the builder functions, re-exported with their table's prefix

_CODES = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 9}
_INT8, _INT32, _FLOAT32 = 9, 2, 0


def independent_ucomp(q: np.ndarray) -> int:
    """Multipliers of an int8 filter in the unstructured format, counted plainly: per vector
    over the input channels (last axis), nonzeros minus the equal-magnitude odd/even pairs."""
    total = 0
    for row in np.asarray(q).reshape(-1, q.shape[-1]).tolist():
        nz = [(i, abs(v)) for i, v in enumerate(row) if v != 0]
        even = Counter(m for i, m in nz if i % 2 == 0)
        odd = Counter(m for i, m in nz if i % 2 == 1)
        total += len(nz) - sum(min(n, odd[m]) for m, n in even.items())
    return total


def _vector(b: flatbuffers.Builder, values, dtype) -> int:
    return b.CreateNumpyVector(np.ascontiguousarray(np.asarray(values, dtype=dtype)))


def write_tflite(path, layers: list[dict], float_model: bool = False) -> None:
    b = flatbuffers.Builder(1 << 16)
    buffers: list[bytes] = [b""]                  # buffer 0 is the empty one by convention
    tensors: list[dict] = []
    ops: list[tuple[int, list[int], list[int]]] = []

    def tensor(name, shape, kind, data=None, scale=None, zero=None, axis=0):
        buf = 0
        if data is not None:
            buffers.append(np.ascontiguousarray(data).tobytes())
            buf = len(buffers) - 1
        tensors.append(dict(name=name, shape=shape, kind=kind, buffer=buf, scale=scale,
                            zero=zero, axis=axis))
        return len(tensors) - 1

    for k, layer in enumerate(layers):
        name = layer.get("name", f"layer{k}")
        q = np.asarray(layer["filter"])
        o = q.shape[3] if layer["op"] == "DEPTHWISE_CONV_2D" else q.shape[0]
        scale = np.broadcast_to(np.asarray(layer["scale"], np.float32), (np.size(layer["scale"]),))
        axis = layer.get("axis", 3 if layer["op"] == "DEPTHWISE_CONV_2D" else 0)
        if float_model:
            act = dict(kind=_FLOAT32)
            filt = tensor(name, q.shape, _FLOAT32, (q.astype(np.float32)
                                                    * scale.reshape((-1,) + (1,) * (q.ndim - 1))
                                                    if axis == 0 else q.astype(np.float32)))
            bias = tensor(name + "/bias", (o,), _FLOAT32, np.zeros(o, np.float32))
            x = tensor(name + "/input", layer["input"], **act)
            y = tensor(name + "/output", layer["output"], **act)
        else:
            one = dict(scale=[1.0], zero=[0])
            zero = layer.get("zero_point", [0] * scale.size)
            filt = tensor(name, q.shape, _INT8, q.astype(np.int8), scale=scale, zero=zero,
                          axis=axis)
            bias = tensor(name + "/bias", (o,), _INT32, np.zeros(o, np.int32),
                          scale=scale, zero=[0] * scale.size)
            x = tensor(name + "/input", layer["input"], _INT8, **one)
            y = tensor(name + "/output", layer["output"], _INT8, **one)
        ops.append((_CODES[layer["op"]], [x, filt, bias], [y]))

    codes = sorted({c for c, _, _ in ops})
    # tables bottom-up: buffers, quantization, tensors, operators, subgraph, codes, model
    buf_offsets = []
    for raw in buffers:
        data = _vector(b, np.frombuffer(raw, np.uint8), np.uint8) if raw else None
        T.BufferStart(b)
        if data is not None:
            T.BufferAddData(b, data)
        buf_offsets.append(T.BufferEnd(b))
    t_offsets = []
    for t in tensors:
        quant = None
        if t["scale"] is not None:
            sc = _vector(b, t["scale"], np.float32)
            zp = _vector(b, t["zero"], np.int64)
            T.QuantizationParametersStart(b)
            T.QuantizationParametersAddScale(b, sc)
            T.QuantizationParametersAddZeroPoint(b, zp)
            T.QuantizationParametersAddQuantizedDimension(b, t["axis"])
            quant = T.QuantizationParametersEnd(b)
        name = b.CreateString(t["name"])
        shape = _vector(b, t["shape"], np.int32)
        T.TensorStart(b)
        T.TensorAddShape(b, shape)
        T.TensorAddType(b, t["kind"])
        T.TensorAddBuffer(b, t["buffer"])
        T.TensorAddName(b, name)
        if quant is not None:
            T.TensorAddQuantization(b, quant)
        t_offsets.append(T.TensorEnd(b))
    op_offsets = []
    for code, ins, outs in ops:
        vi, vo = _vector(b, ins, np.int32), _vector(b, outs, np.int32)
        T.OperatorStart(b)
        T.OperatorAddOpcodeIndex(b, codes.index(code))
        T.OperatorAddInputs(b, vi)
        T.OperatorAddOutputs(b, vo)
        op_offsets.append(T.OperatorEnd(b))

    def table_vector(start, offsets):
        start(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    tv = table_vector(T.SubGraphStartTensorsVector, t_offsets)
    ov = table_vector(T.SubGraphStartOperatorsVector, op_offsets)
    graph_in = _vector(b, [ins[0] for _, ins, _ in ops], np.int32)
    graph_out = _vector(b, [outs[0] for _, _, outs in ops], np.int32)
    T.SubGraphStart(b)
    T.SubGraphAddTensors(b, tv)
    T.SubGraphAddOperators(b, ov)
    T.SubGraphAddInputs(b, graph_in)
    T.SubGraphAddOutputs(b, graph_out)
    graph = T.SubGraphEnd(b)
    code_offsets = []
    for code in codes:
        T.OperatorCodeStart(b)
        T.OperatorCodeAddDeprecatedBuiltinCode(b, code)
        T.OperatorCodeAddBuiltinCode(b, code)
        T.OperatorCodeAddVersion(b, 1)
        code_offsets.append(T.OperatorCodeEnd(b))
    cv = table_vector(T.ModelStartOperatorCodesVector, code_offsets)
    sv = table_vector(T.ModelStartSubgraphsVector, [graph])
    bv = table_vector(T.ModelStartBuffersVector, buf_offsets)
    desc = b.CreateString("vbxfx test file")
    T.ModelStart(b)
    T.ModelAddVersion(b, 3)
    T.ModelAddOperatorCodes(b, cv)
    T.ModelAddSubgraphs(b, sv)
    T.ModelAddDescription(b, desc)
    T.ModelAddBuffers(b, bv)
    b.Finish(T.ModelEnd(b), file_identifier=b"TFL3")
    with open(path, "wb") as f:
        f.write(b.Output())
