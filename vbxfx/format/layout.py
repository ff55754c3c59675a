"""Block layout of the structured format: weights to 8-channel blocks and back.

A Conv2d weight ``[O, I, kh, kw]`` is read in ``[O, kh, kw, I]`` order, a Linear weight
``[O, I]`` as it is. At every ``(o, ky, kx)`` the input channels are zero-padded to a
multiple of 8 and cut into blocks of 8 consecutive channels. :func:`to_blocks` returns
those blocks as one ``[N, 8]`` float32 tensor; :func:`from_blocks` inverts it.

>>> import torch
>>> w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
>>> to_blocks(w)
tensor([[0., 1., 2., 0., 0., 0., 0., 0.],
        [3., 4., 5., 0., 0., 0., 0., 0.]])
>>> torch.equal(from_blocks(to_blocks(w), w.shape), w)
True
"""

from __future__ import annotations

import math

import torch

from vbxfx.errors import FormatError
from vbxfx.format.cost import BLOCK, padded_channels

__all__ = ["check_weight", "to_vectors", "from_vectors", "to_blocks", "from_blocks",
           "block_position"]


def check_weight(weight: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """Validate a Conv2d ``[O,I,kh,kw]`` or Linear ``[O,I]`` weight; return it unchanged.

    Raises:
        FormatError: not a floating tensor, rank other than 2 or 4, empty, or NaN/Inf.
    """
    if not isinstance(weight, torch.Tensor):
        raise FormatError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 4):
        raise FormatError(
            f"{what} has shape {tuple(weight.shape)} (rank {weight.dim()}); accepted are "
            "rank 4 [out, in, kh, kw] (Conv2d) and rank 2 [out, in] (Linear)")
    if weight.numel() == 0:
        raise FormatError(f"{what} is empty (shape {tuple(weight.shape)}); nothing to compress")
    if not weight.is_floating_point():
        raise FormatError(f"{what} has dtype {weight.dtype}; a floating-point weight is expected")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise FormatError(f"{what} holds {bad} NaN/Inf value(s); only finite weights can be compressed")
    return weight


def to_vectors(weight: torch.Tensor) -> torch.Tensor:
    """``[O,I,kh,kw]`` -> ``[O*kh*kw, I]`` (input channels last), ``[O,I]`` -> ``[O, I]``."""
    if weight.dim() == 4:
        o, i, kh, kw = weight.shape
        return weight.permute(0, 2, 3, 1).reshape(o * kh * kw, i)
    return weight


def from_vectors(vectors: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_vectors` for a weight of ``shape``."""
    if len(shape) == 4:
        o, i, kh, kw = shape
        return vectors.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return vectors.reshape(shape).contiguous()


def to_blocks(weight: torch.Tensor, dtype: torch.dtype = torch.float32,
              pad_value: float = 0) -> torch.Tensor:
    """Weight -> ``[N, 8]`` blocks in hardware order, padded with ``pad_value`` (a new tensor)."""
    vec = to_vectors(weight).to(dtype)
    pad = padded_channels(vec.shape[1]) - vec.shape[1]
    if pad:
        vec = torch.nn.functional.pad(vec, (0, pad), value=pad_value)
    return vec.reshape(-1, BLOCK).contiguous()


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``[N, 8]`` blocks -> a weight of ``shape`` (padding dropped)."""
    i = shape[1]
    vec = blocks.reshape(-1, padded_channels(i))[:, :i]
    return from_vectors(vec, shape)


def block_position(shape: torch.Size | tuple[int, ...], block: int) -> dict[str, int]:
    """Where block number ``block`` of a weight of ``shape`` lies: out channel, ky, kx, block
    index along the input channels, and its first input channel."""
    per_vector = padded_channels(shape[1]) // BLOCK
    vector, b = divmod(int(block), per_vector)
    if len(shape) == 4:
        kh, kw = shape[2], shape[3]
        o, rest = divmod(vector, kh * kw)
        ky, kx = divmod(rest, kw)
    else:
        o, ky, kx = vector, 0, 0
    return {"out_channel": o, "ky": ky, "kx": kx, "block": b, "first_in_channel": b * BLOCK}
