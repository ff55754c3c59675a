"""Symmetric per-output-channel int8 quantization, as the VectorBlox toolchain applies it.

Zero point 0, one scale per output channel ``max|w| / 127``, round half to even (which is
symmetric: ``round(-x) == -round(x)``), clamp to [-127, 127]. Equal magnitudes in one
output channel therefore map to equal integers and zero maps to zero.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_int8", "dequantize_int8"]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(q, scale)``: int8 ``q`` of the weight's shape and float32 ``scale`` of shape
    ``[O]`` with ``weight ≈ q * scale`` per output channel (dim 0).

    >>> q, s = quantize_int8(torch.tensor([[0.5, -0.25, 0.0], [2.0, 1.0, -1.0]]))
    >>> q
    tensor([[ 127,  -64,    0],
            [ 127,   64,  -64]], dtype=torch.int8)
    """
    w = weight.detach().to(torch.float32)
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / safe.view(view)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    view = (-1,) + (1,) * (q.dim() - 1)
    return q.to(torch.float32) * scale.view(view)
