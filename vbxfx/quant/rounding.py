"""The int8 biases (and, as an option, filters) refit to the data, layer by layer, inside
every layer's pattern.

The converter rounds each weight to its nearest int8 value on its own, and each layer's bias
ignores the error the int8 layers before it add. :func:`refit_filters` visits the filtered
layers in graph order and, for each one, runs the file as it stands so far (earlier layers
already refit) on the calibration samples, then

* (``round_filters=True``, ``vbxfx export --int8 optq``) rounds the layer's float weights
  to the int8 grid of the file's own scales column by column, carrying each rounding error
  onto the columns not yet rounded through the inverse of ``H = X^T X`` of the layer's int8
  inputs ``X`` (OPTQ/GPTQ, Frantar et al. 2023), so the errors cancel on the data instead
  of adding up (a layer with fewer than :data:`MIN_ROWS_PER_COLUMN` rows per column of ``H``
  is rounded to nearest);
* sets the int32 bias so that the layer's mean output on the data equals the float model's,
  which takes the error of every earlier layer out of the mean (empirical bias correction).
  Alone (``round_filters=False``, the default ``vbxfx export --int8 bias``) the means are
  those of the layer's int8 and float *outputs*, over the positions where the float output
  is inside the int8 range and off the fused activation's bounds; with OPTQ, those of the
  pre-activation outputs computed from the layer's inputs.

Under OPTQ a compressed layer keeps its pattern exactly: a weight that is zero stays zero,
and the second weight of a pair takes the first's int8 magnitude with the pair's sign
relation (:func:`vbxfx.format.encode_weight` of the converter's int8 filter), so every
repeat the file declared still holds. Depthwise layers are refit channel by channel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from vbxfx.format import encode_weight, weight_repeat
from vbxfx.quant.patch import Int8File, OperatorPair

__all__ = ["refit_filters", "optq_round", "patches"]

logger = logging.getLogger(__name__)

#: Damping of ``H`` (a fraction of its mean diagonal) before it is inverted.
DAMP = 1e-2
#: Rows (sample positions) per column of ``H`` below which a layer is rounded to nearest:
#: with fewer, the error feedback fits the calibration samples and not the next image
#: (MobileNetV2's classifier sees one row per sample).
MIN_ROWS_PER_COLUMN = 20
#: A dense (repeat 4) filter with more zeros than this is left alone: its zeros may be an
#: unstructured pattern this refit does not know.
SPARSE_DENSE = 0.25


def patches(x: np.ndarray, kh: int, kw: int, options: dict) -> np.ndarray:
    """``[positions, kh * kw * C]`` rows of an NHWC sample ``x[H, W, C]`` for a conv with
    ``options`` (padding, stride, dilation), in the TFLite filter's ``(kh, kw, C)`` order."""
    (sh, sw), (dh, dw) = options.get("stride", (1, 1)), options.get("dilation", (1, 1))
    h, w, c = x.shape
    if options.get("padding") == "SAME":
        oh, ow = -(-h // sh), -(-w // sw)
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - h, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - w, 0)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = x.shape[:2]
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    cols = [x[i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]
    return np.stack(cols, 2).reshape(oh * ow, kh * kw * c)


def _inverse_factor(h: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damping)^-1``, batched over leading axes."""
    n = h.shape[-1]
    diag = np.mean(np.diagonal(h, axis1=-2, axis2=-1), axis=-1)
    damped = h + (DAMP * np.maximum(diag, 1e-12))[..., None, None] * np.eye(n)
    inv = np.linalg.inv(damped)
    return np.swapaxes(np.linalg.cholesky(inv), -1, -2)


def optq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray,
               zero: np.ndarray | None = None, partner: np.ndarray | None = None,
               sign: np.ndarray | None = None) -> np.ndarray:
    """Int8 values of ``w[rows, n]`` (grid ``scale[rows]``) rounded one column at a time with
    the error carried forward through ``H[n, n]`` (or one ``H`` per row: ``[rows, n, n]``).

    ``zero[rows, n]`` forces zeros; ``partner[rows, n]`` (-1: none) names an earlier column
    whose int8 value, times ``sign``, the weight must take (a pair of the pattern).
    """
    w = np.array(w, dtype=np.float64)
    u = _inverse_factor(h)
    rows, n = w.shape
    q = np.zeros((rows, n), dtype=np.int64)
    every = np.arange(rows)
    for j in range(n):
        col = w[:, j]
        qj = np.clip(np.round(col / scale), -127, 127).astype(np.int64)
        if zero is not None:
            qj[zero[:, j]] = 0
        if partner is not None:
            tied = (partner[:, j] >= 0) & (partner[:, j] < j)
            qj[tied] = sign[tied, j].astype(np.int64) * q[every[tied], partner[tied, j]]
        q[:, j] = qj
        pivot = u[..., j, j] if u.ndim == 3 else u[j, j]
        err = (col - qj * scale) / pivot
        rest = u[:, j, j + 1:] if u.ndim == 3 else u[j, j + 1:][None, :]
        w[:, j + 1:] -= err[:, None] * rest
    return q


def _pattern(q_int8: np.ndarray):
    """``(zero, partner, sign)`` constraints keeping a compressed filter's pattern, in the
    TFLite layout ``[O, kh * kw * I]``; None for a dense filter, "skip" for one to leave."""
    o = q_int8.shape[0]
    t = torch.from_numpy(q_int8.astype(np.float32))
    t = t.permute(0, 3, 1, 2) if t.dim() == 4 else t                 # torch [O, I, kh, kw]
    repeat = weight_repeat(t, quantize=False)
    if repeat == 4:
        return "skip" if float((q_int8 == 0).mean()) > SPARSE_DENSE else None
    enc = encode_weight(t, repeat)
    flat = enc.pair_index.clone()
    if t.dim() == 4:
        _, i, kh, kw = t.shape
        idx = flat.clamp_min(0) % (i * kh * kw)
        col = ((idx % (kh * kw)) // kw * kw + (idx % kw)) * i + idx // (kh * kw)
        to_tfl = (lambda a: a.permute(0, 2, 3, 1).reshape(o, -1))
    else:
        col = flat.clamp_min(0) % t.shape[1]
        to_tfl = (lambda a: a)
    col = torch.where(flat >= 0, col, torch.full_like(col, -1))
    return (to_tfl(~enc.mask.bool()).numpy(), to_tfl(col).numpy(),
            to_tfl(enc.pair_sign.to(torch.int64)).numpy())


def _layer_stats(p: OperatorPair, f: Int8File, int8_tensor: Callable, float_tensor: Callable,
                 count: int, depthwise: bool, shape: tuple[int, ...]):
    """``(H, mean int8 input row, mean float input row, rows)`` over the samples (a ones
    column appended); depthwise: one ``H`` per channel."""
    kh, kw = (shape[1], shape[2]) if len(shape) == 4 else (1, 1)
    h = mq = mf = None
    rows = 0
    for k in range(count):
        xq, xf = int8_tensor(k, p.q.inputs[0]), float_tensor(k, p.f.inputs[0])
        if p.q.op == "FULLY_CONNECTED":
            pq, pf = xq.reshape(-1, shape[1]), xf.reshape(-1, shape[1])
        else:
            pq, pf = (patches(x[0], kh, kw, p.q.options) for x in (xq, xf))
        if depthwise:            # [positions, kh*kw, C] + ones
            c = shape[-1]
            pq = np.concatenate([pq.reshape(len(pq), -1, c), np.ones((len(pq), 1, c))], 1)
            pf = np.concatenate([pf.reshape(len(pf), -1, c), np.ones((len(pf), 1, c))], 1)
            hk = np.einsum("pic,pjc->cij", pq, pq)
        else:
            pq = np.concatenate([pq, np.ones((len(pq), 1))], 1)
            pf = np.concatenate([pf, np.ones((len(pf), 1))], 1)
            hk = pq.T @ pq
        h = hk if h is None else h + hk
        mq = pq.sum(0) if mq is None else mq + pq.sum(0)
        mf = pf.sum(0) if mf is None else mf + pf.sum(0)
        rows += len(pq)
    return h, mq / rows, mf / rows, rows


def _output_correction(p: OperatorPair, f: Int8File, int8_tensor: Callable,
                       float_tensor: Callable, count: int) -> np.ndarray:
    """Per output channel, the mean of (int8 output - float output) over the positions where
    the float output lies inside the int8 range and off the fused activation's bounds (where
    a bias change moves the output one for one)."""
    scale, zero = f.activation(p.q.outputs[0])
    lo, hi = (-128 - zero) * scale, (127 - zero) * scale
    act = p.q.options.get("activation", "NONE")
    total = count_live = 0
    for k in range(count):
        q = int8_tensor(k, p.q.outputs[0])
        r = float_tensor(k, p.f.outputs[0])
        q, r = q.reshape(-1, q.shape[-1]), r.reshape(-1, r.shape[-1])
        live = (r > lo + scale) & (r < hi - scale)
        if act in ("RELU", "RELU6", "RELU_N1_TO_1"):
            live &= r > 1e-6
        if act == "RELU6":
            live &= r < 6.0 - 1e-6
        total = total + ((q - r) * live).sum(0)
        count_live = count_live + live.sum(0)
    return total / np.maximum(count_live, 1)


def refit_filters(f: Int8File, pairs: list[OperatorPair], float_weight: Callable,
                  int8_runner: Callable, float_tensor: Callable, count: int,
                  progress: Callable[[int, int], None] | None = None,
                  keep: frozenset[int] = frozenset(),
                  round_filters: bool = True) -> tuple[int, list[str]]:
    """Refit every filtered layer of ``f`` in place (module docstring); returns the number of
    layers refit and notes on those left as they were.

    ``float_weight(tensor)`` gives a constant of the float32 file; ``int8_runner()`` a
    function ``(sample, int8 tensor) -> value`` over the file as it stands now;
    ``float_tensor(sample, float tensor)`` the float32 file's values. The filters of the
    int8 operators in ``keep`` (indices; e.g. layers declared in the unstructured format,
    whose pairs this refit does not know) stay as they are; their biases are corrected.
    ``round_filters=False`` keeps every int8 filter and corrects the biases alone.
    """
    layers = [p for p in pairs if p.q.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
              and len(p.q.inputs) > 2 and p.q.inputs[2] >= 0 and f.activation(p.q.inputs[0])]
    done, notes = 0, []
    for n, p in enumerate(layers):
        if progress is not None:
            progress(n, len(layers))
        q8 = f.weights(p.q.inputs[1])
        shape = q8.shape
        depthwise = p.q.op == "DEPTHWISE_CONV_2D"
        name = f.tensor(p.q.outputs[0]).name.split(";")[0]
        if not round_filters:        # bias correction alone, on the layer's outputs
            shift = _output_correction(p, f, int8_runner(), float_tensor, count)
            bias = f.bias(p.q.inputs[2]).astype(np.float64) * f.scales(p.q.inputs[2])
            f.write_bias(p.q, bias - shift)
            done += 1
            continue
        if depthwise and f.tensor(p.q.inputs[0]).shape[-1] != shape[-1]:
            notes.append(f"{name}: depth multiplier > 1, left as converted")
            continue
        if p.q.op == "CONV_2D" and f.tensor(p.q.inputs[0]).shape[-1] != shape[-1]:
            notes.append(f"{name}: grouped convolution, left as converted")
            continue
        pattern = None if depthwise else ("keep" if p.q.index in keep else _pattern(q8))
        wf = np.asarray(float_weight(p.f.inputs[1]), dtype=np.float64)
        bf = (np.asarray(float_weight(p.f.inputs[2]), dtype=np.float64) if len(p.f.inputs) > 2
              and p.f.inputs[2] >= 0 else np.zeros(shape[-1] if depthwise else shape[0]))
        w_scale = f.scales(p.q.inputs[1]).astype(np.float64)
        channels = shape[-1] if depthwise else shape[0]
        ws = w_scale if w_scale.size == channels else np.full(channels, w_scale[0])
        run = int8_runner()
        h, mq, mf, rows = _layer_stats(p, f, run, float_tensor, count, depthwise, shape)
        nearest = rows < MIN_ROWS_PER_COLUMN * h.shape[-1]
        if nearest:
            h = np.broadcast_to(np.eye(h.shape[-1]), h.shape)      # no error feedback
        if depthwise:
            w = wf.reshape(-1, channels).T                                    # [C, kh*kw]
            q = optq_round(w, h[:, :-1, :-1], ws)
            value = (mf[:-1].T * w).sum(1) + bf - (mq[:-1].T * q * ws[:, None]).sum(1)
            q8[...] = q.T.reshape(shape).astype(np.int8)
        else:
            w = wf.reshape(channels, -1)
            if pattern == "keep":
                notes.append(f"{name}: declared unstructured: filter kept, bias corrected")
            elif pattern == "skip":
                notes.append(f"{name}: a dense filter with {float((q8 == 0).mean()):.0%} "
                             "zeros (an unstructured pattern?): bias corrected only")
            if isinstance(pattern, str):
                q = q8.reshape(channels, -1).astype(np.int64)
            else:
                zero, partner, sign = pattern if pattern is not None else (None, None, None)
                q = optq_round(w, h[:-1, :-1], ws, zero, partner, sign)
            value = w @ mf[:-1] + bf - (q * ws[:, None]) @ mq[:-1]
            q8[...] = q.reshape(shape).astype(np.int8)
        f.write_bias(p.q, value)
        done += 1
    return done, notes
