"""The allocation's costs after the refit: what each level leaves once the layer is refit.

The data-free ``"weight"`` sensitivity (:mod:`vbxfx.allocation.sensitivity`) scores a level by the
noise its projection adds at the layer's BatchNorm-normalised output. With calibration data
the refit changes that picture: some layers absorb most of a 1:4 pattern once their kept
weights are refit, others do not. :func:`refit_sensitivity` scores each level by the same
noise-to-signal ratio, with the noise *measured*: the per-output-channel output error of
the layer refit at that level (pattern chosen on the data, then least squares inside it)
on the dense model's calibration inputs, ``ΔW̃ H ΔW̃ᵀ``, gathered in one forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from vbxfx.format import encode_weight, project_weight
from vbxfx.refit.obs import obs_project
from vbxfx.refit.rows import Problem
from vbxfx.refit.solve import damped, solve_in_pattern
from vbxfx.allocation.sensitivity import LayerStats

__all__ = ["refit_sensitivity", "channel_errors"]

logger = logging.getLogger(__name__)


def channel_errors(m: torch.Tensor, target: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``E[((m - target) x̃)²]`` per output channel (``H = E[x̃ x̃ᵀ]``)."""
    d = (m - target).to(torch.float64)
    return ((d @ h) * d).sum(1)


@torch.no_grad()
def level_error(weight: torch.Tensor, bias: torch.Tensor | None, p: Problem, repeat: int, *,
                pattern: str, iters: int, damp: float) -> torch.Tensor:
    """Per-output-channel output error of the layer refit at ``repeat`` (local problem)."""
    o = weight.shape[0]
    b = bias if bias is not None else torch.zeros(o, dtype=weight.dtype)
    prior = torch.cat([weight.reshape(o, -1), b[:, None]], 1).to(torch.float64)
    h = p.h / p.n
    if pattern == "obs":
        hd, _ = damped(p, damp)
        start = obs_project(prior, hd, weight.shape, repeat)
        fitting = start[:, :-1].reshape(weight.shape).float()
    else:
        fitting = project_weight(weight.float(), repeat)
        start = torch.cat([fitting.reshape(o, -1).double(), prior[:, -1:]], 1)
    enc = encode_weight(fitting, repeat)
    m = solve_in_pattern(enc, p, prior, start, iters, damp)
    return channel_errors(m, prior, h)


def _ratio(noise: torch.Tensor, signal: torch.Tensor, st: LayerStats | None) -> float:
    """The noise-to-signal ratio of :func:`vbxfx.allocation.sensitivity.weight_sensitivity`."""
    st = st or LayerStats()
    if st.out_gain is not None and st.out_energy:
        ratio = float((st.out_gain.double() * noise).sum()) / st.out_energy
    else:
        total = float(signal.sum())
        ratio = float(noise.sum()) / total if total > 0 else 0.0
    return ratio * st.share


@torch.no_grad()
def refit_sensitivity(layers: Mapping[str, nn.Module], problems: Mapping[str, Problem],
                      levels: Mapping[str, Sequence[int]], stats: Mapping[str, LayerStats],
                      *, pattern: str = "obs", iters: int = 30, damp: float = 0.01,
                      progress: Callable[[int, int, str], None] | None = None,
                      ) -> dict[str, dict[int, float]]:
    """``{layer: {repeat: noise-to-signal ratio after the refit}}`` (the dense level, 4,
    costs 0). ``problems``: each layer's local problem (inputs of the dense model)."""
    out: dict[str, dict[int, float]] = {}
    for i, (name, layer) in enumerate(layers.items()):
        p = problems[name]
        w = layer.weight.detach().float()
        b = None if layer.bias is None else layer.bias.detach().float()
        o = w.shape[0]
        prior = torch.cat([w.reshape(o, -1), (b if b is not None else torch.zeros(o))[:, None]],
                          1).double()
        signal = channel_errors(prior, torch.zeros_like(prior), p.h / p.n)
        out[name] = {}
        for lv in levels[name]:
            if lv == 4:
                out[name][lv] = 0.0
                continue
            noise = level_error(w, b, p, lv, pattern=pattern, iters=iters, damp=damp)
            out[name][lv] = _ratio(noise, signal, stats.get(name))
        if progress is not None:
            progress(i + 1, len(layers), name)
    return out
