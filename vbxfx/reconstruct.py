"""Calibrated reconstruction: refit the kept weights of the compressed layers to the dense outputs.

The projection chooses each layer's pattern (which weights stay, which pairs share one
multiplier) from the weights alone. Given a few unlabeled calibration batches, the values
inside that pattern can do much better: for every compressed layer, the kept weights, the
shared magnitude of each pair, and a bias solve

    min  E || W_dense x_dense + b_dense - (W x_dense + b) ||²     over W in the pattern, b free

where ``x_dense`` is the layer's input in the dense model. The pattern does not change
(every weight stays in the format; a pair keeps its sign relation, a shared magnitude may
change sign), so the layer keeps fitting its repeat after int8 quantization. Adding the bias is what bias correction does; the refit does it jointly.

The problem is a least-squares problem per output channel over the pattern's free values,
with the input Gram matrix ``H = E[x xᵀ]`` (``K+1`` square for ``K = in_channels · kh · kw``
inputs per output, plus the bias), gathered with forward pre-hooks in one forward of the
dense model. It is solved by preconditioned conjugate gradients, all output channels at once,
inside the pattern subspace: the layer's projection onto its pattern is an orthogonal
projection, so the subspace problem stays symmetric positive definite. Layers whose Gram
matrices would exceed ``max_stats_bytes`` together go to further forwards.

The refit is layer-local: every layer sees the dense model's inputs, so all layers refit
from one forward. Refitting to the compressed model's inputs instead (to absorb the error
of the layers before) must go layer by layer; doing it for all layers at once from one
forward over-corrects (a prototype of it on MobileNetV2 at 2:4 agreed with the dense model
on none of the crops where the local refit agrees on 66%, tools/bench_quality.py).

>>> import torch, vbxfx
>>> from vbxfx.demo import DemoNet
>>> dense = DemoNet().eval(); x = torch.randn(16, 3, 64, 64)
>>> small = vbxfx.compress(dense, x[:1], compression=0.66).model      # doctest: +SKIP
>>> reconstruct(small, dense, x).layers[0].error_after <= 1           # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.modules import CompressedMixin, is_compressed
from vbxfx.sensitivity import calib_batches

__all__ = ["reconstruct", "ReconstructResult", "LayerRefit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRefit:
    """One layer's output error on the calibration inputs (squared, relative to the dense
    output's energy) before and after its refit."""

    name: str
    error_before: float
    error_after: float
    bias_added: bool


@dataclass
class ReconstructResult:
    layers: list[LayerRefit] = field(default_factory=list)
    forwards: int = 0

    def summary(self) -> str:
        if not self.layers:
            return "reconstruct: no layer refit"
        before = sum(r.error_before for r in self.layers) / len(self.layers)
        after = sum(r.error_after for r in self.layers) / len(self.layers)
        return (f"reconstruct: {len(self.layers)} layer(s) refit from "
                f"{self.forwards} forward(s); mean relative output error {before:.4f} -> {after:.4f}")


class _Stats:
    """Running ``E[x xᵀ]`` of a layer's inputs, each with a trailing 1 (for the bias)."""

    def __init__(self, k: int, device: torch.device):
        self.h = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        x = torch.cat([x.float(), ones], 1)
        self.h += (x.T @ x).double()
        self.n += x.shape[0]


def _rows(layer: nn.Module, x: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    """The layer's input as rows ``[M, K]`` (convolution patches), subsampled to ``max_rows``."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)                      # [B, K, L]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        pick = torch.randperm(rows.shape[0], generator=gen)[:max_rows].to(rows.device)
        rows = rows.index_select(0, pick)
    return rows


def _refittable(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be refit, or None."""
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros"
                                         or isinstance(layer.padding, str)):
        return f"padding {layer.padding!r} / padding_mode {layer.padding_mode!r}"
    return None


