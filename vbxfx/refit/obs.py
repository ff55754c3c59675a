"""Data-aware pattern choice: OBS / SparseGPT-style sequential pruning inside the format.

The projection picks a layer's pattern from the weights alone. With the layer's input
second moments ``H`` (a :class:`~vbxfx.refit.rows.Problem`) the pattern can be chosen for
the *output* error instead: blocks of 8 input channels are visited in the format's order
(``[kh, kw, I]``); at each block

1. every output channel's block is projected onto the format (the exact kernel, pairing
   included), weighting each input channel by the diagonal of the block's compensated
   Hessian ``M = ((H⁻¹)_FF)⁻¹`` (the cost of moving that weight when all later weights
   move optimally to absorb it: Optimal Brain Surgeon);
2. the error this makes is compensated exactly on the weights not yet visited:
   ``W_R += (ΔW_F U_FF⁻¹) U_FR`` with ``U`` the upper Cholesky factor of ``H⁻¹``
   (SparseGPT's update, for a group of 8 columns at once).

The bias comes last and is never pruned, so it takes its share of every compensation.
The result fits the layer's repeat exactly; a least-squares refit inside the new pattern
(:func:`vbxfx.refit.solve.solve_in_pattern`) then settles the kept values.
"""

from __future__ import annotations

import torch

from vbxfx.format.cost import BLOCK
from vbxfx.format.structured import project_blocks
from vbxfx.refit.solve import cholesky_pd

__all__ = ["obs_project", "block_order"]


def block_order(shape: torch.Size) -> torch.Tensor:
    """Flat weight indices (within one output channel, ``(i, ky, kx)`` order) in the format's
    reading order ``(ky, kx, i)``."""
    if len(shape) == 2:
        return torch.arange(shape[1])
    _, i, kh, kw = shape
    idx = torch.arange(i * kh * kw).view(i, kh, kw)
    return idx.permute(1, 2, 0).reshape(-1)


@torch.no_grad()
def obs_project(w: torch.Tensor, h: torch.Tensor, shape: torch.Size, repeat: int,
                pairing: bool = True) -> torch.Tensor:
    """Sequentially pruned ``[O, K+1]`` weight-and-bias rows (float64) whose weights fit
    ``repeat``.

    Args:
        w: ``[O, K+1]`` the starting weights and bias (the unconstrained least-squares
            solution, or the dense layer).
        h: ``[K+1, K+1]`` the damped input second moments (positive definite).
        shape: the layer's weight shape (``[O, I, kh, kw]`` or ``[O, I]``).
        repeat, pairing: the layer's format.
    """
    o = w.shape[0]
    k = w.shape[1] - 1
    order = torch.cat([block_order(shape), torch.tensor([k])]).to(h.device)
    hp = h.index_select(0, order).index_select(1, order).double()
    hinv = torch.cholesky_inverse(cholesky_pd(hp))
    u = cholesky_pd(hinv, upper=True)
    wp = w.to(torch.float64).index_select(1, order).clone()
    i = shape[1]
    per = (i + BLOCK - 1) // BLOCK
    vectors = k // i                                     # kernel positions
    for v in range(vectors):
        for blk in range(per):
            lo = v * i + blk * BLOCK
            hi = min(lo + BLOCK, v * i + i)
            width = hi - lo
            uff = u[lo:hi, lo:hi]
            uinv = torch.linalg.solve_triangular(uff, torch.eye(width, dtype=uff.dtype,
                                                                device=uff.device), upper=True)
            importance = (uinv * uinv).sum(1)                        # diag(U⁻¹U⁻ᵀ) = diag(M)
            cols = wp[:, lo:hi]
            blocks = torch.zeros(BLOCK, o, dtype=torch.float32, device=w.device)
            blocks[:width] = cols.T.float()
            imp = torch.ones(BLOCK, o, dtype=torch.float32, device=w.device)
            imp[:width] = (importance / importance.max()).float()[:, None].clamp_min(1e-6)
            new = project_blocks(blocks, repeat, pairing=pairing, importance=imp)[:width].T
            delta = new.double() - cols
            wp[:, lo:hi] = new.double()
            if hi < k + 1:
                wp[:, hi:] += (delta @ uinv) @ u[lo:hi, hi:]
    out = torch.empty_like(wp)
    out[:, order] = wp
    return out
