"""Apply a shrink plan to a model: the kept channels of each channel group, the low-rank layers.

A :class:`ShrinkPlan` names, for each pruned :class:`~vbxfx.analysis.channel_groups.ChannelGroup`,
the channels it keeps, and, for each low-rank layer, its rank. :func:`apply_shrink` checks the
whole plan first (nothing changes when any part is wrong), then swaps every affected module
at its name for a smaller one (:mod:`vbxfx.shrink.slicing`): producers lose output channels,
BatchNorms and depthwise convolutions on the way lose the same channels, consumers lose the
input channels (at their offset after a concatenation), and a low-rank layer becomes an
``nn.Sequential`` of its two factors. With ``in_means`` (the mean of every consumer's input
channels), what a removed channel contributed on average goes into the consumer's bias.

The :class:`ShrinkRecord` maps every changed module to the channels of the original it
keeps, which the refit (:mod:`vbxfx.refit.structure`) uses to compare with the dense model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vbxfx.analysis.channel_groups import ChannelGroup
from vbxfx.errors import ConfigError
from vbxfx.modules.swap import replace_module
from vbxfx.shrink.slicing import (low_rank_factors, sliced_batchnorm, sliced_depthwise,
                                  sliced_layer, spatial_factors)

__all__ = ["ShrinkPlan", "ShrinkRecord", "apply_shrink"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShrinkPlan:
    """``kept``: group name -> the channel indices it keeps; ``ranks``: layer -> rank;
    ``spatial``: the layers of ``ranks`` factorised by kernel axis (a ``kh x 1`` then a
    ``1 x kw`` convolution) instead of by channels (a ``kh x kw`` then a ``1 x 1``)."""

    kept: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    spatial: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.kept) or bool(self.ranks)


@dataclasses.dataclass
class ShrinkRecord:
    """Per changed module, the original's channels it keeps (index tensors)."""

    out_index: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    in_index: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    through: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    spatial: set[str] = dataclasses.field(default_factory=set)
    #: group name -> (kept, channels)
    groups: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly (the report's ``shrink.record``); :meth:`from_dict` reads it back."""
        lists = lambda d: {k: [int(i) for i in v] for k, v in d.items()}  # noqa: E731
        return {"out_index": lists(self.out_index), "in_index": lists(self.in_index),
                "through": lists(self.through), "ranks": dict(self.ranks),
                "spatial": sorted(self.spatial),
                "groups": {k: list(v) for k, v in self.groups.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> ShrinkRecord:
        try:
            tensors = lambda key: {k: torch.tensor(v, dtype=torch.long)  # noqa: E731
                                   for k, v in d[key].items()}
            return cls(tensors("out_index"), tensors("in_index"), tensors("through"),
                       {k: int(v) for k, v in d["ranks"].items()},
                       set(d.get("spatial", ())),
                       {k: (int(a), int(b)) for k, (a, b) in d["groups"].items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a shrink record ({type(e).__name__}: {e}); expected the "
                              "report's shrink.record") from None

    def factor_names(self) -> list[str]:
        """The layers the low-rank factorisation created (``name.0``, ``name.1``)."""
        return [f"{n}.{k}" for n in self.ranks for k in (0, 1)]


def _index(group: ChannelGroup, kept: Sequence[int]) -> torch.Tensor:
    try:
        idx = sorted({int(c) for c in kept})
    except (TypeError, ValueError):
        raise ConfigError(f"channel group {group.name!r}: kept channels must be integers, "
                          f"got {kept!r}") from None
    if len(idx) != len(kept) or not idx or idx[0] < 0 or idx[-1] >= group.channels:
        raise ConfigError(f"channel group {group.name!r}: kept channels must be distinct "
                          f"indices in 0..{group.channels - 1}, at least one; got "
                          f"{len(kept)} value(s) {list(kept)[:6]}...")
    return torch.tensor(idx, dtype=torch.long)


def _check_rank(root: nn.Module, name: str, rank, spatial: bool) -> None:
    try:
        mod = root.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"low-rank layer {name!r}: no such module") from None
    if type(mod) not in (nn.Conv2d, nn.Linear) or getattr(mod, "groups", 1) != 1:
        raise ConfigError(f"low-rank layer {name!r} is a {type(mod).__name__}; a plain Conv2d "
                          "(groups=1) or Linear is needed")
    o, i = mod.weight.shape[:2]
    most = min(o, i * mod.weight[0, 0].numel())
    if spatial:
        if not isinstance(mod, nn.Conv2d) or min(mod.kernel_size) < 2 \
                or isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            raise ConfigError(f"spatial low-rank layer {name!r}: a Conv2d with a kernel of at "
                              "least 2x2 and numeric zero padding is needed")
        most = min(i * mod.kernel_size[0], o * mod.kernel_size[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < most:
        raise ConfigError(f"low-rank layer {name!r}: rank must be an integer in 1.."
                          f"{most - 1}, got {rank!r}")


def apply_shrink(root: nn.Module, groups: Mapping[str, ChannelGroup], plan: ShrinkPlan,
                 in_means: Mapping[str, torch.Tensor] | None = None,
                 in_rms: Mapping[str, torch.Tensor] | None = None) -> ShrinkRecord:
    """Apply ``plan`` to ``root`` in place (module docstring); returns what changed.

    ``in_rms``: per layer, the root mean square of its input channels (the low-rank SVD
    weighs by it). Raises ConfigError, before any change, for an unknown or unprunable
    group, bad indices or ranks.
    """
    record = ShrinkRecord()
    removed_in: dict[str, list[torch.Tensor]] = {}
    for name, kept in plan.kept.items():
        group = groups.get(name)
        if group is None:
            raise ConfigError(f"no channel group {name!r}; groups: {sorted(groups)[:6]}...")
        if not group.prunable:
            raise ConfigError(f"channel group {name!r} cannot be pruned: {group.reason}")
        idx = _index(group, kept)
        record.groups[name] = (len(idx), group.channels)
        if len(idx) == group.channels:
            continue
        gone = torch.tensor(sorted(set(range(group.channels)) - set(idx.tolist())))
        for p in group.producers:
            record.out_index[p] = idx
        for t in group.through:
            record.through[t] = idx
        for c, offset in group.consumers:
            removed_in.setdefault(c, []).append(gone + offset)
    if not set(plan.spatial) <= set(plan.ranks):
        raise ConfigError(f"spatial layers {sorted(set(plan.spatial) - set(plan.ranks))} have "
                          "no rank in the plan")
    for name, rank in plan.ranks.items():
        _check_rank(root, name, rank, name in plan.spatial)
    for c, parts in removed_in.items():
        width = root.get_submodule(c).weight.shape[1]
        gone = set(torch.cat(parts).tolist())
        record.in_index[c] = torch.tensor([i for i in range(width) if i not in gone])
    with torch.no_grad():
        for name in dict.fromkeys(list(record.out_index) + list(record.in_index)):
            old = root.get_submodule(name)
            new = sliced_layer(old, record.out_index.get(name), record.in_index.get(name))
            if name in record.in_index and in_means and name in in_means:
                _compensate(old, new, record.in_index[name], in_means[name],
                            record.out_index.get(name))
            replace_module([root], name, old, new)
        for name, idx in record.through.items():
            old = root.get_submodule(name)
            new = sliced_depthwise(old, idx) if isinstance(old, nn.Conv2d) \
                else sliced_batchnorm(old, idx)
            replace_module([root], name, old, new)
        for name, rank in plan.ranks.items():
            old = root.get_submodule(name)
            rms = (in_rms or {}).get(name)
            if rms is not None and name in record.in_index:
                rms = rms[record.in_index[name]]
            factor = spatial_factors if name in plan.spatial else low_rank_factors
            replace_module([root], name, old, factor(old, int(rank), rms))
            record.ranks[name] = int(rank)
            if name in plan.spatial:
                record.spatial.add(name)
    logger.info("shrink: %d group(s) pruned, %d layer(s) low-rank",
                sum(k < n for k, n in record.groups.values()), len(record.ranks))
    return record


def _compensate(old: nn.Module, new: nn.Module, kept: torch.Tensor, means: torch.Tensor,
                out_index: torch.Tensor | None) -> None:
    """Add the removed input channels' mean contribution to ``new``'s bias."""
    mask = torch.ones(old.weight.shape[1], dtype=torch.bool)
    mask[kept] = False
    w = old.weight.detach()[:, mask]
    m = means.to(w)[mask]
    delta = (w.reshape(w.shape[0], w.shape[1], -1).sum(-1) * m[None, :]).sum(1)
    if out_index is not None:
        delta = delta[out_index.to(delta.device)]
    if new.bias is None:
        new.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=new.weight.requires_grad)
    new.bias.add_(delta.to(new.bias))