@torch.no_grad()
def _solve(layer: CompressedMixin, w_dense: torch.Tensor, b_dense: torch.Tensor | None,
           st: _Stats, iters: int, damp: float
           ) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
    """Refit one layer: (weight in the pattern, bias, error before, error after); the weight
    and bias are None when the refit would not lower the error."""
    shape = layer.weight.shape
    o = shape[0]
    dev = st.h.device
    h64 = st.h / st.n
    a = layer.vbx_coef_a.to(dev, torch.float32).reshape(o, -1)
    b = layer.vbx_coef_b.to(dev, torch.float32).reshape(o, -1)
    idx = layer.vbx_gather_index.to(dev, torch.int64)

    def proj(m: torch.Tensor) -> torch.Tensor:   # onto the pattern (weights), bias free
        w = m[:, :-1]
        pw = a * w + b * w.reshape(-1).index_select(0, idx).view_as(w)
        return torch.cat([pw, m[:, -1:]], 1)

    zeros = torch.zeros(o, dtype=torch.float64, device=dev)
    bias0 = layer.bias.detach().to(dev, torch.float64) if layer.bias is not None else zeros
    wt = torch.cat([w_dense.to(dev, torch.float64).reshape(o, -1),
                    (b_dense.to(dev, torch.float64) if b_dense is not None else zeros)[:, None]], 1)
    x0 = torch.cat([layer.compressed_weight().detach().to(dev, torch.float64).reshape(o, -1),
                    bias0[:, None]], 1)

    def error(m: torch.Tensor) -> float:          # E||(wt - m) x||², relative to E||wt x||²
        e = m - wt
        return float(((e @ h64) * e).sum() / ((wt @ h64) * wt).sum().clamp_min(1e-300))

    before = error(x0)
    diag = torch.diagonal(h64)
    lam = damp * float(diag[:-1].mean()) if diag.numel() > 1 else 0.0
    h = (h64 + lam * torch.eye(h64.shape[0], dtype=h64.dtype, device=dev)).float()
    inv_diag = 1.0 / torch.diagonal(h).clamp_min(1e-30)
    x = x0.float()
    r = proj(wt.float() @ h) - proj(x @ h)
    z = proj(r * inv_diag)
    p = z
    rz = (r * z).sum(1)
    rz0 = float(rz.abs().max())
    for _ in range(iters):
        if rz0 == 0.0:
            break
        ap = proj(p @ h)
        pap = (p * ap).sum(1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        z = proj(r * inv_diag)
        rz_new = (r * z).sum(1)
        if float(rz_new.abs().max()) <= 1e-8 * rz0:
            break
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    x = proj(x).double()                           # exactly in the pattern
    after = error(x)
    if not math.isfinite(after) or after >= before:   # never make a layer worse
        return None, None, before, before
    return x[:, :-1].reshape(shape), x[:, -1], before, after


def _apply(layer: CompressedMixin, w: torch.Tensor, bias: torch.Tensor) -> bool:
    """Write the refit values into the kept positions of the dense weight (the pruned ones
    keep their dense values, so they can come back when the pattern is refreshed); returns
    whether a bias Parameter had to be added."""
    with torch.no_grad():
        weight = layer.weight
        mask = layer.mask.to(weight.device)
        weight.copy_(torch.where(mask, w.to(weight.device, weight.dtype), weight))
        added = layer.bias is None
        if added:
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                  device=weight.device),
                                      requires_grad=weight.requires_grad)
        layer.bias.copy_(bias.to(layer.bias.device, layer.bias.dtype))
    return added


