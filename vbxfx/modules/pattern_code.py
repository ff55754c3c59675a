"""The compact form in which a compressed layer saves its pattern: one small code per weight.

A pattern is a mask, a partner per paired weight and the pair's sign relation
(:class:`~vbxfx.format.PairEncoding`). Partners always sit in the same input-channel vector
(same output channel and kernel position), so a partner is an *offset along the input-channel
axis*. Each weight gets one integer:

====================  =============================================================
``0``                 pruned
``1``                 kept, unpaired
``sign(d)·(2|d|+s)``  kept and paired with the weight ``d`` input channels away
                      (``d != 0``); ``s`` is 1 when the pair has opposite signs
====================  =============================================================

In the structured format a partner is at most 3 channels away (the other sub-pair of the
same half-block), so every code lies in -7..7 and two of them share one byte (low nibble:
even flat index). In the unstructured format a partner can be anywhere in the vector; the
codes are stored one per weight as int8, int16 or int32, whichever holds ``2·(I-1)+1``.
The layout depends only on the format and the weight's shape, so a saved ``vbx_pattern``
buffer always has the shape the loading layer expects.

Half a byte per weight keeps a checkpoint that ultralytics saves in float16 (2 bytes per
weight) within 1.25x of the dense one; the mask, int64 pair indices and signs it replaces
took 10 bytes per weight.

>>> import torch
>>> from vbxfx.format import encode_weight
>>> enc = encode_weight(torch.tensor([[5., 3., 3., -5., 2., 4., -4., 2.]]), 2)
>>> code = pack_pattern(enc.mask, enc.pair_index, enc.pair_sign, "comp")
>>> code.dtype, tuple(code.shape)
(torch.uint8, (4,))
>>> mask, index, sign = unpack_pattern(code, (1, 8), "comp")
>>> torch.equal(index, enc.pair_index) and torch.equal(sign, enc.pair_sign)
True
"""

from __future__ import annotations

import math

import torch

from vbxfx.errors import FormatError

__all__ = ["pack_pattern", "pack_offsets", "pattern_offsets", "unpack_pattern", "code_layout"]

_NIBBLE_REACH = 3   # structured format: a partner is at most 3 input channels away


def _channel_stride(shape: tuple[int, ...]) -> int:
    """Flat-index distance between neighbouring input channels ([O, I, kh, kw] / [O, I])."""
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def code_layout(shape: tuple[int, ...], fmt: str) -> tuple[torch.dtype, int]:
    """``(dtype, length)`` of the flat code buffer of a weight of ``shape`` in ``fmt``."""
    n = math.prod(shape)
    if fmt == "comp":
        return torch.uint8, (n + 1) // 2
    reach = 2 * max(int(shape[1]) - 1, 0) + 1
    dtype = torch.int8 if reach <= 127 else torch.int16 if reach <= 32767 else torch.int32
    return dtype, n


def pack_pattern(mask: torch.Tensor, pair_index: torch.Tensor, pair_sign: torch.Tensor,
                 fmt: str) -> torch.Tensor:
    """The flat code buffer of a pattern (see the module docstring), on the mask's device.

    Raises:
        FormatError: a pair that leaves its input-channel vector, a paired weight that is
            masked out, or (structured format) a partner more than 3 channels away.
    """
    kept, offset, opposite = pattern_offsets(mask, pair_index, pair_sign)
    return pack_offsets(kept, offset, opposite, fmt)


