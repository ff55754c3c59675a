"""The noise-to-signal ratio at a layer's normalised output, the unit of every allocation cost.

A change ``dW`` of a layer's weight perturbs output channel ``o`` by ``dW_o · x``, of energy
``Σ dW² Var(x) + (Σ dW E[x])²`` for input channels taken as independent; the ratio puts it
against the energy of the BatchNorm after the layer (or of the layer's own output), times the
layer's share of the residual sum it flows into. :class:`LayerStats` holds those data-free
statistics (:func:`vbxfx.allocation.sensitivity.layer_statistics` reads them off the model).
"""

from __future__ import annotations

import dataclasses

import torch

from vbxfx.errors import ConfigError

__all__ = ["LayerStats", "noise_ratio", "column_ratios", "measured_statistics"]


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Data-free statistics around one layer, read from the model's BatchNorm layers.

    ``in_mean`` / ``in_var``: per input channel moments of the layer's input (None: unknown,
    taken as mean 0, variance 1). ``out_gain``: ``γ²/σ²`` per output channel of the BatchNorm
    right after the layer and ``out_energy`` its output energy ``Σ γ² + β²`` (None: no
    BatchNorm follows). ``share``: the energy share of the layer's branch in the first
    residual sum it flows into (1 when there is none).
    """

    in_mean: torch.Tensor | None = None
    in_var: torch.Tensor | None = None
    out_gain: torch.Tensor | None = None
    out_energy: float | None = None
    share: float = 1.0


def _moments(w: torch.Tensor, st: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    if st.in_var is None:
        mean, var = torch.zeros(w.shape[1]), torch.ones(w.shape[1])
    else:
        mean, var = st.in_mean.float(), st.in_var.float()
    shape = (1, -1) + (1,) * (w.dim() - 2)
    return mean.view(shape), var.view(shape)


def _normalised(w: torch.Tensor, noise: torch.Tensor, st: LayerStats, mean, var) -> torch.Tensor:
    """``noise`` (per output channel, optionally [O, ...]) as a share of the output energy."""
    if st.out_gain is not None and st.out_energy:
        gain = st.out_gain.float().view((-1,) + (1,) * (noise.dim() - 1))
        return (gain * noise).sum(0) / st.out_energy * st.share
    dims = tuple(range(1, w.dim()))
    signal = float(((w.square() * var).sum(dims) + (w * mean).sum(dims).square()).sum())
    return noise.sum(0) / signal * st.share if signal > 0 else noise.sum(0) * 0.0


def noise_ratio(w: torch.Tensor, dw: torch.Tensor, st: LayerStats | None) -> float:
    """The noise-to-signal ratio at the layer's normalised output when its weight ``w``
    changes by ``dw`` (any change: a projection, a truncated SVD, pruned input channels)."""
    w, dw = w.detach().float(), dw.detach().float()
    st = st or LayerStats()
    mean, var = _moments(w, st)
    dims = tuple(range(1, w.dim()))
    noise = (dw.square() * var).sum(dims) + (dw * mean).sum(dims).square()
    return float(_normalised(w, noise, st, mean, var))


def column_ratios(w: torch.Tensor, st: LayerStats | None) -> torch.Tensor:
    """Per input channel ``c``, the :func:`noise_ratio` of removing channel ``c`` alone with
    its mean put into the bias (its variance is what is lost); they add up over channels."""
    w = w.detach().float()
    st = st or LayerStats()
    mean, var = _moments(w, st)
    per = (w.square() * var).reshape(w.shape[0], w.shape[1], -1).sum(-1)   # [O, I]
    return _normalised(w, per, st, mean, var)


@torch.no_grad()
def measured_statistics(root: torch.nn.Module, stats: dict[str, LayerStats],
                        batches: list[tuple]) -> dict[str, LayerStats]:
    """``stats`` with every layer's input moments measured on calibration ``batches`` (per
    channel, over the batch and positions of the layer's first call) instead of read off the
    BatchNorms; the output side (gain, energy, share) stays. ``root`` runs in eval mode and
    comes back in its own mode."""
    sums: dict[str, list] = {}
    handles = []

    def hook(name):
        def record(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or name in done:
                return
            done.add(name)
            c = x.shape[1] if x.dim() > 2 else x.shape[-1]
            flat = (x.transpose(0, 1) if x.dim() > 2 else x.T).reshape(c, -1).double()
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + flat.sum(1)
            s[1] = s[1] + flat.square().sum(1)
            s[2] += flat.shape[1]
        return record

    modules = dict(root.named_modules())
    for name in stats:
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(hook(name), with_kwargs=True))
    was = root.training
    root.eval()
    try:
        for i, batch in enumerate(batches):
            done: set[str] = set()
            try:
                root(*batch)
            except Exception as e:          # shapes, dtypes: name the batch, not torch's line
                raise ConfigError(f"calibration batch {i} (shapes "
                                  f"{[tuple(getattr(t, 'shape', ())) for t in batch]}) does not "
                                  f"run through the model: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}") from e
    finally:
        root.train(was)
        for h in handles:
            h.remove()
    out = dict(stats)
    for name, (total, squares, n) in sums.items():
        st = stats[name]
        mean = (total / n).float()
        var = (squares / n).float() - mean.square()
        if st.in_var is None or st.in_var.numel() == mean.numel():
            out[name] = dataclasses.replace(st, in_mean=mean, in_var=var.clamp(min=0))
    return out
