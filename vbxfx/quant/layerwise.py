"""Where int8 error enters: every tensor of the int8 file against the same tensor in float.

onnx2tf writes ``model_full_integer_quant.tflite`` and ``model_float32.tflite`` from one
saved model: the same operators in the same order (the int8 file may add QUANTIZE /
DEQUANTIZE at its ends; fused tensor names differ in their tails). :func:`pair_tensors` pairs
the tensors: operators by position when the two op sequences (QUANTIZE/DEQUANTIZE left out)
agree, else by the first part of the output tensor's name and its shape.

:class:`TensorStats` adds up, sample by sample, for one int8 tensor ``q`` (dequantized) and
its float counterpart ``f``:

* ``sqnr``: ``f`` against ``q``: the error carried so far (cumulative);
* ``grid``: ``f`` against ``f`` put on ``q``'s int8 grid (its scale and zero point, rounded
  and clipped): the error of this tensor's activation quantization alone;
* the observed range of ``f`` and the share of its values outside the int8 range by more
  than half a step (clipped: a value within half a step rounds to the end of the range
  anyway, e.g. white pixels a hair above the input's largest int8 value).

:func:`torch_names` names CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED operators by the torch
layers they came from (:func:`vbxfx.check.tflite_expect.match_layers`: filter shape, then
zero pattern, then graph order).

>>> pairs, notes = pair_tensors(read_tflite("m.tflite"),
...                             read_tflite("m_float32.tflite"))   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from vbxfx.export.tflite_reader import TfliteModel
from vbxfx.quant.interpreter import TensorInfo, dequantize, quantize
from vbxfx.quant.metrics import _db

__all__ = ["TensorPair", "TensorStats", "pair_tensors", "torch_names", "short_name"]

logger = logging.getLogger(__name__)

_ENDS = ("QUANTIZE", "DEQUANTIZE")
_FILTERED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass(frozen=True)
class TensorPair:
    """An int8 tensor (``q``, in the int8 file) and its float counterpart (``f``), with the
    int8 operator that writes it (-1 for the graph input) and the int8 tensors it reads."""

    q: int
    f: int
    op_index: int
    op: str
    inputs: tuple[int, ...]


def short_name(name: str, limit: int = 48) -> str:
    """The first ``;``-part of a fused TFLite tensor name, at most ``limit`` characters."""
    first = name.split(";")[0]
    return first if len(first) <= limit else "..." + first[-(limit - 3):]


def _activation_inputs(model: TfliteModel, op) -> tuple[int, ...]:
    return tuple(t for t in op.inputs
                 if t >= 0 and model.tensors[t].data_offset is None)


def pair_tensors(qmodel: TfliteModel, fmodel: TfliteModel) -> tuple[list[TensorPair], list[str]]:
    """Pair the int8 file's activation tensors with the float file's (module docstring).

    Returns the pairs (graph input first, then in int8 operator order) and notes on what
    could not be paired."""
    notes: list[str] = []
    pairs: list[TensorPair] = []
    # the graph input: int8 input itself, or the output of the QUANTIZE that reads it
    qin, fin = qmodel.inputs[0], fmodel.inputs[0]
    for op in qmodel.operators:
        if op.op == "QUANTIZE" and op.inputs and op.inputs[0] == qin:
            qin = op.outputs[0]
    pairs.append(TensorPair(qin, fin, -1, "INPUT", ()))
    qops = [op for op in qmodel.operators if op.op not in _ENDS]
    fops = [op for op in fmodel.operators if op.op not in _ENDS]
    # a DEQUANTIZE inside the int8 graph passes its tensor on under another index
    alias = {op.outputs[0]: op.inputs[0] for op in qmodel.operators
             if op.op == "DEQUANTIZE" and op.inputs and op.outputs}
    by_position = [o.op for o in qops] == [o.op for o in fops]
    if by_position:
        matches = list(zip(qops, fops))
    else:
        fkeys = {}
        for op in fops:
            t = fmodel.tensors[op.outputs[0]]
            fkeys.setdefault((op.op, t.name.split(";")[0], t.shape), op)
        matches = []
        for op in qops:
            t = qmodel.tensors[op.outputs[0]]
            hit = fkeys.pop((op.op, t.name.split(";")[0], t.shape), None)
            if hit is not None:
                matches.append((op, hit))
        notes.append(f"the float32 file has other operators than the int8 file "
                     f"({len(fops)} vs {len(qops)} besides QUANTIZE/DEQUANTIZE); "
                     f"{len(matches)} paired by tensor name and shape")
    for qop, fop in matches:
        for qt, ft in zip(qop.outputs, fop.outputs):
            if qt < 0 or ft < 0:
                continue
            if tuple(qmodel.tensors[qt].shape) != tuple(fmodel.tensors[ft].shape):
                name = short_name(qmodel.tensors[qt].name)
                notes.append(f"op {qop.index} {qop.op}: tensor {name!r} has shape "
                             f"{qmodel.tensors[qt].shape} in int8 and "
                             f"{fmodel.tensors[ft].shape} in float; not compared")
                continue
            ins = tuple(alias.get(t, t) for t in _activation_inputs(qmodel, qop))
            pairs.append(TensorPair(qt, ft, qop.index, qop.op, ins))
    return pairs, notes


class TensorStats:
    """Running sums for one :class:`TensorPair` over the samples (module docstring)."""

    def __init__(self, info: TensorInfo) -> None:
        self.info = info
        self.signal = self.noise = self.grid_noise = 0.0
        self.count = self.clipped = 0
        self.fmin, self.fmax = np.inf, -np.inf

    def add(self, q: np.ndarray, f: np.ndarray) -> None:
        """``q`` the int8 tensor dequantized, ``f`` the float one (float64, same shape)."""
        self.signal += float(np.sum(f * f))
        self.noise += float(np.sum((q - f) ** 2))
        self.count += f.size
        if f.size:
            self.fmin = min(self.fmin, float(f.min()))
            self.fmax = max(self.fmax, float(f.max()))
        if self.info.quantized:
            lo, hi = self.range
            lo, hi = lo - self.info.scale / 2, hi + self.info.scale / 2
            self.clipped += int(np.count_nonzero((f < lo) | (f > hi)))
            self.grid_noise += float(np.sum((dequantize(quantize(f, self.info), self.info)
                                             - f) ** 2))

    @property
    def range(self) -> tuple[float, float]:
        """The float range the int8 tensor can represent (scale and zero point)."""
        if not self.info.quantized:
            return (-np.inf, np.inf)
        lo, hi = self.info.qrange()
        return (self.info.scale * (lo - self.info.zero_point),
                self.info.scale * (hi - self.info.zero_point))

    @property
    def sqnr_db(self) -> float:
        return _db(self.signal, self.noise)

    @property
    def grid_db(self) -> float | None:
        return _db(self.signal, self.grid_noise) if self.info.quantized else None

    @property
    def clipped_share(self) -> float:
        return self.clipped / self.count if self.count else 0.0


def torch_names(qmodel: TfliteModel, model) -> dict[int, str]:
    """``{int8 op index: torch layer name}`` for the file's CONV_2D, DEPTHWISE_CONV_2D and
    FULLY_CONNECTED operators, as far as the torch model's layers can be matched."""
    from torch import nn

    from vbxfx.errors import VbxError
    from vbxfx.check.tflite_expect import Declared, load_declarations, match_layers

    try:
        _, declared = load_declarations(model)
    except VbxError as e:                      # names are a help, not a requirement
        logger.debug("no torch names: %s", e)
        return {}
    depthwise = [Declared(name, "dense", None, (1, m.in_channels) + tuple(m.kernel_size))
                 for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                 and m.out_channels == m.in_channels]
    out: dict[int, str] = {}
    for kinds, decl in ((("CONV_2D", "FULLY_CONNECTED"), declared),
                        (("DEPTHWISE_CONV_2D",), depthwise)):
        ops, layers = [], []
        for op in qmodel.operators:
            if op.op not in kinds or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            values = qmodel.data(qmodel.tensors[op.inputs[1]])
            if values is None or values.ndim not in (2, 4):
                continue
            ops.append(op.index)
            layers.append((tuple(values.shape), np.asarray(values), None))
        matched, _ = match_layers(layers, decl)
        out.update({k: d.name for k, d in zip(ops, matched) if d is not None})
    return out
