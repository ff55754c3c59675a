"""The unstructured ("ucomp") format: any zero pattern, odd/even pairs share a multiplier.

Per ``(o, ky, kx)`` the vector over input channels may hold any zeros; a nonzero at an odd
input-channel index may share one multiplier with a nonzero at an even index of the same
vector when their magnitudes are equal. Multipliers = nonzeros - pairs.

:func:`project_unstructured` meets a multiply budget. Each vector's even and odd weights
are matched by magnitude rank (largest even with largest odd, ...). A matched pair with
magnitudes ``a >= b`` offers two units of one multiply each: the first is worth
``max(a², (a+b)²/2)`` (keep ``a``, or keep both at their common magnitude), the second the
rest of ``a² + b²``; unmatched weights offer one unit ``a²``. The best units across the
layer are bought. The first unit is never worth less than the second, so this greedy is
optimal for the matching, and since it can always do what magnitude pruning does, its
error never exceeds plain unstructured magnitude pruning at the same budget.
"""

from __future__ import annotations

import math

import torch

from vbxfx.errors import FormatError
from vbxfx.format.layout import check_weight, from_vectors, to_vectors
from vbxfx.format.quant import quantize_int8

__all__ = ["unstructured_macs", "project_unstructured", "budget_from_compression"]


def budget_from_compression(weight_shape: tuple[int, ...], compression: float) -> int:
    """Multiplies left (per output position) when ``compression`` of them are removed."""
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
            or not math.isfinite(compression) or not 0.0 <= compression <= 1.0:
        raise FormatError(f"compression must be a fraction of multiplies removed in [0, 1], "
                          f"got {compression!r}")
    dense = math.prod(weight_shape)
    return int(round((1.0 - float(compression)) * dense))


@torch.no_grad()
def unstructured_macs(weight: torch.Tensor, quantize: bool = True) -> int:
    """Multiplies of one application of the weight (one output position) in ucomp:
    nonzeros minus the largest number of equal-magnitude odd/even pairs per vector.
    By default counted on the int8-quantized weight, as the toolchain sees it."""
    check_weight(weight)
    values = quantize_int8(weight)[0].to(torch.float32) if quantize else weight.detach().float()
    v = to_vectors(values).cpu()
    nz = v != 0
    nnz = int(nz.sum())
    if nnz == 0:
        return 0
    rows, cols = nz.nonzero(as_tuple=True)
    mags = v[rows, cols].abs()
    _, mag_id = torch.unique(mags, return_inverse=True)
    key = (rows * (int(mag_id.max()) + 1) + mag_id) * 2 + (cols % 2)
    uniq, counts = torch.unique(key, return_counts=True)
    base, parity = uniq // 2, uniq % 2
    _, group = torch.unique(base, return_inverse=True)
    even = torch.zeros(int(group.max()) + 1, dtype=torch.int64)
    odd = torch.zeros_like(even)
    even.index_add_(0, group[parity == 0], counts[parity == 0])
    odd.index_add_(0, group[parity == 1], counts[parity == 1])
    return nnz - int(torch.minimum(even, odd).sum())


def _keep_top(gains: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool mask of the ``budget`` largest entries of a 1-D tensor."""
    keep = torch.zeros_like(gains, dtype=torch.bool)
    if budget >= gains.numel():
        keep[:] = True
    elif budget > 0:
        keep[torch.topk(gains, budget, sorted=False).indices] = True
    return keep


@torch.no_grad()
def project_unstructured(weight: torch.Tensor, compression: float,
                         pairing: bool = True) -> torch.Tensor:
    """The weight with ``compression`` of its multiplies removed (ucomp format).

    ``pairing=False`` is plain unstructured magnitude pruning. Returns the input's shape,
    dtype and device; multiplies of the result (see :func:`unstructured_macs`) never
    exceed the budget ``round((1 - compression) * weight.numel())``.

    Raises:
        FormatError: bad weight, or compression outside [0, 1].
    """
    check_weight(weight)
    budget = budget_from_compression(tuple(weight.shape), compression)
    v = to_vectors(weight.detach()).to(torch.float32)
    if not pairing:
        out = v * _keep_top(v.abs().flatten(), budget).view_as(v)
        return from_vectors(out, weight.shape).add_(0.0).to(weight.dtype)

    even, odd = v[:, 0::2], v[:, 1::2]
    k = odd.shape[1]                                   # matched pairs per vector
    ae, ie = even.abs().sort(dim=1, descending=True)
    ao, io = odd.abs().sort(dim=1, descending=True)
    big = torch.maximum(ae[:, :k], ao)
    small = torch.minimum(ae[:, :k], ao)
    keep_one = big.square()
    share = (big + small).square().mul_(0.5)
    first = torch.maximum(keep_one, share)
    second = (keep_one + small.square()).sub_(first).clamp_(min=0)
    singles = ae[:, k:].square()                       # the extra even channel when I is odd
    gains = torch.cat([first.flatten(), second.flatten(), singles.flatten()])
    chosen = _keep_top(gains, budget)
    n = first.numel()
    c1, c2 = chosen[:n].view_as(first), chosen[n:2 * n].view_as(first)
    c_single = chosen[2 * n:].view_as(singles)
    both = c2                                          # second unit implies the first
    one = c1 & ~c2
    averaged = one & (share > keep_one)
    mag_even = torch.where(both, ae[:, :k], torch.where(
        averaged, (big + small) * 0.5, torch.where(one & (ae[:, :k] >= ao), ae[:, :k], 0.0)))
    mag_odd = torch.where(both, ao, torch.where(
        averaged, (big + small) * 0.5, torch.where(one & (ao > ae[:, :k]), ao, 0.0)))
    out = torch.zeros_like(v)
    out_even, out_odd = torch.zeros_like(even), torch.zeros_like(odd)
    out_even.scatter_(1, ie[:, :k], mag_even)
    out_even.scatter_(1, ie[:, k:], torch.where(c_single, ae[:, k:], 0.0))
    out_odd.scatter_(1, io, mag_odd)
    out[:, 0::2] = out_even.copysign_(even)
    out[:, 1::2] = out_odd.copysign_(odd)
    return from_vectors(out, weight.shape).add_(0.0).to(weight.dtype)
