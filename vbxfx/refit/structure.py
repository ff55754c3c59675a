"""The refit of a model whose layers were made smaller (:mod:`vbxfx.shrink`).

Channel pruning keeps the fx graph and the layer names; only shapes change. The refit still
compares each layer with the dense model's layer at the same name, with three differences
that a :class:`~vbxfx.shrink.ShrinkRecord` describes:

- a layer that lost output channels targets the dense output's kept channels
  (``out_index``);
- a layer that lost input channels (a *consumer*) is refit even when it stays dense: least
  squares over the channels left is the reconstruction of channel pruning (AIMET's, ThiNet's),
  and the damping anchors it at its sliced weight, not at the dense one;
- a low-rank layer ``name`` became ``name.0`` then ``name.1``: the reference gets, at
  ``name``, the dense layer then an identity, so ``name.1`` (the factor holding the bias)
  is refit to the dense layer's output from what ``name.0`` gives it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vbxfx.modules import is_compressed
from vbxfx.modules.swap import replace_module
from vbxfx.shrink.apply import ShrinkRecord

__all__ = ["reference_for", "structure_targets", "dense_refits", "sliced_output"]


def reference_for(reference: nn.Module, record: ShrinkRecord | None) -> nn.Module:
    """A copy of the dense ``reference`` with names for the low-rank factors."""
    ref = copy.deepcopy(reference)
    for name in (record.ranks if record else ()):
        old = ref.get_submodule(name)
        replace_module([ref], name, old, nn.Sequential(old, nn.Identity()))
    return ref


def structure_targets(record: ShrinkRecord | None) -> dict[str, torch.Tensor]:
    """Per layer of the shrunk model, the dense output channels it computes."""
    if record is None:
        return {}
    out = {}
    for name, idx in record.out_index.items():
        out[f"{name}.1" if name in record.ranks else name] = idx
    return out


def dense_refits(model: nn.Module, record: ShrinkRecord | None) -> list[str]:
    """The dense (not compressed) layers to refit: consumers of pruned channels and the
    second low-rank factors."""
    if record is None:
        return []
    names = [n for n in record.in_index if n not in record.ranks]
    names += [f"{n}.1" for n in record.ranks]
    mods = dict(model.named_modules())
    return [n for n in names if n in mods and not is_compressed(mods[n])]


def sliced_output(layer: nn.Module, y: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``y`` (a dense layer's output) at the channels ``idx`` the shrunk ``layer`` computes."""
    if idx is None:
        return y
    dim = 1 if isinstance(layer, nn.Conv2d) else y.dim() - 1
    return y.index_select(dim, idx.to(y.device))
