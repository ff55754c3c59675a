"""Does a weight hold what its annotation says? Shared by the exporter and the checker.

Two questions per layer (``docs/onnx_schema.md``):

* **fits**: after symmetric per-output-channel int8 quantization the weight fits the
  declared repeat (comp), or needs no more multiplies than the annotation counts (ucomp);
* **agrees**: the mask equals the weight's nonzeros (an all-zero output channel, as a
  BatchNorm scale of zero leaves it, is accepted), every pair is mutual, lies in one block
  (comp) or joins an even and an odd input channel (ucomp), has equal int8 magnitudes and
  the stated sign relation.

>>> import torch, vbxfx
>>> w = vbxfx.project_weight(torch.randn(8, 16, 3, 3), 2)
>>> ann = LayerAnnotation("conv", "comp", 2, vbxfx.encode_weight(w, 2))
>>> v = verify_layer(w, ann, "conv")
>>> v.fits, v.agrees, v.compiler_repeat
(True, True, 2)
>>> verify_layer(-3.0 * w, ann, "conv").ok      # a folded BatchNorm keeps it
True

A weight that fits a smaller repeat than it declares is not wrong, but the compiler takes the
smallest repeat every block fits, so the layer costs less than declared; ``warnings`` says so:

>>> one = vbxfx.project_weight(torch.randn(8, 16), 1)
>>> v = verify_layer(one, LayerAnnotation("fc", "comp", 2, vbxfx.encode_weight(one, 2)), "fc")
>>> v.ok, v.compiler_repeat, v.warnings[0][:47]
(True, 1, 'fc: declares repeat 2, but its int8 weights fit')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vbxfx.export.annotations import LayerAnnotation
from vbxfx.format import (BLOCK, explain_violation, padded_channels, quantize_int8, to_blocks,
                          unstructured_macs)
from vbxfx.format.structured import fits_blocks

__all__ = ["LayerVerdict", "verify_layer", "dense_mults"]


@dataclass(frozen=True)
class LayerVerdict:
    """The outcome of :func:`verify_layer`; multiplies are per output position."""

    fits: bool
    agrees: bool
    compiler_repeat: int | None   # comp: the repeat vnnx_compile will pick; ucomp: None
    mults: int                    # multiplies on the hardware, from the weight itself
    declared_mults: int           # multiplies the annotation promises
    problems: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # e.g. a declared repeat above the one the compiler picks

    @property
    def ok(self) -> bool:
        return self.fits and self.agrees


def dense_mults(shape: tuple[int, ...]) -> int:
    """Standard multiplies per output position of a weight of ``shape`` (groups=1)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _comp_mults(shape: tuple[int, ...], repeat: int) -> int:
    kernel = dense_mults(shape[2:]) if len(shape) == 4 else 1
    return shape[0] * kernel * padded_channels(shape[1]) * 2 * repeat // BLOCK


