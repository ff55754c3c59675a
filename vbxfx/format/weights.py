"""Whole-weight entry points of the structured format: project, check, explain.

>>> import torch
>>> w = torch.tensor([[0.5, -0.4, 0.1, 0.35, 0.3, 0.0, -0.2, -0.3]])
>>> project_weight(w, 2)
tensor([[ 0.5000, -0.3750,  0.0000,  0.3750,  0.3000,  0.0000, -0.2000, -0.3000]])
>>> weight_repeat(project_weight(w, 2))
2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vbxfx.errors import FormatError
from vbxfx.format.cost import check_repeat
from vbxfx.format.layout import block_position, check_weight, from_blocks, to_blocks
from vbxfx.format.quant import quantize_int8
from vbxfx.format.structured import explain_block, fits_blocks, project_blocks

__all__ = ["project_weight", "weight_repeat", "fits", "explain_violation", "Violation",
           "projection_error"]


def _blocks_t(weight: torch.Tensor) -> torch.Tensor:
    """Weight -> ``[8, n]`` float32 (one column per block)."""
    return to_blocks(weight).t().contiguous()


def _importance_blocks(importance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-input-channel ``[I]`` or full-shape importance -> ``[8, n]`` blocks (validated)."""
    if not isinstance(importance, torch.Tensor):
        raise FormatError(f"importance must be a torch.Tensor, got {type(importance).__name__}")
    h = importance.detach().to(torch.float32, copy=True).to(weight.device)
    i = weight.shape[1]
    if h.dim() == 1 and h.numel() == i:
        h = h.view((1, i) + (1,) * (weight.dim() - 2)).expand(weight.shape)
    elif tuple(h.shape) != tuple(weight.shape):
        raise FormatError(f"importance of shape {tuple(importance.shape)} fits neither the "
                          f"{i} input channels nor the weight shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise FormatError("importance must be finite and non-negative")
    top = float(h.max())
    if top <= 0:
        return None
    # a zero importance (a dead channel) would make every value equally good: keep it tiny
    h = h.clamp(min=top * 1e-6)
    return to_blocks(h, pad_value=1.0).t().contiguous()


@torch.no_grad()
def project_weight(weight: torch.Tensor, repeat: int, pairing: bool = True,
                   importance: torch.Tensor | None = None) -> torch.Tensor:
    """The least-squares-nearest weight that fits ``repeat`` (1 or 2; 4 returns a copy).

    Exact per block: every split into rows, every sign relation, pair-or-drop for every
    pair. ``pairing=False`` gives plain magnitude N:4 pruning along the input channels
    (keep 2 of 4 at repeat 2, 1 of 4 at repeat 1). The result has the input's shape, dtype
    and device; computation is in float32.

    ``importance`` makes the objective ``sum(h * (w - w')**2)``: give the mean squared input
    activation per input channel (shape ``[I]``, a diagonal of the layer's Hessian, measured
    on calibration data) and the projection minimises the layer's output error instead of
    its weight error; pairs then share the importance-weighted mean magnitude. Without it
    every weight counts the same.

    Raises:
        FormatError: bad rank, empty, non-finite weight, repeat not in (1, 2, 4), or an
            importance of the wrong shape or with negative/non-finite values.
    """
    check_weight(weight)
    check_repeat(repeat)
    h = None if importance is None else _importance_blocks(importance, weight)
    projected = project_blocks(_blocks_t(weight), repeat, pairing=pairing, importance=h)
    # ``+ 0.0`` turns the -0.0 that masking can leave into +0.0
    return from_blocks(projected.t(), weight.shape).add_(0.0).to(weight.dtype)


def projection_error(weight: torch.Tensor, repeat: int, pairing: bool = True,
                     relative: bool = True, importance: torch.Tensor | None = None) -> float:
    """Squared error of :func:`project_weight` (relative to ``||w||²`` by default),
    importance-weighted when ``importance`` is given."""
    w = weight.detach().to(torch.float32)
    diff2 = (w - project_weight(w, repeat, pairing, importance).float()).square()
    w2 = w.square()
    if importance is not None:
        h = importance.detach().float().to(w.device)
        h = h.view((1, -1) + (1,) * (w.dim() - 2)) if h.dim() == 1 else h
        diff2, w2 = diff2 * h, w2 * h
    err = float(diff2.sum())
    if not relative:
        return err
    norm = float(w2.sum())
    return err / norm if norm > 0 else 0.0


def _values(weight: torch.Tensor, quantize: bool) -> torch.Tensor:
    check_weight(weight)
    if quantize:
        q, _ = quantize_int8(weight)
        return q.to(torch.float32)
    return weight.detach().to(torch.float32)


@torch.no_grad()
def fits(weight: torch.Tensor, repeat: int, quantize: bool = True) -> bool:
    """Whether every block of the weight fits ``repeat`` (after int8 quantization by default)."""
    check_repeat(repeat)
    return bool(fits_blocks(_blocks_t(_values(weight, quantize)), repeat).all())


@torch.no_grad()
def weight_repeat(weight: torch.Tensor, quantize: bool = True) -> int:
    """The smallest repeat (1, 2 or 4) that every block fits: what the compiler will pick.

    By default the weight is first quantized to int8 per output channel, as the toolchain
    does; ``quantize=False`` checks the exact float values.
    """
    blocks = _blocks_t(_values(weight, quantize))
    for repeat in (1, 2):
        if bool(fits_blocks(blocks, repeat).all()):
            return repeat
    return 4


@dataclass(frozen=True)
class Violation:
    """The first block of a weight that breaks a repeat, and the rule it breaks."""

    repeat: int
    out_channel: int
    ky: int
    kx: int
    block: int
    first_in_channel: int
    values: tuple[float, ...]
    rule: str

    def __str__(self) -> str:
        vals = ", ".join(f"{v:g}" for v in self.values)
        return (f"out channel {self.out_channel}, ky {self.ky}, kx {self.kx}, block {self.block} "
                f"(in channels {self.first_in_channel}..{self.first_in_channel + 7}) "
                f"= [{vals}] does not fit repeat {self.repeat}: {self.rule}")


@torch.no_grad()
def explain_violation(weight: torch.Tensor, repeat: int, quantize: bool = True) -> Violation | None:
    """The first block that does not fit ``repeat``, located and explained; None if all fit."""
    check_repeat(repeat)
    values = _values(weight, quantize)
    blocks = _blocks_t(values)
    bad = (~fits_blocks(blocks, repeat)).nonzero()
    if bad.numel() == 0:
        return None
    n = int(bad[0, 0])
    block = blocks[:, n].tolist()
    rule = explain_block(block, repeat) or "does not fit"
    return Violation(repeat=repeat, values=tuple(block), rule=rule,
                     **block_position(tuple(weight.shape), n))


def require_fit(weight: torch.Tensor, repeat: int, what: str = "weight",
                quantize: bool = True) -> None:
    """Raise FormatError with the first violation when ``weight`` does not fit ``repeat``."""
    v = explain_violation(weight, repeat, quantize=quantize)
    if v is not None:
        raise FormatError(f"{what}: {v}")
