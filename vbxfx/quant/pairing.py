"""Operators of the int8 file paired with the float32 file's by the graph, not by position.

The converter writes both files from one saved model, and usually in one operator order.
Not always: where two operators read the same tensor (a YOLO head's box and class
convolutions), the int8 file may run them the other way round. :func:`pair_by_graph` then
follows the data: the graph inputs pair first, and each int8 operator pairs with the float32
operator of the same type whose activation inputs are the paired tensors and whose outputs
have the same shapes; between equals with filters, the float filter closest to the
dequantized int8 one wins.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from vbxfx.errors import CheckError
from vbxfx.export.tflite_reader import TfliteModel, TfliteOperator

__all__ = ["pair_by_graph"]

_ENDS = ("QUANTIZE", "DEQUANTIZE")
_FILTERED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _roots(model: TfliteModel) -> Callable[[int], int]:
    """Tensor -> the tensor it copies through QUANTIZE / DEQUANTIZE (itself otherwise)."""
    alias = {op.outputs[0]: op.inputs[0] for op in model.operators
             if op.op in _ENDS and op.inputs and op.outputs}

    def root(t: int) -> int:
        seen = set()
        while t in alias and t not in seen:
            seen.add(t)
            t = alias[t]
        return t
    return root


def _activations(model: TfliteModel, op: TfliteOperator, root) -> list[int]:
    return [root(t) for t in op.inputs if t >= 0 and model.tensors[t].data_offset is None]


def _filter_distance(qmodel: TfliteModel, q: TfliteOperator, fmodel: TfliteModel,
                     f: TfliteOperator) -> float:
    qt, ft = qmodel.tensors[q.inputs[1]], fmodel.tensors[f.inputs[1]]
    if qt.shape != ft.shape:
        return float("inf")
    qv, fv = qmodel.data(qt), fmodel.data(ft)
    if qv is None or fv is None or qt.quantization is None:
        return float("inf")
    quant = qt.quantization
    shape = [1] * qv.ndim
    if quant.per_channel:
        shape[quant.axis] = -1
    real = (qv.astype(np.float64) - quant.zero_point.reshape(shape)) * quant.scale.reshape(shape)
    return float(np.abs(real - fv.astype(np.float64)).sum() / (np.abs(fv).sum() + 1e-30))


def pair_by_graph(qmodel: TfliteModel, fmodel: TfliteModel) -> list[tuple[TfliteOperator,
                                                                               TfliteOperator]]:
    """``[(int8 operator, float32 operator)]`` in the int8 file's order (module docstring).

    Raises:
        CheckError: an int8 operator has no float32 counterpart.
    """
    qroot, froot = _roots(qmodel), _roots(fmodel)
    mapping = {qroot(a): froot(b) for a, b in zip(qmodel.inputs, fmodel.inputs)}
    free: dict[str, list[TfliteOperator]] = defaultdict(list)
    for op in fmodel.operators:
        if op.op not in _ENDS:
            free[op.op].append(op)
    pairs = []
    for q in qmodel.operators:
        if q.op in _ENDS:
            continue
        want = [mapping.get(t) for t in _activations(qmodel, q, qroot)]
        shapes = [qmodel.tensors[t].shape for t in q.outputs if t >= 0]
        cands = [f for f in free[q.op]
                 if _activations(fmodel, f, froot) == want
                 and [fmodel.tensors[t].shape for t in f.outputs if t >= 0] == shapes]
        if not cands:
            raise CheckError(f"{fmodel.path} has no operator that matches {qmodel.path}'s "
                             f"operator {q.index} ({q.op}): give the float32 file onnx2tf "
                             "wrote with the int8 one")
        if len(cands) > 1 and q.op in _FILTERED:
            cands.sort(key=lambda f: _filter_distance(qmodel, q, fmodel, f))
        f = cands[0]
        free[q.op].remove(f)
        mapping.update((qroot(a), froot(b)) for a, b in zip(q.outputs, f.outputs)
                       if a >= 0 and b >= 0)
        pairs.append((q, f))
    return pairs
