"""Encoding of a fitting weight: mask, pair indices and pair signs.

For a weight that fits a repeat, :func:`encode_weight` derives

* ``mask`` (bool, weight's shape): the nonzeros;
* ``pair_index`` (int64, weight's shape): flat index (into ``weight.flatten()``) of the
  weight that shares this one's multiplier, or -1;
* ``pair_sign`` (int8, weight's shape): +1 when the pair has the same sign (the pre-adder
  adds), -1 when opposite (it subtracts), 0 when unpaired.

:func:`apply_encoding` is the least-squares projection of any weight onto that fixed pattern
(masked weights zeroed, each pair replaced by its common magnitude); on the encoded weight
itself it gives the weight back exactly, so it doubles as the decoder.

>>> import torch
>>> w = torch.tensor([[5., 3., 3., -5., 2., 4., -4., 2.]])
>>> enc = encode_weight(w)
>>> enc.repeat, enc.pair_index.tolist(), enc.pair_sign.tolist()
(2, [[3, 2, 1, 0, 7, 6, 5, 4]], [[-1, 1, 1, -1, 1, -1, -1, 1]])
>>> torch.equal(apply_encoding(w, enc), w)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vbxfx.errors import FormatError
from vbxfx.format.cost import check_repeat
from vbxfx.format.layout import check_weight, from_blocks, from_vectors, to_blocks, to_vectors
from vbxfx.format.structured import _pair_ok, _rows_ok, fits_blocks
from vbxfx.format.weights import explain_violation, weight_repeat

__all__ = ["PairEncoding", "encode_weight", "encode_unstructured", "apply_encoding",
           "pattern_coefficients", "structured_offsets", "offsets_to_pairs"]


@dataclass(frozen=True)
class PairEncoding:
    """Mask, pairing and repeat of one weight (see the module docstring).

    ``format`` is "comp" (structured, ``repeat`` 1, 2 or 4) or "ucomp" (unstructured, odd/even
    pairs per input-channel vector, ``repeat`` 0).
    """

    repeat: int
    mask: torch.Tensor
    pair_index: torch.Tensor
    pair_sign: torch.Tensor
    format: str = "comp"

    @property
    def num_pairs(self) -> int:
        return int((self.pair_index >= 0).sum()) // 2

    @property
    def paired_fraction(self) -> float:
        """Share of the nonzero weights that sit in a pair."""
        nz = int(self.mask.sum())
        return 2 * self.num_pairs / nz if nz else 0.0

    def to(self, device: torch.device | str) -> "PairEncoding":
        return PairEncoding(self.repeat, self.mask.to(device), self.pair_index.to(device),
                            self.pair_sign.to(device), self.format)


def _first_valid_split(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lowest split c (0..7) whose two rows fit, whether one does)`` per block, from
    ``[8 splits, n]`` bools.

    Elementwise only (a reduction over the 8 rows, argmax or any, is 50-500x slower on CPU
    here): the splits as bits of one int, its lowest set bit, that bit's position."""
    code = valid[0].to(torch.int32)
    for c in range(1, 8):
        code = code | (valid[c].to(torch.int32) << c)
    lowest = code & -code
    return torch.frexp(lowest.to(torch.float32)).exponent - 1, code != 0


