"""A layer's least-squares problem from calibration activations: sampled input rows.

For a layer ``y = W x + b`` (a convolution is this at every output position, ``x`` the
patch under the kernel), :class:`Problem` accumulates, over sampled rows,

* ``h = Σ x̃ x̃ᵀ`` with ``x̃ = [x, 1]`` (the inputs the layer will see),
* ``g = Σ t x̃ᵀ`` with ``t`` the output the layer should give there (the dense model's),
* ``tt = Σ ||t||²`` and the row count ``n``,

so that ``E||W̃ x̃ - t||² = (tr(W̃ h W̃ᵀ) - 2 tr(W̃ gᵀ) + tt) / n`` for ``W̃ = [W, b]``.
Rows are sampled at the same output positions for the input and the target, so ``x`` and
``t`` may come from two different models (the compressed one's input, the dense one's
output): that is the sequential refit.

Convolution patches are gathered at the sampled positions only (never a whole
``F.unfold``), in the weight's flattening order ``(in_channel, ky, kx)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Problem", "sample_positions", "input_rows", "output_rows", "is_depthwise"]


class Problem:
    """Running sums of one layer's least-squares problem (float64, see the module doc).

    ``channels`` > 0 makes it a per-channel problem (depthwise convolution): ``h`` is
    ``[C, k+1, k+1]`` and ``g`` ``[C, k+1]``, one independent problem per channel.
    """

    def __init__(self, k: int, out: int, device: torch.device, channels: int = 0):
        lead = (channels,) if channels else ()
        self.channels = channels
        self.h = torch.zeros(*lead, k + 1, k + 1, dtype=torch.float64, device=device)
        self.g = torch.zeros(*((channels,) if channels else (out,)), k + 1, dtype=torch.float64,
                             device=device)
        self.tt = 0.0
        self.tc = torch.zeros(self.g.shape[0], dtype=torch.float64, device=device)  # Σ t² per out
        self.n = 0

    def add(self, x: torch.Tensor, t: torch.Tensor | None, weight: float = 1.0) -> None:
        """Rows ``x [M, k]`` and their targets ``t [M, out]``, or per channel ``x [C, M, k]``
        and ``t [M, C]``; ``t=None`` adds the inputs only (then ``g`` must be set otherwise).
        ``weight`` scales the rows' share (their count is scaled too)."""
        x = x.float()
        k = x.shape[-1]
        m = x.shape[-2]
        if self.channels:                                              # x [C, M, k]
            self.h[:, :k, :k] += weight * torch.bmm(x.transpose(1, 2), x).double()
            s = weight * x.sum(1).double()                             # [C, k]
            self.h[:, :k, k] += s
            self.h[:, k, :k] += s
            self.h[:, k, k] += weight * m
            if t is not None:
                tc = t.float().T.contiguous()                          # [C, M]
                self.g[:, :k] += weight * torch.bmm(tc.unsqueeze(1), x).squeeze(1).double()
                self.g[:, k] += weight * tc.sum(1).double()
        else:
            self.h[:k, :k] += weight * (x.T @ x).double()
            s = weight * x.sum(0).double()
            self.h[:k, k] += s
            self.h[k, :k] += s
            self.h[k, k] += weight * m
            if t is not None:
                t = t.float()
                self.g[:, :k] += weight * (t.T @ x).double()
                self.g[:, k] += weight * t.sum(0).double()
        if t is not None:
            sq = t.double().square()
            self.tt += weight * float(sq.sum())
            self.tc += weight * sq.sum(0)
        self.n += m * weight


def is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 \
        and layer.groups == layer.in_channels == layer.out_channels


def sample_positions(layer: nn.Module, out_shape: torch.Size, max_rows: int,
                     gen: torch.Generator) -> torch.Tensor:
    """What to sample of an output of shape ``out_shape``, about ``max_rows`` rows, drawn
    without replacement: for a convolution, whole output lines ``b * Ho + oy`` (each gives
    ``Wo`` rows, and reads memory contiguously); for a Linear, flat leading indices."""
    if isinstance(layer, nn.Conv2d):
        b, _, ho, wo = out_shape
        total, want = b * ho, -(-max_rows // wo)
    else:
        total, want = out_shape[:-1].numel(), max_rows
    if total <= want:
        return torch.arange(total)
    return torch.randperm(total, generator=gen)[:want].sort().values


def output_rows(layer: nn.Module, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The layer's outputs at the sampled ``pos``: ``[M, out]``."""
    pos = pos.to(y.device)
    if isinstance(layer, nn.Conv2d):
        ho = y.shape[2]
        lines = y[pos // ho, :, pos % ho, :]                              # [L, O, Wo]
        return lines.transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1]).index_select(0, pos)


def input_rows(layer: nn.Module, x: torch.Tensor, out_hw: tuple[int, int],
               pos: torch.Tensor) -> torch.Tensor:
    """The inputs under the kernel at the sampled output ``pos``: ``[M, I*kh*kw]`` (weight
    order), or ``[C, M, kh*kw]`` for a depthwise convolution; rows in the order of
    :func:`output_rows`. Zero padding is applied to the sampled lines only."""
    pos = pos.to(x.device)
    if not isinstance(layer, nn.Conv2d):
        return x.reshape(-1, x.shape[-1]).index_select(0, pos)
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    dh, dw = layer.dilation
    ph, pw = layer.padding
    ho, wo = out_hw
    h = x.shape[2]
    b, oy = pos // ho, pos % ho
    taps = []
    for ky in range(kh):
        iy = oy * sh + ky * dh - ph
        inside = (iy >= 0) & (iy < h)
        lines = x[b, :, iy.clamp(0, h - 1), :].transpose(1, 2)            # [L, W, I]
        if not bool(inside.all()):
            lines = lines * inside.view(-1, 1, 1).to(lines.dtype)
        if pw:
            lines = F.pad(lines, (0, 0, pw, pw))
        for kx in range(kw):
            taps.append(lines[:, kx * dw: kx * dw + sw * (wo - 1) + 1: sw])  # [L, Wo, I]
    if is_depthwise(layer):                                               # [C, M, T]
        rows = torch.stack(taps, 0)                                       # [T, L, Wo, C]
        return rows.permute(3, 1, 2, 0).reshape(rows.shape[-1], -1, kh * kw).contiguous()
    if len(taps) == 1:
        rows = taps[0].reshape(-1, taps[0].shape[-1], 1)                  # [M, I, 1]
    else:
        rows = torch.stack(taps, -1).reshape(-1, taps[0].shape[-1], kh * kw)  # [M, I, T]
    return rows.reshape(rows.shape[0], -1)                                # [M, I*T]
