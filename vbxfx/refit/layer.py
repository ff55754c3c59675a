"""Refit one layer from its :class:`~vbxfx.refit.rows.Problem`, in place.

* A compressed layer: optionally a new pattern chosen on the data
  (:func:`vbxfx.refit.obs.obs_project`, ``pattern="obs"``), then least squares inside the
  pattern (:func:`vbxfx.refit.solve.solve_in_pattern`) for the kept weights, the shared
  magnitude of each pair and a bias. With ``zero_pruned`` (the default) the refit weight,
  zeros included, becomes the layer's dense weight: the pruned weights get no gradient
  through the projection, so pattern refreshes in fine-tuning keep the refit pattern (a
  refresh from the dense values would undo a pattern chosen on the data). Otherwise the
  refit values go into the kept positions only and the pruned positions keep their dense
  values, so they can come back at a refresh.
* A dense layer the hardware keeps dense (a depthwise convolution): the unconstrained
  damped least squares, per channel.

A layer whose output error would not go down keeps its weights and its pattern.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from vbxfx.format import encode_weight
from vbxfx.modules import CompressedMixin
from vbxfx.refit.obs import obs_project
from vbxfx.refit.rows import Problem
from vbxfx.refit.solve import damped, finite, relative_error, solve_dense, solve_in_pattern

__all__ = ["LayerRefit", "refit_compressed", "refit_dense", "weight_and_bias", "PATTERNS"]

#: ``pattern=`` choices: keep the projection's pattern, or choose it with OBS on the data.
PATTERNS = ("keep", "obs")


@dataclass(frozen=True)
class LayerRefit:
    """One layer's output error on the calibration inputs (squared, relative to the target
    output's energy) before and after its refit."""

    name: str
    error_before: float
    error_after: float
    bias_added: bool
    pattern_changed: bool = False
    dense: bool = False


def weight_and_bias(layer: nn.Module, compressed: bool = True) -> torch.Tensor:
    """``[O, K+1]`` float64: the (compressed) weight rows and the bias (zeros if none)."""
    w = layer.compressed_weight() if compressed and isinstance(layer, CompressedMixin) \
        else layer.weight
    w = w.detach().to(torch.float64).reshape(w.shape[0], -1)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None \
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    return torch.cat([w, b[:, None]], 1)


def _write(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor,
           mask: torch.Tensor | None) -> bool:
    """Write ``w`` (where ``mask``) and ``bias``; return whether a bias had to be added."""
    with torch.no_grad():
        weight = layer.weight
        w = w.reshape(weight.shape).to(weight.device, weight.dtype)
        weight.copy_(w if mask is None else torch.where(mask.to(weight.device), w, weight))
        added = layer.bias is None
        if added:
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                  device=weight.device),
                                      requires_grad=weight.requires_grad)
        layer.bias.copy_(bias.to(layer.bias.device, layer.bias.dtype))
    return added


@torch.no_grad()
def _set_pattern(layer: CompressedMixin, fitting: torch.Tensor) -> None:
    """Make ``fitting`` (a weight that fits the layer's repeat) the layer's pattern: the
    projection of a fitting weight is the weight itself, so a refresh from it keeps it."""
    layer.weight.copy_(fitting.reshape(layer.weight.shape).to(layer.weight.dtype))
    layer.refresh_pattern()


@torch.no_grad()
def refit_compressed(name: str, layer: CompressedMixin, prior: torch.Tensor, p: Problem, *,
                     pattern: str, iters: int, damp: float,
                     variance_match: bool = False, zero_pruned: bool = True) -> LayerRefit:
    """Refit a compressed layer in place (see the module docstring).

    ``prior``: the dense ``[W, b]`` rows (``weight_and_bias`` of the reference layer), the
    damping's anchor and OBS's starting point. ``variance_match``: then scale each output
    channel so that its variance on the calibration rows is the target's (least squares
    shrinks it; a per-channel scale keeps the format), the bias keeping the mean.
    """
    current = weight_and_bias(layer)
    before = relative_error(current, p)
    enc, start, chosen = layer.encoding(), current, None
    if pattern == "obs" and layer.fmt == "comp" and not layer.frozen:
        h, _ = damped(p, damp)
        star = solve_dense(p, prior, damp)
        start = obs_project(star, h, layer.weight.shape, layer.repeat, layer.pairing)
        chosen = start[:, :-1].reshape(layer.weight.shape).float()
        enc = encode_weight(chosen, layer.repeat)
        if not layer.pairing:             # plain N:4: equal magnitudes are no pair here
            enc = dataclasses.replace(enc, pair_index=torch.full_like(enc.pair_index, -1),
                                      pair_sign=torch.zeros_like(enc.pair_sign))
    x = solve_in_pattern(enc, p, prior, start, iters, damp)
    after = relative_error(x, p)
    if not finite(x) or after >= before:
        return LayerRefit(name, before, before, False)
    if variance_match:
        x = _match_variance(x, p)
        after = relative_error(x, p)
    if chosen is not None:
        dense_w = layer.weight.detach().clone()
        _set_pattern(layer, chosen)
        layer.weight.copy_(dense_w)
    added = _write(layer, x[:, :-1], x[:, -1], None if zero_pruned else layer.mask)
    return LayerRefit(name, before, after, added, pattern_changed=chosen is not None)


def _match_variance(x: torch.Tensor, p: Problem) -> torch.Tensor:
    h = p.h / p.n
    mean_x = x @ h[:, -1]                                   # E[x̃] is H's last column
    var_x = ((x @ h) * x).sum(1) - mean_x.square()
    mean_t = p.g[:, -1] / p.n
    var_t = p.tc / p.n - mean_t.square()
    scale = torch.where(var_x > 1e-12 * var_t.clamp_min(1e-300),
                        (var_t.clamp_min(0) / var_x.clamp_min(1e-300)).sqrt(),
                        torch.ones_like(var_x))
    out = x * scale[:, None]
    out[:, -1] += mean_t - scale * mean_x
    return out


@torch.no_grad()
def refit_dense(name: str, layer: nn.Module, p: Problem, damp: float) -> LayerRefit:
    """Refit a dense (depthwise) layer in place: unconstrained damped least squares."""
    prior = weight_and_bias(layer, compressed=False)
    before = relative_error(prior, p)
    x = solve_dense(p, prior, damp)
    after = relative_error(x, p)
    if not finite(x) or after >= before:
        return LayerRefit(name, before, before, False, dense=True)
    added = _write(layer, x[:, :-1], x[:, -1], None)
    return LayerRefit(name, before, after, added, dense=True)