def pattern_offsets(mask: torch.Tensor, pair_index: torch.Tensor,
                    pair_sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, offset, opposite)``, the compact form of a pattern, from flat pair indices:
    ``offset`` input channels to each weight's partner (0: none), ``opposite`` where the
    pair's signs differ. All three have the mask's shape.

    Raises:
        FormatError: a pair that leaves its input-channel vector or a paired weight that is
            masked out.
    """
    shape = tuple(mask.shape)
    n = mask.numel()
    stride = _channel_stride(shape)
    per_vector = stride * shape[1]
    index = pair_index.reshape(-1).to(torch.int64)
    kept = mask.reshape(-1).to(torch.bool)
    paired = index >= 0
    pos = torch.arange(n, device=index.device)
    delta = torch.where(paired, index - pos, torch.zeros_like(index))
    bad = paired & ((delta % stride != 0) | (index // per_vector != pos // per_vector)
                    | (delta == 0) | ~kept)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise FormatError(f"weight {first} is paired with weight {int(index[first])}, which is not "
                          "another kept weight of its input-channel vector")
    return (kept.view(shape), (delta // stride).view(shape),
            (paired & (pair_sign.reshape(-1) < 0)).view(shape))


def pack_offsets(mask: torch.Tensor, offset: torch.Tensor, opposite: torch.Tensor,
                 fmt: str) -> torch.Tensor:
    """The code buffer from a pattern's compact form (see
    :func:`vbxfx.format.encoding.structured_offsets`): ``offset`` input channels to each
    weight's partner (0: none) and whether the pair's signs differ. No consistency checks
    beyond the reach of an offset: give it what an encoder produced (:func:`pack_pattern`
    validates arbitrary pair indices first).

    Raises:
        FormatError: (structured format) a partner more than 3 channels away.
    """
    shape = tuple(mask.shape)
    offset = offset.reshape(-1)
    dtype, _ = code_layout(shape, fmt)
    if fmt == "comp" and offset.numel():
        reach = int(offset.abs().max())
        if reach > _NIBBLE_REACH:
            raise FormatError(f"a structured-format partner lies {reach} channels away; the "
                              f"format keeps partners within {_NIBBLE_REACH}")
    small = torch.int8 if fmt == "comp" else torch.int64
    offset = offset.to(small)
    code = torch.where(offset != 0,
                       torch.sign(offset) * (2 * offset.abs() + opposite.reshape(-1).to(small)),
                       mask.reshape(-1).to(small))
    if fmt != "comp":
        return code.to(dtype)
    nibbles = (code & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(dtype)


def _code_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kept, offset, sign)`` of each 4-bit structured code 0..15 (two's complement)."""
    values = torch.arange(16)
    values = torch.where(values > 7, values - 16, values)
    magnitude = values.abs()
    paired = magnitude >= 2
    offset = torch.where(paired, torch.sign(values) * (magnitude // 2), 0)
    sign = torch.where(paired, 1 - 2 * (magnitude % 2), 0)
    return values != 0, offset, sign


_TABLES = _code_tables()


def unpack_pattern(code: torch.Tensor, shape: tuple[int, ...],
                   fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask bool, pair_index int64, pair_sign int8)`` of ``shape`` from a code buffer.

    Raises:
        FormatError: a buffer of the wrong dtype or length, or a code pointing outside its
            input-channel vector.
    """
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    dtype, length = code_layout(shape, fmt)
    if code.dtype != dtype or code.numel() != length:
        raise FormatError(f"pattern code of dtype {code.dtype} and length {code.numel()} does not "
                          f"fit a {fmt!r} weight of shape {shape} ({dtype}, length {length})")
    flat = code.reshape(-1)
    dev = flat.device
    if fmt == "comp":        # two 4-bit codes a byte: look each one up
        nibbles = torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)[:n].to(torch.int64)
        kept, offsets, signs = (t.to(dev) for t in _TABLES)
        mask, offset, sign = kept[nibbles], offsets[nibbles], signs[nibbles]
    else:
        values = flat.to(torch.int64)
        magnitude = values.abs()
        paired = magnitude >= 2
        mask = values != 0
        offset = torch.where(paired, torch.sign(values) * (magnitude // 2), 0)
        sign = torch.where(paired, 1 - 2 * (magnitude % 2), 0)
    stride = _channel_stride(shape)
    paired_at = (offset != 0).nonzero().reshape(-1)
    target = (paired_at // stride) % shape[1] + offset[paired_at]
    if bool(((target < 0) | (target >= shape[1])).any()):
        raise FormatError(f"pattern code pairs a weight with a channel outside its vector "
                          f"(shape {shape})")
    index = torch.full((n,), -1, dtype=torch.int64, device=dev)
    index[paired_at] = paired_at + offset[paired_at] * stride
    return (mask.view(shape), index.view(shape), sign.to(torch.int8).view(shape))
