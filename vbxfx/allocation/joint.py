"""One allocation over channel pruning, low-rank factors and the VBX levels, in one budget.

The budget is the *original* model's dense hardware MACs (every layer, depthwise and the
other multiply-heavy ops included); ``target`` is the fraction of it to remove. The costs
are the data-free noise-to-signal ratios of :mod:`vbxfx.allocation.sensitivity`, one unit
for every choice:

- a VBX level of a layer: its projection's ratio (as the sparsity-only allocation);
- removing channel ``c`` of a :class:`~vbxfx.analysis.channel_groups.ChannelGroup`: the sum
  over its consumers of the ratio of losing input channel ``c``, its mean moved into the
  bias (:func:`~vbxfx.allocation.sensitivity.column_ratios`); a group's channels go in the
  order of that cost, least first, in steps that keep a multiple of 8;
- a layer as two low-rank factors at a rank that leaves 1/2 or 1/4 of its dense MACs, by
  channels (weight SVD, :func:`vbxfx.shrink.slicing.low_rank_factors`) or, for a ``kh x kw``
  convolution, by kernel axis (spatial SVD, :func:`vbxfx.shrink.slicing.spatial_factors`),
  both weighted by the input's second moments: the ratio of the truncated weight's error.

Channel choices change the MACs of several layers at once, so the search is in two levels.
Channel steps are taken greedily, least cost per MAC removed first, giving a path of channel
states; at each state an exact multiple-choice knapsack (:func:`solve_mckp`) picks every
layer's level (dense, 2:4, 1:4 or low-rank) to reach the target on the pruned shapes. The
state with the least total cost wins. The first state prunes nothing: the plain sparsity
allocation, so the joint plan's cost is never above it (:func:`vbxfx.compress` also judges
the two on calibration data, :mod:`vbxfx.pipeline.methods`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vbxfx.allocation.knapsack import solve_mckp
from vbxfx.allocation.sensitivity import (LayerStats, column_ratios, noise_ratio,
                                          weight_sensitivity)
from vbxfx.analysis.channel_groups import ChannelGroup
from vbxfx.analysis.layers import LayerInfo, LayerTable
from vbxfx.errors import ConfigError
from vbxfx.format.cost import hardware_macs, padded_channels

__all__ = ["JointPlan", "joint_allocation", "METHODS", "KEEP_FRACTIONS", "RANK_FRACTIONS"]

logger = logging.getLogger(__name__)

METHODS = ("sparsity", "channels", "lowrank")
#: Fractions of a group's channels a step may keep (rounded down to a multiple of 8).
KEEP_FRACTIONS = (7 / 8, 3 / 4, 5 / 8, 1 / 2, 3 / 8, 1 / 4)
#: Fractions of a layer's dense MACs its low-rank factors may cost.
RANK_FRACTIONS = (1 / 2, 1 / 4)
#: Most channel states the knapsack is solved at (evenly spaced along the path).
MAX_STATES = 96
#: Weight of the structured costs (channels, low-rank) against the VBX levels' costs. The
#: one unit prices a removed channel and a 1:4 projection alike by the output noise they add;
#: measured on MobileNetV2 with the calibrated refit (BENCHMARKS.md, issue 24), the refit
#: takes back more of a projection's noise than of a missing channel's, and plans made with
#: structured costs x4 agree best with the dense model (x1, x2, x8, x16, x64 tried).
STRUCTURED_WEIGHT = 4.0


@dataclasses.dataclass(frozen=True)
class JointPlan:
    """The chosen plan: kept channels per group, ranks, and every remaining layer's repeat."""

    kept: dict[str, tuple[int, ...]]
    ranks: dict[str, int]
    repeats: dict[str, int]
    cost: float
    channel_cost: float
    macs_before: int
    macs_after: int
    states: int
    #: The layers of ``ranks`` split by kernel axis (spatial SVD).
    spatial: frozenset[str] = frozenset()

    @property
    def achieved(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def _keep_levels(n: int) -> list[int]:
    levels = {max(8, (int(n * f) // 8) * 8) for f in KEEP_FRACTIONS}
    return sorted((k for k in levels if k < n), reverse=True)


class _Costs:
    """MACs of every layer for given channel keeps (``out``/``inn``: kept counts)."""

    def __init__(self, table: LayerTable, groups: Sequence[ChannelGroup]):
        self.layers = list(table)
        self.other = table.other_macs
        self.prod = {p: g.name for g in groups for p in g.producers}
        self.cons: dict[str, list[tuple[str, int]]] = {}
        for g in groups:
            for c, _ in g.consumers:
                self.cons.setdefault(c, []).append((g.name, g.channels))
        self.thru = {t: g.name for g in groups for t in g.through}

    def shape(self, layer: LayerInfo, keep: Mapping[str, int]) -> tuple[int, int]:
        if layer.name in self.thru:
            k = keep.get(self.thru[layer.name], None)
            return (k, k) if k is not None else (layer.out_channels, layer.in_channels)
        out = keep.get(self.prod.get(layer.name), layer.out_channels)
        inn = layer.in_channels - sum(n - keep.get(g, n) for g, n in self.cons.get(layer.name, ()))
        return out, inn

    def dense(self, layer: LayerInfo, keep: Mapping[str, int], repeat: int = 4) -> int:
        out, inn = self.shape(layer, keep)
        if layer.block_layout:
            base = layer.hw_macs[repeat] if layer.eligible else layer.hw_macs[4]
            return base * out * padded_channels(inn) // (layer.out_channels
                                                         * padded_channels(layer.in_channels))
        return layer.macs * out // max(1, layer.out_channels)

    def lowrank(self, layer: LayerInfo, keep: Mapping[str, int], rank: int) -> int:
        out, inn = self.shape(layer, keep)
        n = layer.calls
        return n * (hardware_macs(rank, inn, layer.kernel_positions, layer.output_positions, 4)
                    + hardware_macs(out, rank, 1, layer.output_positions, 4))

    def spatial(self, layer: LayerInfo, keep: Mapping[str, int], rank: int, geom) -> int:
        """MACs of the ``kh x 1`` and ``1 x kw`` factors (``geom``: kh, kw, middle width)."""
        out, inn = self.shape(layer, keep)
        kh, kw, mid = geom
        h, w = layer.out_shape[-2], layer.out_shape[-1]
        return layer.calls * (hardware_macs(rank, inn, kh, h * mid, 4)
                              + hardware_macs(out, rank, kw, h * w, 4))

    def total(self, keep: Mapping[str, int]) -> int:
        return sum(self.dense(l, keep) for l in self.layers) + self.other


def _ranks(layer: LayerInfo) -> list[int]:
    o, k = layer.out_channels, layer.in_channels * layer.kernel_positions
    out = []
    for f in RANK_FRACTIONS:
        r = (int(f * o * k / (o + k)) // 8) * 8
        if 8 <= r < min(o, k) and r not in out:
            out.append(r)
    return out


def _geometry(layer: LayerInfo, module) -> tuple[int, int, int] | None:
    """``(kh, kw, middle width)`` of a convolution a spatial SVD can split, else None."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 \
            or min(module.kernel_size) < 2 or isinstance(module.padding, str) \
            or module.padding_mode != "zeros" or len(layer.in_shape) != 4:
        return None
    kh, kw = module.kernel_size
    mid = layer.in_shape[-1] + 2 * module.padding[1] - module.dilation[1] * (kw - 1)
    return kh, kw, mid


def _spatial_ranks(layer: LayerInfo, geom) -> list[int]:
    kh, kw, mid = geom
    o, i, w = layer.out_channels, layer.in_channels, layer.out_shape[-1]
    out = []
    for f in RANK_FRACTIONS:
        r = (int(f * o * kh * kw * i * w / (i * kh * mid + o * kw * w)) // 8) * 8
        if 8 <= r < min(i * kh, o * kw) and r not in out:
            out.append(r)
    return out


def _lowrank_ratio(w: torch.Tensor, st: LayerStats | None, rank: int,
                   spatial: bool = False) -> float:
    w = w.detach().double()
    rms = torch.ones(w.shape[1], dtype=w.dtype)
    if st is not None and st.in_var is not None:
        rms = (st.in_var.double() + st.in_mean.double().square()).clamp(min=1e-12).sqrt()
    view = (1, -1) + (1,) * (w.dim() - 2)
    scaled = w * rms.view(view)
    if spatial:                                         # rows (I, kh), columns (O, kw)
        o, i, kh, kw = w.shape
        u, s, vh = torch.linalg.svd(scaled.permute(1, 2, 0, 3).reshape(i * kh, o * kw),
                                    full_matrices=False)
        approx = ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(i, kh, o, kw)
        approx = approx.permute(2, 0, 1, 3) / rms.view(view)
    else:
        u, s, vh = torch.linalg.svd(scaled.reshape(w.shape[0], -1), full_matrices=False)
        approx = ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape) / rms.view(view)
    return STRUCTURED_WEIGHT * noise_ratio(w, w - approx, st)


def channel_order(group: ChannelGroup, weights: Mapping[str, torch.Tensor],
                  stats: Mapping[str, LayerStats]) -> tuple[list[int], list[float]]:
    """The group's channels, least costly to remove first, and each one's cost."""
    cost = torch.zeros(group.channels, dtype=torch.float64)
    for c, offset in group.consumers:
        cost += column_ratios(weights[c], stats.get(c))[offset:offset + group.channels].double()
    cost *= STRUCTURED_WEIGHT
    order = torch.argsort(cost, stable=True).tolist()
    return order, [float(cost[i]) for i in order]


def joint_allocation(table: LayerTable, groups: Mapping[str, ChannelGroup],
                     weights: Mapping[str, torch.Tensor], stats: Mapping[str, LayerStats],
                     target: float, methods: Sequence[str] = METHODS,
                     modules: Mapping[str, nn.Module] | None = None) -> JointPlan:
    """The least-cost plan removing ``target`` of the original dense hardware MACs
    (module docstring). ``weights``: every Conv/Linear layer's weight by name; ``modules``:
    the layers themselves, for the spatial SVD's geometry (without them, weight SVD only).

    Raises:
        ConfigError: a target the chosen methods cannot reach (the message says the most).
    """
    use = set(methods)
    prunable = [g for g in groups.values() if g.prunable and "channels" in use
                and _keep_levels(g.channels)]
    costs = _Costs(table, prunable)
    before = costs.total({})
    demand = math.ceil(float(target) * before)
    eligible = [l for l in table if l.eligible and l.name not in costs.thru]
    sens = weight_sensitivity({l.name: weights[l.name] for l in eligible},
                              (2, 1) if "sparsity" in use else (), "comp", stats)
    low = {}
    if "lowrank" in use:
        for l in eligible:
            low[l.name] = [("lowrank", r, _lowrank_ratio(weights[l.name], stats.get(l.name), r),
                            None) for r in _ranks(l)]
            geom = _geometry(l, (modules or {}).get(l.name))
            if geom is not None:
                low[l.name] += [("spatial", r, _lowrank_ratio(weights[l.name], stats.get(l.name),
                                                              r, spatial=True), geom)
                                for r in _spatial_ranks(l, geom)]
    orders = {g.name: channel_order(g, weights, stats) for g in prunable}
    path = _channel_path(prunable, orders, costs)
    step = max(1, math.ceil(len(path) / MAX_STATES))
    picks = list(range(0, len(path), step))
    if picks[-1] != len(path) - 1:
        picks.append(len(path) - 1)
    best, most = None, 0
    for i in picks:
        keep, ccost = path[i]
        result = _levels(table, costs, keep, sens, low, before, demand)
        if result is None:
            most = max(most, before - _floor(table, costs, keep, sens, low))
            continue
        choice, lcost, after = result
        if best is None or ccost + lcost < best[0]:
            best = (ccost + lcost, ccost, keep, choice, after)
    if best is None:
        raise ConfigError(f"target {target:g} of the whole model's dense hardware MACs cannot "
                          f"be met with methods {tuple(methods)}: at most "
                          f"{most / before:.4f} (add methods, or lower the target)")
    total, ccost, keep, choice, after = best
    plan = _plan(groups, orders, keep, choice, total, ccost, before, after, len(picks))
    logger.info("joint allocation: %d group(s) pruned, %d low-rank, %d at 2:4, %d at 1:4; "
                "%.4f of %s dense hardware MACs removed (cost %.4g, %d channel states)",
                len(plan.kept), len(plan.ranks), sum(r == 2 for r in plan.repeats.values()),
                sum(r == 1 for r in plan.repeats.values()), plan.achieved, f"{before:,}", total,
                len(picks))
    return plan


def _plan(groups, orders, keep, choice, total, ccost, before, after, states):
    kept = {g: tuple(sorted(orders[g][0][groups[g].channels - k:])) for g, k in keep.items()}
    ranks = {n: v[1] for n, v in choice.items() if v[0] in ("lowrank", "spatial")}
    spatial = frozenset(n for n, v in choice.items() if v[0] == "spatial")
    repeats = {n: v[1] for n, v in choice.items() if v[0] == "repeat"}
    return JointPlan(kept, ranks, repeats, total, ccost, before, after, states, spatial)


def _channel_path(groups: list[ChannelGroup], orders, costs: _Costs):
    """Greedy channel states, ``[(keep, cost)]``, from nothing pruned to every group at its
    smallest level."""
    levels = {g.name: _keep_levels(g.channels) for g in groups}
    step = {g.name: 0 for g in groups}
    keep: dict[str, int] = {}
    cum = {g: [0.0] + list(_cumsum(orders[g][1])) for g in levels}
    members = {g.name: set(g.producers) | {c for c, _ in g.consumers} | set(g.through)
               for g in groups}
    by_name = {l.name: l for l in costs.layers}
    total, path = 0.0, [({}, 0.0)]
    while True:
        best = None
        for g in groups:
            s = step[g.name]
            if s >= len(levels[g.name]):
                continue
            n, k_new = g.channels, levels[g.name][s]
            k_old = keep.get(g.name, n)
            d_loss = cum[g.name][n - k_new] - cum[g.name][n - k_old]
            trial = dict(keep, **{g.name: k_new})
            d_macs = sum(costs.dense(by_name[m], keep) - costs.dense(by_name[m], trial)
                         for m in members[g.name] if m in by_name)
            if d_macs <= 0:
                continue
            ratio = d_loss / d_macs
            if best is None or ratio < best[0]:
                best = (ratio, g.name, k_new, d_loss)
        if best is None:
            return path
        _, name, k_new, d_loss = best
        keep[name] = k_new
        step[name] += 1
        total += d_loss
        path.append((dict(keep), total))


def _cumsum(values):
    s = 0.0
    for v in values:
        s += v
        yield s


def _options(layer, costs, keep, sens, low, removed_base):
    dense = costs.dense(layer, keep)
    opts = [(0.0, removed_base - dense, ("repeat", 4))]
    for lv in (2, 1):
        if layer.name in sens and lv in sens[layer.name]:
            opts.append((sens[layer.name][lv], removed_base - costs.dense(layer, keep, lv),
                         ("repeat", lv)))
    for kind, r, ratio, geom in low.get(layer.name, ()):
        macs = costs.spatial(layer, keep, r, geom) if kind == "spatial" \
            else costs.lowrank(layer, keep, r)
        opts.append((ratio, removed_base - macs, (kind, r)))
    return opts


def _levels(table, costs, keep, sens, low, before, demand):
    """Knapsack over every layer's level at channel state ``keep``: ``(choice, cost,
    MACs after)``, or None when the demand is out of reach."""
    names, cs, ws, tags = [], [], [], []
    for layer in table:
        base = layer.cost(4)
        opts = _options(layer, costs, keep, sens, low, base)
        names.append(layer.name)
        cs.append([o[0] for o in opts])
        ws.append([max(0, o[1]) for o in opts])
        tags.append([o[2] for o in opts])
    if sum(max(w) for w in ws) < demand:
        return None
    r = solve_mckp(cs, ws, demand)
    choice = {n: t[j] for n, t, j in zip(names, tags, r.choice) if t[j] != ("repeat", 4)}
    return choice, r.cost, before - r.removed


def _floor(table, costs, keep, sens, low) -> int:
    """The fewest MACs reachable at channel state ``keep``."""
    total = costs.other
    for layer in table:
        total += min(layer.cost(4) - o[1] for o in _options(layer, costs, keep, sens, low,
                                                              layer.cost(4)))
    return total
