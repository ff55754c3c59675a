"""Activation ranges chosen for the least int8 error, not the converter's min/max.

TensorFlow's converter gives each int8 activation the range its calibration data reached,
min to max. A few outlying values then stretch the range and every other value gets a
coarse grid: MobileNetV2's first projection conv reached 12 where its held-out outputs stay
under 5. :func:`choose_ranges` instead takes, for each activation, the clipping range whose
int8 grid has the least mean squared error over the float activations the float32 file
computes on the calibration data (a grid search over both ends, as AIMET's "TF-enhanced"
and TensorRT's percentile calibrators do), or, for a tensor read only by filtered layers,
the range of least error at their outputs (:mod:`vbxfx.quant.consumer_ranges`);
:func:`apply_ranges` writes the new scales and zero points into the file and re-expresses
the int32 biases of the layers that read them.

Tensors that TFLite requires to share one quantization (the input and output of PAD,
RESHAPE, pooling, CONCATENATION, ...) get one range together. The graph input (its scale is
how the user feeds the file), the fixed-scale outputs of LOGISTIC / TANH / SOFTMAX, and
every tensor an operator outside the known sets touches are left as the converter set them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from vbxfx.quant.patch import FILTERED, Int8File, OperatorPair

__all__ = ["choose_ranges", "apply_ranges", "int8_params", "grid_error"]

logger = logging.getLogger(__name__)

#: Operators whose int8 kernels take any input and output quantization.
FREE = frozenset(FILTERED) | {"ADD", "SUB", "MUL", "MEAN", "SUM", "HARD_SWISH",
                              "SQUARED_DIFFERENCE"}
#: Operators whose input(s) and output must share one quantization.
SHARED = frozenset({"PAD", "PADV2", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "MAX_POOL_2D",
                    "AVERAGE_POOL_2D", "CONCATENATION", "STRIDED_SLICE", "SLICE", "SPLIT",
                    "SPLIT_V", "TRANSPOSE", "GATHER", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH",
                    "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "PACK", "UNPACK"})
#: Operators whose output quantization TFLite fixes (1/256 steps).
FIXED_OUTPUT = frozenset({"LOGISTIC", "TANH", "SOFTMAX", "LOG_SOFTMAX"})
#: Fractions of the observed min / max searched.
GRID = np.geomspace(0.05, 1.0, 16)
#: Float values kept per tensor and sample, and per group in all, for the search.
SAMPLES_PER_TENSOR = 4096
SAMPLES_PER_GROUP = 65536
#: Calibration samples the search at the consumers' outputs runs on.
CONSUMER_SAMPLES = 8


def int8_params(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of the int8 grid over ``[lo, hi]`` (widened to hold 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not scale > 0:
        scale = 1e-8
    zero = int(np.clip(np.round(-128.0 - lo / scale), -128, 127))
    return float(scale), zero


def grid_error(x: np.ndarray, scale: float, zero: int) -> float:
    """Mean squared error of ``x`` put on the int8 grid ``(scale, zero)`` (rounded, clipped)."""
    q = np.clip(np.round(x / scale) + zero, -128, 127)
    return float(np.mean(((q - zero) * scale - x) ** 2))


def _best_range(x: np.ndarray, seed: int = 0) -> tuple[float, int]:
    lo0, hi0 = float(x.min()), float(x.max())
    if x.size > SAMPLES_PER_GROUP:
        x = np.random.default_rng(seed).choice(x, SAMPLES_PER_GROUP, replace=False)
    los = [0.0] if lo0 >= 0 else list(GRID * lo0)
    his = [0.0] if hi0 <= 0 else list(GRID * hi0)
    best = None
    for lo in los:
        for hi in his:
            scale, zero = int8_params(lo, hi)
            err = grid_error(x, scale, zero)
            if best is None or err < best[0]:
                best = (err, scale, zero)
    return best[1], best[2]


def _groups(f: Int8File, pairs: list[OperatorPair]) -> tuple[dict[int, list[int]], set[int]]:
    """The file's int8 activations in groups that must share a range, and the tensors that
    must keep the converter's quantization (those without a float counterpart among them)."""
    model = f.model
    acts = {t for op in model.operators for t in op.inputs + op.outputs
            if t >= 0 and f.activation(t) is not None}
    parent = {t: t for t in acts}

    def root(t: int) -> int:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    paired = {t for p in pairs for t in p.q.outputs}
    fixed = set(model.inputs) | (acts - paired)
    for op in model.operators:
        ins = [t for t in op.inputs if t in parent]
        if op.op == "QUANTIZE" or op.op in FIXED_OUTPUT:
            fixed.update(op.outputs)
        elif op.op in SHARED:
            members = ins + [t for t in op.outputs if t in parent]
            for t in members[1:]:
                parent[root(t)] = root(members[0])
        elif op.op not in FREE:
            fixed.update(ins)
            fixed.update(op.outputs)
    groups: dict[int, list[int]] = {}
    for t in sorted(acts):
        groups.setdefault(root(t), []).append(t)
    return groups, fixed


