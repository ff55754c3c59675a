"""Least squares inside a compressed layer's pattern, and for a dense layer.

A compressed layer's effective weight is ``P(w)``, an orthogonal projection onto its
pattern (masked weights zero, the two weights of a pair one signed magnitude). For a
:class:`~vbxfx.refit.rows.Problem` ``(h, g, tt, n)`` the refit solves

    min  tr(W̃ H W̃ᵀ) - 2 tr(W̃ Gᵀ) + λ ||W̃ - W̃₀||²        over W̃ = [W, b], W = P(W)

with ``H = h/n``, ``G = g/n`` and the Tikhonov term pulling toward the dense layer ``W̃₀``
(``λ = damp`` times the mean input energy). It is one symmetric positive definite system
per output channel in the pattern subspace, solved by preconditioned conjugate gradients
for all output channels at once; the bias is free.
"""

from __future__ import annotations

import math

import torch

from vbxfx.format import PairEncoding, pattern_coefficients
from vbxfx.refit.rows import Problem

__all__ = ["damped", "relative_error", "solve_in_pattern", "solve_dense", "pattern_projector",
           "cholesky_pd"]


def damped(p: Problem, damp: float) -> tuple[torch.Tensor, float]:
    """``(H + λI, λ)`` in float64, ``H = h/n``; ``λ = damp ·`` the mean input energy."""
    h = p.h / p.n
    diag = torch.diagonal(h, dim1=-2, dim2=-1)[..., :-1]
    lam = damp * float(diag.mean()) if diag.numel() else 0.0
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + lam * eye, lam


def cholesky_pd(h: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The Cholesky factor of the symmetric ``h``, with the smallest diagonal jitter (from
    1e-10 of its largest diagonal entry up) that makes it positive definite: a layer whose
    inputs are all zero on the calibration data, or ``damp=0`` with fewer rows than
    weights, has a singular ``h``."""
    chol, info = torch.linalg.cholesky_ex(h, upper=upper)
    scale = float(torch.diagonal(h, dim1=-2, dim2=-1).abs().max()) if h.numel() else 1.0
    jitter = 1e-10 * (scale if scale > 0 else 1.0)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    while bool((info != 0).any()):
        if jitter > scale * 1e3 + 1.0:
            raise torch.linalg.LinAlgError("refit: input second moments are not finite")
        chol, info = torch.linalg.cholesky_ex(h + jitter * eye, upper=upper)
        jitter *= 100
    return chol


def relative_error(m: torch.Tensor, p: Problem) -> float:
    """``E||W̃ x̃ - t||² / E||t||²`` for the weight-and-bias matrix ``m`` (float64)."""
    m = m.to(torch.float64)
    h, g = p.h / p.n, p.g / p.n
    if p.channels:
        quad = torch.einsum("ck,ckl,cl->", m, h, m)
    else:
        quad = ((m @ h) * m).sum()
    err = float(quad - 2 * (m * g).sum()) + p.tt / p.n
    return max(err, 0.0) / max(p.tt / p.n, 1e-300)


def pattern_projector(enc: PairEncoding, device: torch.device):
    """The projection onto ``enc``'s pattern, on ``[O, K+1]`` weight-and-bias rows (the
    bias column free)."""
    a, b, idx = pattern_coefficients(enc)
    o = a.shape[0]
    a = a.to(device, torch.float32).reshape(o, -1)
    b = b.to(device, torch.float32).reshape(o, -1)
    idx = idx.to(device, torch.int64).reshape(-1)

    def proj(m: torch.Tensor) -> torch.Tensor:
        w = m[:, :-1]
        pw = a * w + b * w.reshape(-1).index_select(0, idx).view_as(w)
        return torch.cat([pw, m[:, -1:]], 1)

    return proj


@torch.no_grad()
def solve_in_pattern(enc: PairEncoding, p: Problem, prior: torch.Tensor,
                     start: torch.Tensor, iters: int, damp: float) -> torch.Tensor:
    """The refit ``[O, K+1]`` (float64, exactly in ``enc``'s pattern) from ``start``.

    ``prior`` is the dense ``[W, b]`` the damping pulls toward.
    """
    dev = p.h.device
    h64, lam = damped(p, damp)
    h = h64.float()
    rhs = (p.g / p.n + lam * prior.to(dev, torch.float64)).float()
    proj = pattern_projector(enc, dev)
    inv_diag = 1.0 / torch.diagonal(h).clamp_min(1e-30)
    x = proj(start.to(dev, torch.float32))
    r = proj(rhs - x @ h)
    z = proj(r * inv_diag)
    d = z
    rz = (r * z).sum(1)
    rz0 = float(rz.abs().max())
    for _ in range(iters):
        if rz0 == 0.0:
            break
        ad = proj(d @ h)
        dad = (d * ad).sum(1)
        alpha = torch.where(dad > 0, rz / dad.clamp_min(1e-30), torch.zeros_like(dad))
        x = x + alpha[:, None] * d
        r = r - alpha[:, None] * ad
        z = proj(r * inv_diag)
        rz_new = (r * z).sum(1)
        if float(rz_new.abs().max()) <= 1e-8 * rz0:
            break
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        d = z + beta[:, None] * d
        rz = rz_new
    return proj(x).double()


@torch.no_grad()
def solve_dense(p: Problem, prior: torch.Tensor, damp: float) -> torch.Tensor:
    """The unconstrained damped least-squares ``[W, b]`` (float64), per channel for a
    per-channel problem: ``(G + λ W̃₀)(H + λI)⁻¹``."""
    h, lam = damped(p, damp)
    rhs = p.g / p.n + lam * prior.to(h.device, torch.float64)
    try:
        chol = torch.linalg.cholesky(h)
        return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1) if p.channels \
            else torch.cholesky_solve(rhs.T, chol).T
    except RuntimeError:                                  # singular without damping
        sol = torch.linalg.lstsq(h, rhs.unsqueeze(-1) if p.channels else rhs.T).solution
        return sol.squeeze(-1) if p.channels else sol.T


def finite(m: torch.Tensor) -> bool:
    return bool(torch.isfinite(m).all()) and math.isfinite(float(m.abs().max()))