def _partners(w: torch.Tensor, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partner row (0..7) of every element, whether the block fits)`` of ``[8, n]``
    blocks (the partner is the element itself when it has none).

    Repeat 2 takes the first split c = 4*t1 + 2*t2 + t3 that fits. Its pairs are (0, 2+t1),
    (1, 3-t1), (4+t2, 6+t3) and (5-t2, 7-t3), so, with x = t2 xor t3, rows 0..7 pair with
    2+t1, 3-t1, t1, 1-t1, 6+x, 7-x, 4+x, 5-x.
    """
    n = w.shape[1]
    if repeat == 4:
        return torch.arange(8).unsqueeze(1).expand(8, n).clone(), torch.ones(n, dtype=torch.bool)
    if repeat == 2:
        full, ok, opp = _pair_ok(w)
        split, fit = _first_valid_split(_rows_ok(full, ok, opp, "al", "ah")
                                        & _rows_ok(full, ok, opp, "bl", "bh"))
        t1, x = (split >> 2) & 1, ((split >> 1) ^ split) & 1
        return torch.stack([2 + t1, 3 - t1, t1, 1 - t1, 6 + x, 7 - x, 4 + x, 5 - x]).long(), fit
    # repeat 1: the partner of a nonzero is the nonzero of the other sub-pair of its half
    partner = torch.empty(8, n, dtype=torch.int64)
    nz = w != 0
    for k in range(8):
        other = (k // 4) * 4 + (2 if (k % 4) < 2 else 0)
        partner[k] = torch.where(nz[other], other, other + 1)
    return partner, fits_blocks(w, 1)


@torch.no_grad()
def structured_offsets(weight: torch.Tensor, repeat: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """``(mask, offset, opposite)`` of a weight that fits ``repeat`` exactly, in its shape.

    ``offset`` (int8) is how many input channels away the weight's partner sits (0: no
    partner; a partner is at most 3 channels away, in the same block), ``opposite`` (bool)
    whether the pair's signs differ. The compact form of :func:`encode_weight`'s result,
    computed without flat indices; a compressed layer derives everything it keeps from it.

    Raises:
        FormatError: the weight does not fit ``repeat``; the message locates the block.
    """
    check_repeat(repeat)
    w = to_blocks(weight.detach().cpu()).t().contiguous()
    partner, fit = _partners(w, repeat)
    if not bool(fit.all()):
        raise FormatError(f"cannot encode: {explain_violation(weight, repeat, quantize=False)}")
    rows = torch.arange(8).unsqueeze(1)
    other = w.gather(0, partner)
    paired = (w != 0) & (other != 0) & (partner != rows)
    offset = (partner - rows).mul_(paired).to(torch.int8)
    opposite = paired & ((w < 0) != (other < 0))
    shape, dev = weight.shape, weight.device
    return ((weight != 0).detach().clone(), from_blocks(offset.t(), shape).to(dev),
            from_blocks(opposite.t(), shape).to(dev))


def offsets_to_pairs(offset: torch.Tensor, opposite: torch.Tensor) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """``(pair_index int64, pair_sign int8)`` from channel offsets and sign relations."""
    shape = offset.shape
    stride = math.prod(shape[2:]) if len(shape) > 2 else 1
    paired = offset != 0
    pos = torch.arange(offset.numel(), device=offset.device).view(shape)
    index = torch.where(paired, pos + offset.to(torch.int64) * stride, -1)
    sign = (1 - 2 * opposite.to(torch.int8)) * paired.to(torch.int8)
    return index, sign


@torch.no_grad()
def encode_weight(weight: torch.Tensor, repeat: int | None = None) -> PairEncoding:
    """Mask, pair indices and signs of a weight that fits ``repeat`` exactly (float values).

    ``repeat=None`` takes the smallest repeat the exact values fit.

    Raises:
        FormatError: the weight does not fit ``repeat``; the message locates the block.
    """
    check_weight(weight)
    if repeat is None:
        repeat = weight_repeat(weight, quantize=False)
    mask, offset, opposite = structured_offsets(weight, repeat)
    index, sign = offsets_to_pairs(offset, opposite)
    return PairEncoding(repeat=repeat, mask=mask, pair_index=index, pair_sign=sign)


@torch.no_grad()
def encode_unstructured(weight: torch.Tensor) -> PairEncoding:
    """Mask and pairs of a weight in the unstructured format (exact float values).

    In every input-channel vector, nonzeros of equal magnitude at even and odd indices are
    paired (the k-th even with the k-th odd of each magnitude), which is a maximum pairing.
    """
    check_weight(weight)
    v = to_vectors(weight.detach()).float().cpu()
    flat = to_vectors(torch.arange(weight.numel()).reshape(weight.shape))
    index = torch.full(v.shape, -1, dtype=torch.int64)
    sign = torch.zeros(v.shape, dtype=torch.int8)
    rows, cols = (v != 0).nonzero(as_tuple=True)
    if rows.numel():
        _, mag_id = torch.unique(v[rows, cols].abs(), return_inverse=True)
        parity = cols % 2
        group = rows * (int(mag_id.max()) + 1) + mag_id
        order = torch.argsort(group * 2 * (v.shape[1] + 1) + parity * (v.shape[1] + 1) + cols)
        g, p, r, c = group[order], parity[order], rows[order], cols[order]
        run = g * 2 + p
        start = torch.ones_like(run, dtype=torch.bool)
        start[1:] = run[1:] != run[:-1]
        first = torch.cummax(torch.where(start, torch.arange(run.numel()), 0), 0).values
        rank = torch.arange(run.numel()) - first
        key = g * (v.shape[1] + 1) + rank
        ev, od = p == 0, p == 1
        ke, ko = key[ev], key[od]
        pos = torch.searchsorted(ke, ko).clamp_(max=max(ke.numel() - 1, 0))
        hit = (ke.numel() > 0) & (ke[pos] == ko) if ke.numel() else torch.zeros_like(ko, dtype=torch.bool)
        er, ec = r[ev][pos[hit]], c[ev][pos[hit]]
        orow, ocol = r[od][hit], c[od][hit]
        index[er, ec], index[orow, ocol] = flat[orow, ocol], flat[er, ec]
        same = (v[er, ec] < 0) == (v[orow, ocol] < 0)
        s = torch.where(same, 1, -1).to(torch.int8)
        sign[er, ec], sign[orow, ocol] = s, s
    dev = weight.device
    return PairEncoding(repeat=0, mask=(weight != 0).detach().clone(),
                        pair_index=from_vectors(index, weight.shape).to(dev),
                        pair_sign=from_vectors(sign, weight.shape).to(dev), format="ucomp")


def pattern_coefficients(enc: PairEncoding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b, idx)`` with ``apply_encoding(w) == a*w + b*w.flatten()[idx].view_as(w)``.

    Precompute these once per pattern; applying them is one gather and two multiplies.
    """
    paired = enc.pair_index >= 0
    mask = enc.mask.to(torch.float32)
    a = torch.where(paired, 0.5, 1.0) * mask
    b = torch.where(paired, 0.5 * enc.pair_sign.to(torch.float32), 0.0) * mask
    idx = torch.where(paired, enc.pair_index,
                      torch.arange(enc.mask.numel(), device=enc.mask.device).view(enc.mask.shape))
    return a, b, idx


def apply_encoding(weight: torch.Tensor, enc: PairEncoding) -> torch.Tensor:
    """Project ``weight`` onto the pattern of ``enc`` (differentiable, linear in weight)."""
    if tuple(weight.shape) != tuple(enc.mask.shape):
        raise FormatError(f"weight of shape {tuple(weight.shape)} does not match the encoding's "
                          f"shape {tuple(enc.mask.shape)}")
    a, b, idx = pattern_coefficients(enc)
    a, b, idx = a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype), idx.to(weight.device)
    return a * weight + b * weight.reshape(-1)[idx.reshape(-1)].view_as(weight)
