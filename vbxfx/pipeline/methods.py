"""``vbxfx.compress(..., methods=("channels", "lowrank", "sparsity"))``: one budget, three means.

The pipeline: trace, AnalyzeLayers, channel groups (:mod:`vbxfx.analysis.channel_groups`),
one allocation over every channel step, low-rank rank and VBX level
(:func:`vbxfx.allocation.joint.joint_allocation`), the :class:`~vbxfx.passes.Shrink` pass on
the traced copy, a new trace of the smaller model, Rewrite at the chosen levels, then, with
calibration data, the sequential refit against the original dense model
(:mod:`vbxfx.refit.structure`: the consumers of pruned channels are refit by least squares).
With calibration data the costs, the channel order, the bias correction of pruned channels
and the low-rank weighting use every layer's input moments measured on the data
(:func:`~vbxfx.allocation.noise.measured_statistics`), and where sparsity alone reaches the
target, its plan as ``compress`` without ``methods`` makes it (from the BatchNorms'
statistics) is built and refit too, and the one closer to the dense model on the data kept.

``compression`` is here the fraction of the **whole** original model's dense hardware MACs
to remove (channel pruning also shrinks depthwise convolutions and other layers the VBX
levels cannot touch); ``report["achieved"]`` is the fraction removed, against the original.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vbxfx.allocation.joint import METHODS, joint_allocation
from vbxfx.allocation.noise import measured_statistics
from vbxfx.allocation.sensitivity import calib_batches, layer_statistics, output_divergence
from vbxfx.analysis.channel_groups import channel_groups
from vbxfx.analysis.trace import eval_mode, get_root, trace
from vbxfx.errors import ConfigError
from vbxfx.passes.allocate import Allocation
from vbxfx.passes.analyze_layers import AnalyzeLayers
from vbxfx.passes.reconstruct import Reconstruct
from vbxfx.passes.rewrite import Rewrite
from vbxfx.passes.shrink import Shrink
from vbxfx.shrink.apply import ShrinkPlan

__all__ = ["check_methods", "compress_with_methods"]

logger = logging.getLogger(__name__)


def check_methods(methods: Any) -> tuple[str, ...]:
    """``methods`` as a tuple of known names, or ConfigError naming the accepted ones."""
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        out = tuple(dict.fromkeys(methods))
    except TypeError:
        raise ConfigError(f"methods must be a sequence of {METHODS}, got {methods!r}") from None
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise ConfigError(f"methods must be one or more of {METHODS}, got {methods!r}")
    return out


def compress_with_methods(model: nn.Module, example_inputs: Any, compression: float,
                          methods: tuple[str, ...], *, calib_data: Any, exclude: Any,
                          leaf_modules: Any, include_frozen: bool, pairing: bool,
                          refresh_every: int | None, refit: bool, refit_options: dict,
                          step: Callable, build_report: Callable) -> tuple[nn.Module, dict]:
    """The pipeline of the module docstring; returns the model and its report
    (``build_report``: :func:`vbxfx.pipeline.build_report`)."""
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
            or not 0 < float(compression) < 1:
        raise ConfigError(f"compression must be a fraction in (0, 1) of the model's dense "
                          f"hardware MACs, got {compression!r}")
    with step("trace"):
        gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    with step("analyze"):
        table = AnalyzeLayers(exclude=exclude, include_frozen=include_frozen)(gm).details
        groups = channel_groups(gm, table)
        stats = layer_statistics(gm)
    root = get_root(gm)
    stored = stats
    if calib_data is not None:              # the channels' moments as the data has them
        stats = measured_statistics(root, stats, calib_batches(calib_data))
    modules = dict(root.named_modules())
    weights = {l.name: modules[l.name].weight for l in table
               if l.name in modules and isinstance(getattr(modules[l.name], "weight", None),
                                                   nn.Parameter)}
    with step("allocate"):
        plan = joint_allocation(table, groups, weights, stats, float(compression), methods,
                                modules)
    plans = [plan]
    plain = _sparsity_alone(table, groups, weights, stored, float(compression), methods) \
        if refit else None
    if plain is not None and (plan.kept, plan.ranks, plan.repeats) != ({}, {}, plain.repeats):
        plans.append(plain)                # what sparsity alone does, judged on the data too
    built = [_build(p, gm, model, example_inputs, leaf_modules, exclude, include_frozen,
                    pairing, refresh_every, refit, calib_data, refit_options, step, stats)
             for p in plans]
    chosen = 0
    scores = None
    if len(built) > 1:
        scores = [_divergence(model, b[0], calib_data) for b in built]
        chosen = min(range(len(built)), key=lambda i: (scores[i], i))
        logger.info("compress: output divergence on the calibration data %.4g with the joint "
                    "plan, %.4g with sparsity alone: %s kept", scores[0], scores[1],
                    "the joint plan" if chosen == 0 else "sparsity alone")
    plan = plans[chosen]
    compressed, small, records, record, result = built[chosen]
    alloc = Allocation(repeats={n: r.repeat for n, r in records.items()},
                       compressions={n: r.compression for n, r in records.items()},
                       target=float(compression), budget="macs", fmt="comp",
                       achieved=plan.achieved, sensitivity="weight", per_layer=(),
                       total_sensitivity=plan.cost, lower_bound=plan.cost, exact=True,
                       total_before=plan.macs_before)
    report = build_report(small, alloc, records, compressed)
    _against_original(report, table, plan, record, groups, methods)
    if scores is not None:
        report["shrink"]["selection"] = {"joint": scores[0], "sparsity_alone": scores[1],
                                         "kept": "joint" if chosen == 0 else "sparsity_alone"}
    if result is not None:
        n = max(1, len(result.layers))
        report["reconstruct"] = {
            "method": result.method, "layers": len(result.layers),
            "dense_layers": len(result.layers) - len(result.compressed),
            "forwards": result.forwards,
            "mean_output_error": [sum(r.error_before for r in result.layers) / n,
                                  sum(r.error_after for r in result.layers) / n],
            "output_error": {r.name: [r.error_before, r.error_after] for r in result.layers}}
    return compressed, report


def _sparsity_alone(table, groups, weights, stats, target, methods):
    """The plan of the VBX levels alone, priced as ``compress`` without ``methods`` prices
    them (the BatchNorms' statistics), or None when they cannot reach ``target``."""
    if "sparsity" not in methods:
        return None
    try:
        return joint_allocation(table, groups, weights, stats, target, ("sparsity",))
    except ConfigError:
        return None


def _build(plan, gm, model, example_inputs, leaf_modules, exclude, include_frozen, pairing,
           refresh_every, refit, calib_data, refit_options, step, stats):
    """``plan`` applied to a copy of ``gm``'s root: ``(model, table, records, shrink record,
    refit result)``."""
    copy_gm = trace(get_root(gm), example_inputs, leaf_modules=leaf_modules)
    with step("shrink"):
        AnalyzeLayers(exclude=exclude, include_frozen=include_frozen)(copy_gm)
        record = Shrink(ShrinkPlan(plan.kept, plan.ranks, plan.spatial),
                        stats=stats)(copy_gm).details
        small_gm = trace(get_root(copy_gm), example_inputs, leaf_modules=leaf_modules)
        small = AnalyzeLayers(include_frozen=include_frozen)(small_gm).details
    levels = {n: r for n, r in plan.repeats.items() if n in small and small[n].eligible}
    with step("rewrite"):
        records = Rewrite(levels, pairing=pairing, refresh_every=refresh_every)(
            small_gm).details if levels else {}
    result = None
    if refit and (records or record.in_index or record.ranks):
        result = Reconstruct(model, calib_data, structure=record, **refit_options)(
            small_gm).details
    return get_root(small_gm), small, records, record, result


@torch.no_grad()
def _divergence(dense: nn.Module, small: nn.Module, calib_data: Any) -> float:
    """Mean output divergence of ``small`` from ``dense`` on the calibration batches."""
    batches = calib_batches(calib_data)
    with eval_mode(dense), eval_mode(small):
        return sum(output_divergence(dense(*b), small(*b)) for b in batches) / len(batches)


def _against_original(report, table, plan, record, groups, methods) -> None:
    """Totals against the original dense model, and what the shrink did."""
    totals = report["totals"]
    after = totals["macs_after"]
    if after != plan.macs_after:
        logger.warning("compress: the smaller model has %s hardware MACs, the allocation "
                       "counted %s", f"{after:,}", f"{plan.macs_after:,}")
    before = plan.macs_before
    totals.update(macs_before=before, hw_macs_dense=before, macs_removed=1 - after / before,
                  macs=table.total_macs,
                  params_before=sum(math.prod(l.weight_shape) for l in table))
    report["achieved"] = 1 - after / before
    report["achieved_of_eligible"] = None
    report["methods"] = list(methods)
    report["shrink"] = {
        "groups": [{"name": g.name, "channels": g.channels,
                    "kept": record.groups.get(g.name, (g.channels, g.channels))[0],
                    "producers": list(g.producers),
                    "consumers": [c for c, _ in g.consumers],
                    "prunable": g.prunable, "reason": g.reason} for g in groups.values()],
        "low_rank": dict(record.ranks),
        "spatial": sorted(record.spatial),
        "channel_cost": plan.channel_cost, "cost": plan.cost,
        "record": record.to_dict(),
    }
    for row in report["layers"]:
        if row["name"] in table:
            row["weight_shape_before"] = list(table[row["name"]].weight_shape)