def _groups(names: list[str], modules: dict[str, nn.Module], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        k = modules[name].weight[0].numel() + 1
        size = 8 * k * k
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def reconstruct(model: nn.Module, reference: nn.Module, calib_data: Any, *, iters: int = 30,
                damp: float = 0.01, max_rows: int = 4096, max_stats_bytes: int = 2 ** 30,
                layers: Iterable[str] | None = None, seed: int = 0,
                progress: Callable[[str, int, int], None] | None = None) -> ReconstructResult:
    """Refit the compressed layers of ``model`` (in place) to the outputs of ``reference``.

    Args:
        model: a model holding compressed layers (e.g. ``vbxfx.compress(...).model``).
        reference: the dense model it was compressed from (not modified: a copy runs).
        calib_data: a Tensor batch, or an iterable of batches (Tensors, tuples of inputs, or
            ``(inputs, labels)`` pairs, as for the output sensitivity).
        iters: conjugate-gradient iterations per layer (it stops early when converged).
        damp: Tikhonov damping, as a fraction of the mean input energy.
        max_rows: input rows (convolution patches) sampled per layer and batch.
        max_stats_bytes: memory for Gram matrices per forward; more layers take more forwards.
        layers: only these compressed layers (default: all).
        progress: called as ``progress(phase, done, total)``: phase ``"statistics"`` over the
            forwards that gather the input statistics, then ``"solve"`` over the layers
            (``done`` 0 when a phase starts).

    Raises:
        ConfigError: no compressed layer, bad options, a layer missing in ``reference`` or of
            a different shape there, or calibration data the reference cannot run; raised
            before any weight changes.
    """
    _positive_int("iters", iters)
    _positive_int("max_rows", max_rows)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) \
            or damp < 0:
        raise ConfigError(f"damp must be a finite number >= 0, got {damp!r}")
    batches = calib_batches(calib_data)
    modules = dict(model.named_modules())
    compressed = [n for n, m in modules.items() if is_compressed(m)]
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in wanted if n not in compressed]
        if missing:
            raise ConfigError(f"reconstruct: {missing} are not compressed layers of the model; "
                              f"it has {compressed[:5]}{' ...' if len(compressed) > 5 else ''}")
        compressed = [n for n in compressed if n in set(wanted)]
    if not compressed:
        raise ConfigError("reconstruct: the model holds no compressed layer; compress it first")
    reference = copy.deepcopy(reference)
    ref_modules = dict(reference.named_modules())
    names = []
    for n in compressed:
        ref = ref_modules.get(n)
        if not isinstance(ref, (nn.Conv2d, nn.Linear)) or ref.weight.shape != modules[n].weight.shape:
            raise ConfigError(f"reconstruct: layer {n!r} has no Conv2d/Linear of weight shape "
                              f"{tuple(modules[n].weight.shape)} at the same name in the "
                              "reference model (give the dense model it was compressed from)")
        why = _refittable(modules[n])
        if why:
            logger.info("reconstruct: %s is not refit (%s)", n, why)
            continue
        names.append(n)
    # the dense weights: the reference's (a compressed reference layer gives its projection)
    dense_w = {n: (ref_modules[n].compressed_weight() if is_compressed(ref_modules[n])
                   else ref_modules[n].weight).detach().clone() for n in names}
    dense_b = {n: None if ref_modules[n].bias is None else ref_modules[n].bias.detach().clone()
               for n in names}
    reference.eval()
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, _Stats] = {}
    forwards = 0
    report = progress or (lambda phase, done, total: None)
    groups = _groups(names, modules, max_stats_bytes)
    report("statistics", 0, len(groups))
    for group in groups:  # gather first: errors change nothing
        stats.update(_gather(reference, ref_modules, group, batches, max_rows, gen))
        forwards += 1
        report("statistics", forwards, len(groups))
    result = ReconstructResult(forwards=forwards)
    for k, n in enumerate(names):
        report("solve", k, len(names))
        st = stats.pop(n)
        if st.n == 0:
            logger.info("reconstruct: %s did not run on the calibration data", n)
            continue
        w, bias, before, after = _solve(modules[n], dense_w[n], dense_b[n], st, iters, damp)
        added = _apply(modules[n], w, bias) if w is not None else False
        result.layers.append(LayerRefit(n, before, after, added))
    report("solve", len(names), len(names))
    logger.info("%s", result.summary())
    return result


@torch.no_grad()
def _gather(reference: nn.Module, ref_modules: dict[str, nn.Module], group: list[str],
            batches: list[tuple], max_rows: int, gen: torch.Generator) -> dict[str, _Stats]:
    """Gram matrices of the inputs of the layers in ``group`` over the calibration batches."""
    stats = {n: _Stats(ref_modules[n].weight[0].numel(), ref_modules[n].weight.device)
             for n in group}

    def hook(name):
        def pre_hook(mod, args):
            stats[name].add(_rows(mod, args[0], max_rows, gen))
        return pre_hook

    handles = [ref_modules[n].register_forward_pre_hook(hook(n)) for n in group]
    try:
        for i, batch in enumerate(batches):
            try:
                reference(*batch)
            except Exception as e:
                raise ConfigError(f"reconstruct: calibration batch {i} failed to run through "
                                  f"the reference model: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return stats
