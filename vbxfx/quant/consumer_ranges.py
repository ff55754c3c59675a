"""Activation ranges chosen for the error they leave in the layers that read them.

:mod:`vbxfx.quant.ranges` gives each activation the int8 range of least error *on that
tensor*. That is the wrong measure in front of a depthwise convolution: its 3x3 filters are
high-pass, so they pass the image's smooth signal at a small gain and the grid's
uncorrelated rounding noise at a large one. On MobileNetV2 the stem's ReLU6 output (values
up to 6, only 0.02 % of them above 3) keeps [0, 6] by its own error, but the first depthwise
convolution's output is 5 dB closer to float with [0, 3] (28.6 -> 33.6 dB, float weights).

:func:`consumer_ranges` therefore picks, for every activation group read only by filtered
layers (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, as their input), the range whose
rounding gives the least relative squared error at those layers' outputs (after their fused
activation), computed with the float32 file's weights on calibration samples. Candidates:
the tensor's own best range and fractions of the observed ends (both ends scaled alike).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from vbxfx.quant.patch import FILTERED, Int8File, OperatorPair
from vbxfx.quant.rounding import patches

__all__ = ["consumer_ranges", "consumers_of"]

logger = logging.getLogger(__name__)

#: Fractions of the observed ends tried.
FRACTIONS = np.geomspace(0.1, 1.0, 20)
#: Output positions per consumer and sample in the search.
POSITIONS = 4096


def consumers_of(f: Int8File, pairs: list[OperatorPair], members: list[int]
                 ) -> list[OperatorPair] | None:
    """The filtered layers reading ``members`` as their input, or None when anything else
    reads one of them (then the tensor's own error decides)."""
    wanted = set(members)
    by_q = {p.q.index: p for p in pairs}
    found = []
    for op in f.model.operators:
        if not wanted.intersection(t for t in op.inputs if t >= 0):
            continue
        p = by_q.get(op.index)
        if p is None or op.op not in FILTERED or op.inputs[0] not in wanted \
                or wanted.intersection(op.inputs[1:]):
            return None
        found.append(p)
    return found or None


def _act(y: np.ndarray, name: str) -> np.ndarray:
    if name == "RELU6":
        return np.clip(y, 0.0, 6.0)
    if name == "RELU":
        return np.maximum(y, 0.0)
    if name == "RELU_N1_TO_1":
        return np.clip(y, -1.0, 1.0)
    return y


class _Layer:
    """One consumer: its float weights, and the rows of its input at sampled positions."""

    def __init__(self, p: OperatorPair, weight: Callable[[int], np.ndarray]):
        self.op = p.q.op
        self.options = p.q.options
        self.act = p.q.options.get("activation", "NONE")
        self.w = np.asarray(weight(p.f.inputs[1]), dtype=np.float64)
        has_bias = len(p.f.inputs) > 2 and p.f.inputs[2] >= 0
        self.b = np.asarray(weight(p.f.inputs[2]), dtype=np.float64) if has_bias else 0.0
        self.rows: list[np.ndarray] = []

    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        if self.op == "FULLY_CONNECTED":
            rows = x.reshape(-1, self.w.shape[1])
        else:
            rows = patches(x[0], self.w.shape[1], self.w.shape[2], self.options)
        if len(rows) > POSITIONS:
            rows = rows[rng.choice(len(rows), POSITIONS, replace=False)]
        self.rows.append(rows.astype(np.float64))

    def out(self, rows: np.ndarray) -> np.ndarray:
        if self.op == "DEPTHWISE_CONV_2D":
            c = self.w.shape[-1]
            y = (rows.reshape(len(rows), -1, c) * self.w.reshape(-1, c)[None]).sum(1)
        else:
            y = rows @ self.w.reshape(self.w.shape[0], -1).T
        return _act(y + self.b, self.act)


def _dequantized(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    return (np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale


def consumer_ranges(f: Int8File, pairs: list[OperatorPair], groups: dict[int, list[int]],
                    chosen: dict[int, tuple[float, int]], float_tensors: Callable,
                    weight: Callable[[int], np.ndarray], count: int, params: Callable,
                    seed: int = 0) -> dict[int, tuple[float, int]]:
    """Replace in ``chosen`` (tensor -> (scale, zero point), the tensor-error ranges) the
    range of every group read only by filtered layers (module docstring); returns
    ``chosen``. ``float_tensors(k)``: see :func:`vbxfx.quant.ranges.choose_ranges`;
    ``weight(index)``: a constant of the float32 file; ``params(lo, hi)``: the int8 grid
    over a range (:func:`vbxfx.quant.ranges.int8_params`)."""
    to_float = {q: fo for p in pairs for q, fo in zip(p.q.outputs, p.f.outputs) if q >= 0}
    todo = {}
    for root, members in groups.items():
        if not all(t in chosen for t in members):
            continue
        readers = consumers_of(f, pairs, members)
        if readers:
            todo[root] = (members, [(_Layer(p, weight), p.q.inputs[0]) for p in readers])
    if not todo:
        return chosen
    rng = np.random.default_rng(seed)
    ends: dict[int, list[float]] = {}
    for k in range(count):
        value = float_tensors(k)
        for root, (members, layers) in todo.items():
            for layer, t in layers:
                x = np.asarray(value(to_float[t]), dtype=np.float64)
                layer.add(x, rng)
                lo, hi = ends.setdefault(root, [np.inf, -np.inf])
                ends[root] = [min(lo, float(x.min())), max(hi, float(x.max()))]
    changed = 0
    for root, (members, layers) in todo.items():
        lo0, hi0 = ends[root]
        own = chosen[members[0]]
        candidates = [own] + [params(g * min(lo0, 0.0), g * max(hi0, 0.0))
                              for g in FRACTIONS]
        refs = [[layer.out(r) for r in layer.rows] for layer, _ in layers]
        energy = [max(sum(float(np.sum(y * y)) for y in ys), 1e-30) for ys in refs]

        def error(params):
            return sum(sum(float(np.sum((layer.out(_dequantized(r, *params)) - y) ** 2))
                           for r, y in zip(layer.rows, ys)) / e
                       for (layer, _), ys, e in zip(layers, refs, energy))

        scores = [error(c) for c in candidates]
        best = candidates[int(np.argmin(scores))]
        if best != own:
            changed += 1
            chosen.update({t: best for t in members})
    logger.info("ranges: %d of %d groups read only by filtered layers take the range of least "
                "error at those layers' outputs", changed, len(todo))
    return chosen
