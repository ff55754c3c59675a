"""Shrink: make layers physically smaller, pruning channel groups and factorising layers.

A transform pass over an analysed GraphModule: it applies a :class:`~vbxfx.shrink.ShrinkPlan`
(kept channels per :class:`~vbxfx.analysis.channel_groups.ChannelGroup`, a rank per low-rank
layer) to ``gm.meta["vbxfx.root"]`` by module swaps (:func:`vbxfx.shrink.apply_shrink`). The
GraphModule itself is then stale (its shapes are the old ones): trace the root again before
any other pass. With ``bias_correction`` (the default), each consumer's bias takes the mean
contribution of the input channels it lost, from the BatchNorm statistics before it (or
the ``stats`` given, e.g. measured on calibration data).

>>> gm = vbxfx.trace(model, x); AnalyzeLayers()(gm)                       # doctest: +SKIP
>>> record = Shrink(ShrinkPlan(kept={"layer1.0.conv1": range(32)}))(gm).details  # doctest: +SKIP
>>> record.in_index["layer1.0.conv2"].numel()                              # doctest: +SKIP
32
"""

from __future__ import annotations

import logging

import torch.fx

from vbxfx.allocation.sensitivity import layer_statistics
from vbxfx.analysis.channel_groups import channel_groups
from vbxfx.analysis.trace import get_root
from vbxfx.passes.analyze_layers import layer_table
from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.shrink.apply import ShrinkPlan, apply_shrink

__all__ = ["Shrink"]

logger = logging.getLogger(__name__)


class Shrink(GraphPass):
    """Transform pass (in place, on the root model): apply a shrink plan.

    Returns ``PassResult(gm, modified, details=ShrinkRecord)``.

    Raises:
        ConfigError: an unknown or unprunable group, bad channel indices or ranks; raised
            before any module changes.
        KeyError: AnalyzeLayers has not run on the GraphModule.
    """

    in_place = True
    changes_input = True

    def __init__(self, plan: ShrinkPlan, bias_correction: bool = True,
                 stats: dict | None = None):
        self.plan = plan
        self.bias_correction = bias_correction
        self.stats = stats

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        groups = channel_groups(gm, layer_table(gm))
        stats = self.stats if self.stats is not None else layer_statistics(gm)
        means = {n: st.in_mean for n, st in stats.items()
                 if st.in_mean is not None} if self.bias_correction else None
        rms = {n: (st.in_var + st.in_mean.square()).clamp(min=0).sqrt()
               for n, st in stats.items() if st.in_var is not None}
        record = apply_shrink(get_root(gm), groups, self.plan, means, rms)
        return PassResult(gm, modified=bool(record.out_index or record.ranks), details=record)
