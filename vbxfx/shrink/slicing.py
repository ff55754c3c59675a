"""Smaller copies of Conv2d / Linear / BatchNorm / depthwise layers, and low-rank factors.

Every function returns a new module of the same class, dtype and device with the chosen
channels of the old one's parameters and buffers (``requires_grad`` kept); the old module is
not changed.

>>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
>>> small = sliced_layer(conv, out_index=torch.tensor([0, 5]), in_index=torch.tensor([1, 2]))
>>> tuple(small.weight.shape), torch.equal(small.weight, conv.weight[[0, 5]][:, [1, 2]])
((2, 2, 3, 3), True)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["sliced_layer", "sliced_batchnorm", "sliced_depthwise", "low_rank_factors",
           "spatial_factors"]


def _param(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def _layer_like(mod: nn.Module, out_features: int, in_features: int, **changes) -> nn.Module:
    kw = dict(device=mod.weight.device, dtype=mod.weight.dtype)
    if isinstance(mod, nn.Linear):
        return nn.Linear(in_features, out_features, bias=mod.bias is not None, **kw)
    opts = dict(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                padding_mode=mod.padding_mode)
    opts.update(changes)
    return nn.Conv2d(in_features, out_features, **opts, **kw)


@torch.no_grad()
def sliced_layer(mod: nn.Conv2d | nn.Linear, out_index: torch.Tensor | None = None,
                 in_index: torch.Tensor | None = None) -> nn.Module:
    """A Conv2d (groups=1) or Linear with only output channels ``out_index`` and input
    channels ``in_index`` (None: all)."""
    w = mod.weight
    if out_index is not None:
        w = w.index_select(0, out_index.to(w.device))
    if in_index is not None:
        w = w.index_select(1, in_index.to(w.device))
    new = _layer_like(mod, w.shape[0], w.shape[1])
    new.weight = _param(w, mod.weight)
    if mod.bias is not None:
        b = mod.bias if out_index is None else mod.bias.index_select(0, out_index.to(w.device))
        new.bias = _param(b, mod.bias)
    new.train(mod.training)
    return new


@torch.no_grad()
def sliced_batchnorm(mod: nn.modules.batchnorm._BatchNorm, index: torch.Tensor) -> nn.Module:
    """A BatchNorm of the same class over channels ``index``."""
    new = type(mod)(len(index), eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                    track_running_stats=mod.track_running_stats,
                    device=index.device if mod.weight is None else mod.weight.device,
                    dtype=None if mod.weight is None else mod.weight.dtype)
    idx = index.to(new.running_mean.device if new.running_mean is not None else index.device)
    if mod.affine:
        new.weight = _param(mod.weight.index_select(0, idx), mod.weight)
        new.bias = _param(mod.bias.index_select(0, idx), mod.bias)
    if mod.track_running_stats:
        new.running_mean.copy_(mod.running_mean.index_select(0, idx))
        new.running_var.copy_(mod.running_var.index_select(0, idx))
        new.num_batches_tracked.copy_(mod.num_batches_tracked)
    new.train(mod.training)
    return new


@torch.no_grad()
def sliced_depthwise(mod: nn.Conv2d, index: torch.Tensor) -> nn.Conv2d:
    """A depthwise Conv2d over channels ``index``."""
    n = len(index)
    new = _layer_like(mod, n, n, groups=n)
    idx = index.to(mod.weight.device)
    new.weight = _param(mod.weight.index_select(0, idx), mod.weight)
    if mod.bias is not None:
        new.bias = _param(mod.bias.index_select(0, idx), mod.bias)
    new.train(mod.training)
    return new


@torch.no_grad()
def low_rank_factors(mod: nn.Conv2d | nn.Linear, rank: int,
                     in_rms: torch.Tensor | None = None) -> nn.Sequential:
    """``mod`` as two layers through ``rank`` channels (weight SVD): a Conv2d with ``mod``'s
    kernel, stride and padding into ``rank`` channels, then a 1x1 Conv2d to the outputs
    (for a Linear, two Linears), holding ``mod``'s bias.

    ``in_rms``: the root mean square of each input channel; the SVD then keeps what matters
    for the layer's *output* on such inputs (the error ``||(W - W_r) x||`` is least on
    average), not for the weights.
    """
    w = mod.weight.detach().double()
    o, i = w.shape[0], w.shape[1]
    scale = torch.ones(i, dtype=w.dtype, device=w.device)
    if in_rms is not None:
        scale = in_rms.to(w).clamp(min=1e-6 * float(in_rms.max().clamp(min=1e-12)))
    view = (1, -1) + (1,) * (w.dim() - 2)
    u, s, vh = torch.linalg.svd((w * scale.view(view)).reshape(o, -1), full_matrices=False)
    r = int(rank)
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).reshape((r,) + tuple(w.shape[1:])) / scale.view(view)
    second = u[:, :r] * root[None, :]
    if isinstance(mod, nn.Linear):
        a = nn.Linear(i, r, bias=False, device=w.device, dtype=mod.weight.dtype)
        b = nn.Linear(r, o, bias=mod.bias is not None, device=w.device, dtype=mod.weight.dtype)
    else:
        a = _layer_like(mod, r, i, bias=False)
        b = nn.Conv2d(r, o, 1, bias=mod.bias is not None, device=w.device,
                      dtype=mod.weight.dtype)
        second = second[:, :, None, None]
    a.weight = _param(first.to(mod.weight.dtype), mod.weight)
    b.weight = _param(second.to(mod.weight.dtype), mod.weight)
    if mod.bias is not None:
        b.bias = _param(mod.bias, mod.bias)
    seq = nn.Sequential(a, b)
    seq.train(mod.training)
    return seq


@torch.no_grad()
def spatial_factors(mod: nn.Conv2d, rank: int, in_rms: torch.Tensor | None = None
                    ) -> nn.Sequential:
    """A ``kh x kw`` Conv2d as a ``kh x 1`` Conv2d into ``rank`` channels, then a ``1 x kw``
    Conv2d to the outputs (spatial SVD), holding ``mod``'s bias; stride, padding and dilation
    split by axis. ``in_rms`` weighs the SVD as in :func:`low_rank_factors`."""
    w = mod.weight.detach().double()                        # [O, I, kh, kw]
    o, i, kh, kw = w.shape
    scale = torch.ones(i, dtype=w.dtype, device=w.device)
    if in_rms is not None:
        scale = in_rms.to(w).clamp(min=1e-6 * float(in_rms.max().clamp(min=1e-12)))
    m = (w * scale.view(1, -1, 1, 1)).permute(1, 2, 0, 3).reshape(i * kh, o * kw)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = int(rank)
    root = s[:r].sqrt()
    first = (u[:, :r] * root).reshape(i, kh, r).permute(2, 0, 1)[..., None]   # [r, I, kh, 1]
    first = first / scale.view(1, -1, 1, 1)
    second = (root[:, None] * vh[:r]).reshape(r, o, kw).permute(1, 0, 2)[:, :, None, :]
    (sh, sw), (ph, pw), (dh, dw) = mod.stride, mod.padding, mod.dilation
    kw_ = dict(device=w.device, dtype=mod.weight.dtype)
    a = nn.Conv2d(i, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                  bias=False, **kw_)
    b = nn.Conv2d(r, o, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                  bias=mod.bias is not None, **kw_)
    a.weight = _param(first.to(mod.weight.dtype), mod.weight)
    b.weight = _param(second.to(mod.weight.dtype), mod.weight)
    if mod.bias is not None:
        b.bias = _param(mod.bias, mod.bias)
    seq = nn.Sequential(a, b)
    seq.train(mod.training)
    return seq
