"""An independent count of every multiply a model runs, for checking vbxfx's MAC figures.

Written against torch's public functions, not vbxfx's analysis: a ``TorchFunctionMode`` sees
each ``F.conv*`` / ``F.linear`` / matmul / ``bmm`` / ``baddbmm`` / ``addmm`` / ``einsum`` /
``scaled_dot_product_attention`` call (and ``F.multi_head_attention_forward``, whose inside
the mode does not see, counted from its shapes) on real tensors, and adds up

- standard MACs (the float multiplies),
- dense hardware MACs: a Conv2d with groups=1 or a Linear (any call whose weight is 2-D or
  4-D, groups 1) at ``O * k * ceil(I/8)*8 * positions``, everything else standard,
- hardware MACs after compression: the same with the layer's repeat ``R`` (``2R/8`` of the
  dense figure), found by the identity of the weight tensor the call receives.

Run it on a *finalized* model (:func:`vbxfx.finalize`): there each compressed layer is a plain
layer whose ``weight`` is the compressed weight, so the calls see Parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def pad8(c: int) -> int:
    return -(-int(c) // 8) * 8


@dataclass
class Counted:
    standard: int = 0
    dense: int = 0
    after: int = 0
    calls: int = 0

    def add(self, std: int, dense: int | None = None, after: int | None = None) -> None:
        dense = std if dense is None else dense
        self.standard += std
        self.dense += dense
        self.after += dense if after is None else after
        self.calls += 1


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _einsum_macs(equation: str, operands) -> int:
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for spec, t in zip(lhs, operands):
        for letter, n in zip(spec, t.shape):
            sizes[letter] = n
    return math.prod(sizes.values())


class MultiplyCounter(TorchFunctionMode):
    """``repeats``: ``{id(weight tensor): R}`` of the compressed layers; ``batch``: the input's
    batch size (the totals are per image)."""

    def __init__(self, repeats: dict[int, int], batch: int = 1):
        super().__init__()
        self.repeats, self.batch = repeats, batch
        self.total = Counted()

    def _layer(self, out, w, in_per_group, k):
        """A conv / linear call: (standard, dense hardware, after)."""
        rows = out.numel() // w.shape[0]                  # output positions x batch
        std = rows * w.shape[0] * in_per_group * k
        r = self.repeats.get(id(w), 4)
        dense = rows * w.shape[0] * pad8(in_per_group) * k
        return std, dense, dense * r // 4

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        t = self.total
        if func in (F.conv1d, F.conv2d, F.conv3d):
            w, groups = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 6, "groups", 1)
            k = math.prod(w.shape[2:])
            if groups == 1 and w.dim() == 4:
                t.add(*self._layer(out, w, w.shape[1], k))
            else:
                t.add(out.numel() * w.shape[1] * k)
        elif func in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
            x, w = args[0], _arg(args, kwargs, 1, "weight")
            t.add(x.numel() * math.prod(w.shape[1:]))
        elif func is F.linear:
            w = _arg(args, kwargs, 1, "weight")
            t.add(*self._layer(out, w, w.shape[1], 1))
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                      torch.Tensor.bmm, torch.mm, torch.Tensor.mm):
            a = args[0]
            t.add(out.numel() * a.shape[-1])
        elif func in (torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm):
            t.add(out.numel() * args[1].shape[-1])
        elif func is torch.einsum:
            ops = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            t.add(_einsum_macs(args[0], ops))
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            t.add(math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        elif func is F.multi_head_attention_forward:
            q, k = args[0], args[1]                   # [L, N, E] / [S, N, E] (or unbatched)
            e = int(args[3])
            n = q.shape[1] if q.dim() == 3 else 1
            lq, lk = q.shape[0], k.shape[0]
            proj = n * (lq + 2 * lk) * e * pad8(e) + n * lq * e * pad8(e)   # in + out projections
            std_proj = n * (lq + 2 * lk) * e * e + n * lq * e * e
            attention = 2 * n * lq * lk * e
            t.add(std_proj + attention, proj + attention)
        return out

    def per_image(self) -> Counted:
        b = self.batch
        t = self.total
        return Counted(t.standard // b, t.dense // b, t.after // b, t.calls)


@torch.no_grad()
def count_multiplies(model: torch.nn.Module, inputs, repeats_by_name: dict[str, int]) -> Counted:
    """Run ``model`` (eval) once on ``inputs`` under the counter; ``repeats_by_name`` maps the
    compressed layers of ``model`` to their repeat."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    repeats = {id(model.get_submodule(name).weight): r for name, r in repeats_by_name.items()}
    counter = MultiplyCounter(repeats, batch=inputs[0].shape[0])
    was = model.training
    model.eval()
    try:
        with counter:
            model(*inputs)
    finally:
        model.train(was)
    return counter.per_image()