def choose_ranges(f: Int8File, pairs: list[OperatorPair], float_tensors: Callable,
                  count: int, seed: int = 0, weight: Callable | None = None
                  ) -> dict[int, tuple[float, int]]:
    """``{int8 tensor: (scale, zero_point)}`` for every activation whose range may change.

    ``float_tensors(k)`` runs calibration sample ``k`` through the float32 file and returns
    a function from a float tensor index to its value (see :mod:`vbxfx.quant.calibrate`).
    With ``weight(index)`` (the float32 file's constants), the activations read only by
    filtered layers take the range of least error at those layers' outputs
    (:mod:`vbxfx.quant.consumer_ranges`), on at most :data:`CONSUMER_SAMPLES` samples.
    """
    groups, fixed = _groups(f, pairs)
    to_float = {q: fo for p in pairs for q, fo in zip(p.q.outputs, p.f.outputs) if q >= 0}
    wanted = [t for members in groups.values() if not fixed.intersection(members)
              for t in members]
    rng = np.random.default_rng(seed)
    samples: dict[int, list[np.ndarray]] = {t: [] for t in wanted}
    for k in range(count):
        value = float_tensors(k)
        for t in wanted:
            v = np.asarray(value(to_float[t]), dtype=np.float64).ravel()
            if v.size > SAMPLES_PER_TENSOR:
                keep = rng.choice(v.size, SAMPLES_PER_TENSOR, replace=False)
                v = np.concatenate([v[keep], [v.min(), v.max()]])
            samples[t].append(v)
    chosen: dict[int, tuple[float, int]] = {}
    for members in groups.values():
        if fixed.intersection(members):
            continue
        x = np.concatenate([np.concatenate(samples[t]) for t in members])
        params = _best_range(x)
        chosen.update({t: params for t in members})
    logger.info("ranges: %d of %d activation tensors in %d groups get a new range",
                len(chosen), sum(len(m) for m in groups.values()), len(groups))
    if weight is not None:
        from vbxfx.quant.consumer_ranges import consumer_ranges

        free = {r: m for r, m in groups.items() if not fixed.intersection(m)}
        consumer_ranges(f, pairs, free, chosen, float_tensors, weight,
                        min(count, CONSUMER_SAMPLES), int8_params, seed)
    return chosen


def apply_ranges(f: Int8File, chosen: dict[int, tuple[float, int]]) -> int:
    """Write the chosen ranges and re-express the biases of the operators that read them;
    returns how many biases changed."""
    for t, (scale, zero) in chosen.items():
        f.set_activation(t, scale, zero)
    changed = 0
    for op in f.model.operators:
        if op.op in FILTERED and op.inputs and op.inputs[0] in chosen:
            f.requantize_bias(op, chosen[op.inputs[0]][0])
            changed += 1
    return changed