def _where(shape: tuple[int, ...], flat: int) -> str:
    if len(shape) == 4:
        o, i, kh, kw = shape
        ky, kx = divmod(flat % (kh * kw), kw)
        i_, o_ = (flat // (kh * kw)) % i, flat // (i * kh * kw)
        return (f"out channel {o_}, in channel {i_}, ky {ky}, kx {kx} "
                f"(block {i_ // BLOCK})")
    o, i = divmod(flat, shape[1])
    return f"out channel {o}, in channel {i} (block {i // BLOCK})"


def _agreement(weight: torch.Tensor, q: torch.Tensor, ann: LayerAnnotation
               ) -> tuple[list[str], int]:
    """``(disagreements between the weight and its encoding, paired weights declared)``.

    numpy (single-threaded element-wise work is faster than torch's here); the pair checks
    look at the paired weights only (positions ``p``, partners ``j``), the rest of the
    weight needs no work there. A problem names the first weight it hits, in flat order.
    """
    enc, shape = ann.encoding, tuple(weight.shape)
    w = weight.reshape(-1).numpy()
    qf = q.reshape(-1).numpy()
    mask = enc.mask.detach().reshape(-1).cpu().numpy().astype(bool, copy=False)
    idx = enc.pair_index.detach().reshape(-1).cpu().numpy()
    sign = enc.pair_sign.detach().reshape(-1).cpu().numpy()
    n = w.size
    nz = w != 0
    paired = idx >= 0
    p = np.flatnonzero(paired)
    checks: list[tuple[str, np.ndarray, np.ndarray | None]] = []  # (what, bad, positions)
    wrong = nz != mask
    if wrong.any():  # an all-zero output channel (a BatchNorm scale of 0) is accepted
        zero_channel = ~nz.reshape(shape[0], -1).any(axis=1)
        checks.append(("the mask does not match the weight's nonzeros",
                       wrong & ~np.repeat(zero_channel, n // shape[0]), None))
    checks.append(("pair_sign is set on an unpaired weight or missing on a pair",
                   (sign != 0) != paired, None))
    # the partner must lie in the same input-channel vector: a whole number of channel
    # strides away, inside the channels
    stride = n // (shape[0] * shape[1])
    j = idx[p].astype(np.int64, copy=False)
    delta = j - p
    off = delta if stride == 1 else delta // stride
    channel = (p if stride == 1 else p // stride) % shape[1]
    ch_j = channel + off
    outside = (off * stride != delta) | (ch_j < 0) | (ch_j >= shape[1])
    if outside.any():
        return [f"annotation disagrees with the weight: a pair leaves its input-channel vector "
                f"at {_where(shape, int(p[np.argmax(outside)]))}"], p.size
    wp, wj = w[p], w[j]
    nz_p, nz_j = wp != 0, wj != 0
    checks += [
        ("a pair is not mutual", idx[j] != p, p),
        ("a paired weight is masked out", ~(mask[p] & mask[j]), p),
        ("a pair's int8 magnitudes differ", np.abs(qf[p]) != np.abs(qf[j]), p),
        ("a pair's sign relation differs from pair_sign",
         nz_p & nz_j & (((wp < 0) == (wj < 0)) != (sign[p] > 0)), p),
    ]
    if ann.fmt == "comp":
        checks.append(("a pair crosses an 8-channel block", (ch_j >> 3) != (channel >> 3), p))
    else:
        checks.append(("a pair joins two even or two odd input channels", (off & 1) == 0, p))
    problems = []
    for what, bad, positions in checks:
        if bad.any():
            hits = np.flatnonzero(bad)
            first = int(hits[0] if positions is None else positions[hits[0]])
            problems.append(f"annotation disagrees with the weight: {what} at "
                            f"{_where(shape, first)} ({hits.size} weight(s))")
    return problems, p.size


def _compiler_repeat(q: torch.Tensor, declared: int) -> tuple[int, bool]:
    """``(repeat vnnx_compile picks, whether it is <= declared)`` on int8 values ``q``, with
    the blocks laid out once and as few full block checks as the cheap necessary
    conditions allow."""
    blocks = to_blocks(q).t().contiguous()             # [8, n] float32

    def fits_at(r: int) -> bool:
        return bool(fits_blocks(blocks, r).all())

    if declared < 4 and not fits_at(declared):
        return next((r for r in (1, 2) if r < declared and fits_at(r)), 4), False
    for r in (1, 2):
        if r >= declared:
            continue
        nz = blocks != 0
        if r == 1 and bool((nz[0::2] & nz[1::2]).any()):  # a full sub-pair: not repeat 1
            continue
        if fits_at(r):
            return r, True
    return declared, True


@torch.no_grad()
def verify_layer(weight: torch.Tensor, ann: LayerAnnotation, where: str) -> LayerVerdict:
    """Check ``weight`` (torch layout, float) against its annotation; ``where`` names the
    layer or node in the problems."""
    enc = ann.encoding
    shape = tuple(weight.shape)
    if tuple(enc.mask.shape) != shape:
        msg = (f"{where}: the weight has shape {shape}, the annotation {tuple(enc.mask.shape)}")
        return LayerVerdict(False, False, None, 0, 0, (msg,))
    weight = weight.detach().to(torch.float32).cpu()
    q, _ = quantize_int8(weight)
    disagreements, paired = _agreement(weight, q, ann)
    problems = [f"{where}: {p}" for p in disagreements]
    declared_pairs = paired // 2
    notes: tuple[str, ...] = ()
    if ann.fmt == "comp":
        compiler_repeat, fit_ok = _compiler_repeat(q, ann.repeat)
        if not fit_ok:
            violation = explain_violation(q.to(torch.float32), ann.repeat, quantize=False)
            problems.insert(0, f"{where}: int8 weight at {violation}")
        mults = _comp_mults(shape, compiler_repeat)
        declared = _comp_mults(shape, ann.repeat)
        if fit_ok and compiler_repeat < ann.repeat:
            notes = (f"{where}: declares repeat {ann.repeat}, but its int8 weights fit repeat "
                     f"{compiler_repeat}: the compiler will use R={compiler_repeat}, "
                     f"{declared - mults} fewer multiplies per output position than declared",)
    else:
        compiler_repeat = None
        mults = unstructured_macs(weight)
        declared = int(enc.mask.sum()) - declared_pairs
        fit_ok = mults <= declared
        if not fit_ok:
            problems.insert(0, f"{where}: the int8 weight needs {mults} multiplies per output "
                               f"position, the annotation promises {declared}")
    agrees = len(problems) == (0 if fit_ok else 1)
    return LayerVerdict(fit_ok, agrees, compiler_repeat, mults, declared, tuple(problems),
                        notes)
