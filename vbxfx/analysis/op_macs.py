"""Count the multiplies of the ATen operators a piece of code runs (shapes are enough).

:class:`MacCounter` is a ``TorchDispatchMode``: every operator that reaches the dispatcher
inside it (FakeTensors too) is looked up in :data:`MAC_RULES`, which gives the standard MACs
(multiply-accumulates of the float computation) of the matrix products, convolutions and
fused attention kernels. Composite operators (``matmul``, ``linear``, ``einsum``,
``scaled_dot_product_attention`` on the math path) decompose into those before they reach the
mode, so each multiply is counted once. Element-wise products are not counted: they are not
what a MAC figure measures.

AnalyzeLayers runs every graph node that is not a Conv/Linear layer call inside a counter,
so attention and other matrix products show up in the totals instead of being missed.

>>> import torch
>>> with MacCounter() as count:
...     _ = torch.randn(2, 3, 4) @ torch.randn(2, 4, 5)
>>> count.macs, count.ops
(120, ('bmm',))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MacCounter", "MAC_RULES"]

_aten = torch.ops.aten


def _mm(a: torch.Tensor, b: torch.Tensor) -> int:
    """``[.., m, k] @ [.., k, n]``: batch * m * k * n (a vector operand has m or n = 1)."""
    if a.dim() == 1 and b.dim() == 1:
        return a.shape[0]
    batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
    m = a.shape[-2] if a.dim() > 1 else 1
    n = b.shape[-1] if b.dim() > 1 else 1
    return int(batch * m * a.shape[-1] * n)


def _conv(args: tuple, out: Any) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    per = math.prod(w.shape[1:])     # [O, I/g, k..] or, transposed, [I, O/g, k..]
    if transposed:                   # every input value scatters a kernel of O/g channels
        return int(x.numel() * per)
    return int(out.numel() * per)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """``softmax(q k^T) v`` with q ``[.., L, E]``, k ``[.., S, E]``, v ``[.., S, Ev]``."""
    batch = math.prod(q.shape[:-2])
    return int(batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))


def _native_mha(args: tuple) -> int:
    # (query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, ...)
    q, k = args[0], args[1]
    e = int(args[3])
    batch = math.prod(q.shape[:-2]) if q.dim() > 2 else 1
    lq, lk = q.shape[-2], k.shape[-2]
    return int(batch * ((lq + 2 * lk) * e * e + 2 * lq * lk * e + lq * e * e))


def _encoder_layer(args: tuple) -> int:
    # (src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, eps,
    #  norm_w1, norm_b1, norm_w2, norm_b2, ffn_w1, ffn_b1, ffn_w2, ffn_b2, mask, mask_type)
    src, e, ffn = args[0], int(args[1]), args[14].shape[0]
    batch = math.prod(src.shape[:-2]) if src.dim() > 2 else 1
    n = src.shape[-2]
    return int(batch * (4 * n * e * e + 2 * n * n * e + 2 * n * e * ffn))


def _rules() -> dict[Any, Callable[[tuple, Any], int]]:
    rules: dict[Any, Callable[[tuple, Any], int]] = {}

    def add(name: str, fn: Callable[[tuple, Any], int]) -> None:
        packet = getattr(_aten, name, None)
        if packet is not None:
            rules[packet] = fn

    add("mm", lambda a, out: _mm(a[0], a[1]))
    add("bmm", lambda a, out: _mm(a[0], a[1]))
    add("matmul", lambda a, out: _mm(a[0], a[1]))
    add("mv", lambda a, out: _mm(a[0], a[1]))
    add("dot", lambda a, out: _mm(a[0], a[1]))
    add("vdot", lambda a, out: _mm(a[0], a[1]))
    for name in ("addmm", "baddbmm", "addmv", "_addmm_activation"):
        add(name, lambda a, out: _mm(a[1], a[2]))
    add("addbmm", lambda a, out: _mm(a[1], a[2]))
    add("linear", lambda a, out: int(out.numel() * a[1].shape[-1]))
    for name in ("convolution", "_convolution", "convolution_overrideable"):
        add(name, _conv)
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable",
                 "scaled_dot_product_attention"):
        add(name, lambda a, out: _attention(a[0], a[1], a[2]))
    add("_native_multi_head_attention", lambda a, out: _native_mha(a))
    add("_transformer_encoder_layer_fwd", lambda a, out: _encoder_layer(a))
    return rules


#: ATen overload packet -> ``fn(args, out) -> standard MACs`` (all batch elements).
MAC_RULES = _rules()


class MacCounter(TorchDispatchMode):
    """Sum the standard MACs of the matrix products, convolutions and attention kernels run
    inside the ``with`` block; ``ops`` names them (ATen names, first-seen order)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self._ops: dict[str, None] = {}

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(self._ops)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        rule = MAC_RULES.get(getattr(func, "overloadpacket", None))
        if rule is not None:
            try:
                macs = rule(args, out)
            except (AttributeError, IndexError, TypeError):  # an unusual overload: not counted
                macs = 0
            if macs:
                self.macs += macs
                self._ops.setdefault(func.overloadpacket.__name__, None)
        return out
