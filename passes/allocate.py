"""Allocate: choose 1:4 / 2:4 (or dense) per layer so the model meets a target at least cost.

Each eligible layer gets a level: repeat 1 (1:4), repeat 2 (2:4) or, with ``allow_dense``,
repeat 4 (dense); in the unstructured format a compression from :data:`UCOMP_GRID`. Each
level costs the layer's sensitivity there (:mod:`vbxfx.sensitivity`) and removes part of
the budget quantity:

- ``budget="macs"``: hardware MACs of the eligible layers as in the analysis table,
  channel padding included (``hw_macs[4] - hw_macs[R]``); for ``fmt="ucomp"`` the standard
  MACs times the compression;
- ``budget="params"``: weights of the eligible layers, R=2 removing 1/2 and R=1 3/4 of a
  layer's weights (the seed API's ``compression``: 0.5 = all 2:4, 0.75 = all 1:4).

The choice with least total sensitivity that removes at least ``target`` of the budget is a
multiple-choice knapsack, solved exactly by :func:`vbxfx.knapsack.solve_mckp` (with a
certified gap in the rare case its frontier had to be cut).

>>> gm = vbxfx.trace(model, torch.randn(1, 3, 224, 224))                # doctest: +SKIP
>>> AnalyzeLayers()(gm)                                                  # doctest: +SKIP
>>> alloc = vbxfx.allocate(gm, 0.66)                                     # doctest: +SKIP
>>> alloc.achieved >= 0.66, sorted(set(alloc.repeats.values()))          # doctest: +SKIP
(True, [1, 2])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import torch
import torch.fx
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.allocation.knapsack import solve_mckp
from vbxfx.analysis.layers import LayerInfo, LayerTable
from vbxfx.meta import LAYER_KEY, REPEAT_KEY, SENSITIVITY_KEY
from vbxfx.allocation.overrides import FORMATS, merged_overrides
from vbxfx.passes.analyze_layers import TABLE_KEY, AnalyzeLayers
from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.allocation.sensitivity import (eval_fn_sensitivity, layer_statistics, output_sensitivity,
                               weight_sensitivity)

__all__ = ["Allocate", "Allocation", "LayerAllocation", "allocate", "BUDGETS", "SENSITIVITIES",
           "UCOMP_GRID"]

logger = logging.getLogger(__name__)

BUDGETS = ("macs", "params")
SENSITIVITIES = ("weight", "output", "eval_fn")
#: Compressions (fraction of multiplies removed) the unstructured allocation chooses from.
UCOMP_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_COMP_FRACTION = {4: 0.0, 2: 0.5, 1: 0.75}
_SCALE = 10_000  # ucomp removals in 1/10000 of a MAC / weight, to keep them integers


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
    """One layer's choice: its level, its sensitivity per level, the budget before/after."""

    name: str
    repeat: int | None          # None in the unstructured format
    compression: float          # fraction of the layer's multiplies removed
    sensitivity: dict[Any, float]
    before: int                 # budget quantity dense (hardware MACs, MACs or weights)
    after: float
    overridden: bool


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The result of :func:`allocate`.

    ``repeats`` maps every eligible layer to 1, 2 or 4 (empty for ``fmt="ucomp"``);
    ``compressions`` maps every eligible layer to the fraction of its multiplies removed
    (0.5 / 0.75 / 0 for the structured levels). ``achieved`` is the fraction of the budget
    quantity removed, ``lower_bound`` a proven lower bound on the least total sensitivity
    (equal to ``total_sensitivity`` when ``exact``).
    """

    repeats: dict[str, int]
    compressions: dict[str, float]
    target: float
    budget: str
    fmt: str
    achieved: float
    sensitivity: str
    per_layer: tuple[LayerAllocation, ...]
    total_sensitivity: float
    lower_bound: float
    exact: bool
    total_before: int

    @property
    def gap(self) -> float:
        """Proven bound on how much lower the total sensitivity could be (0 when exact)."""
        return self.total_sensitivity - self.lower_bound

    def as_overrides(self) -> dict[str, float | str]:
        """This allocation in the ``json_file`` format (feed it back as ``overrides=``)."""
        return {name: ("dense" if c == 0.0 else c) for name, c in self.compressions.items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gap"] = self.gap
        d["per_layer"] = [dict(dataclasses.asdict(r), sensitivity={
            str(k): v for k, v in r.sensitivity.items()}) for r in self.per_layer]
        return d

    def __str__(self) -> str:
        levels = sorted({lv for r in self.per_layer for lv in r.sensitivity}, reverse=True)
        level_name = (lambda lv: f"R{lv}") if self.fmt == "comp" else (lambda lv: f"c{lv:g}")
        header = ("layer", "level", *(f"sens@{level_name(lv)}" for lv in levels),
                  f"{self.budget} before", "after", "")
        rows = [header]
        for r in self.per_layer:
            level = f"R{r.repeat}" if r.repeat is not None else f"c{r.compression:g}"
            rows.append((r.name or "(root)", level,
                         *(f"{r.sensitivity[lv]:.4g}" if lv in r.sensitivity else "-"
                           for lv in levels),
                         f"{r.before:,}", f"{r.after:,.0f}", "override" if r.overridden else ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        cert = "exact" if self.exact else f"gap <= {self.gap:.4g}"
        lines.append(f"target {self.target:g} of {self.budget} ({self.fmt}), achieved "
                     f"{self.achieved:.4f}; total {self.sensitivity} sensitivity "
                     f"{self.total_sensitivity:.6g} ({cert})")
        return "\n".join(lines)


def _check_options(target: Any, budget: str, sensitivity: Any, fmt: str, allow_dense: Any,
                   eval_fn: Any, calib_data: Any) -> str:
    """Validate the options; return the sensitivity method's name."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) \
            or not math.isfinite(target) or not 0.0 <= float(target) < 1.0:
        raise ConfigError(f"target must be the fraction of the budget to remove, in [0, 1), "
                          f"got {target!r}")
    if budget not in BUDGETS:
        raise ConfigError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(allow_dense, bool):
        raise ConfigError(f"allow_dense must be True or False, got {allow_dense!r}")
    if isinstance(sensitivity, Mapping):
        return "given"
    if eval_fn is not None and sensitivity == "weight":
        sensitivity = "eval_fn"  # an eval_fn given without naming the method: use it
    if sensitivity not in SENSITIVITIES:
        raise ConfigError(f"sensitivity must be one of {SENSITIVITIES} or a mapping "
                          f"{{layer: {{level: value}}}}, got {sensitivity!r}")
    if sensitivity == "eval_fn" and not callable(eval_fn):
        raise ConfigError("sensitivity='eval_fn' needs eval_fn=callable(model) -> float")
    if sensitivity != "eval_fn" and eval_fn is not None:
        raise ConfigError(f"eval_fn is given but sensitivity={sensitivity!r}; pass "
                          "sensitivity='eval_fn' (or leave it at its default)")
    if sensitivity == "output" and calib_data is None:
        raise ConfigError("sensitivity='output' needs calib_data (a few input batches)")
    return sensitivity


def allocate(gm_or_table: torch.fx.GraphModule | LayerTable, target: float, *,
             budget: str = "macs", sensitivity: str | Mapping = "weight",
             json_file: str | os.PathLike | None = None,
             overrides: Mapping[str, Any] | None = None, allow_dense: bool = False,
             calib_data: Any = None, eval_fn: Callable[[nn.Module], float] | None = None,
             model: nn.Module | None = None, fmt: str = "comp") -> Allocation:
    """Choose each eligible layer's level so that ``target`` of the budget is removed at the
    least total sensitivity.

    Args:
        gm_or_table: a traced GraphModule (AnalyzeLayers is run if it has no table yet) or
            a LayerTable (then ``model`` supplies the weights).
        target: fraction of the budget quantity to remove, e.g. 0.66.
        budget: ``"macs"`` (hardware MACs of the eligible layers) or ``"params"``.
        sensitivity: ``"weight"`` (data-free), ``"output"`` (needs ``calib_data``),
            ``"eval_fn"`` (needs ``eval_fn``; implied when ``eval_fn`` is given), or a
            precomputed mapping ``{layer: {level: value}}``; see :mod:`vbxfx.sensitivity`.
        json_file / overrides: per-layer fixed levels (:mod:`vbxfx.overrides`); ``overrides``
            wins over ``json_file``. The other layers make up the difference to the target.
        allow_dense: let the solver keep too-sensitive layers dense.
        calib_data: calibration batches for ``sensitivity="output"``.
        eval_fn: ``eval_fn(model) -> float``, higher is better.
        model: the module whose weights are read and, for ``"output"``/``"eval_fn"``,
            temporarily projected layer by layer (restored exactly); default: the
            GraphModule itself.
        fmt: ``"comp"`` (repeats 1/2/4) or ``"ucomp"`` (compressions from UCOMP_GRID).

    Raises:
        ConfigError: a bad option, an override naming an unknown layer or with a bad value,
            a missing/bad ``json_file``, or a target above what the allowed levels can
            remove (the message gives the achievable range). A target below the range is
            met by the mildest levels, with a logged warning.

    >>> alloc = allocate(table, 0.6, sensitivity={"a": {1: 9.0, 2: 1.0}, "b": {1: 0.2, 2: 0.1}})
    ... # doctest: +SKIP
    >>> alloc.repeats                                                    # doctest: +SKIP
    {'a': 2, 'b': 1}
    """
    method = _check_options(target, budget, sensitivity, fmt, allow_dense, eval_fn, calib_data)
    table, module = _table_and_module(gm_or_table, model)
    gm = gm_or_table if isinstance(gm_or_table, torch.fx.GraphModule) else None
    layers = table.eligible()
    if not layers:
        raise ConfigError("the model has no eligible layer to compress (see the analysis "
                          "table's reasons)")
    fixed = merged_overrides(table, json_file, overrides, fmt)
    dense_level = 4 if fmt == "comp" else 0.0
    free_levels = (2, 1) if fmt == "comp" else UCOMP_GRID
    if allow_dense:
        free_levels = (dense_level, *free_levels)
    levels = {l.name: ((fixed[l.name],) if l.name in fixed else free_levels) for l in layers}
    sens = _sensitivities(method, sensitivity, module, gm, layers, levels, fmt, calib_data,
                          eval_fn)

    total = sum(_quantity(l, budget, fmt) for l in layers)
    unit = _unit(budget, fmt)
    removal = {l.name: {lv: _removed(l, lv, budget, fmt) for lv in levels[l.name]} for l in layers}
    lo = sum(min(removal[l.name].values()) for l in layers)
    hi = sum(max(removal[l.name].values()) for l in layers)
    t = Fraction(repr(float(target))) * total * unit  # the decimal the user wrote, exactly
    demand = math.ceil(t)
    achievable = f"the achievable range is {lo / (total * unit):.4f} .. {hi / (total * unit):.4f}"
    if demand > hi:
        raise ConfigError(
            f"target {target:g} of the eligible {budget} cannot be met with the allowed levels"
            f"{' and the overrides' if fixed else ''}: {achievable}")
    if t < lo:
        logger.warning("target %g of the eligible %s is below what the allowed levels%s remove "
                       "(%s); every free layer takes its mildest level%s", target, budget,
                       " and the overrides" if fixed else "", achievable,
                       "" if allow_dense else " (allow_dense=True lets layers stay dense)")

    names = [l.name for l in layers]
    options = [list(levels[n]) for n in names]
    result = solve_mckp([[sens[n][lv] for lv in opts] for n, opts in zip(names, options)],
                        [[removal[n][lv] for lv in opts] for n, opts in zip(names, options)],
                        demand)
    chosen = {n: opts[j] for n, opts, j in zip(names, options, result.choice)}
    per_layer = tuple(
        LayerAllocation(
            name=l.name, repeat=chosen[l.name] if fmt == "comp" else None,
            compression=_fraction(chosen[l.name], fmt), sensitivity=dict(sens[l.name]),
            before=_quantity(l, budget, fmt),
            after=_quantity(l, budget, fmt) - removal[l.name][chosen[l.name]] / unit,
            overridden=l.name in fixed)
        for l in layers)
    alloc = Allocation(
        repeats=dict(chosen) if fmt == "comp" else {},
        compressions={n: _fraction(lv, fmt) for n, lv in chosen.items()},
        target=float(target), budget=budget, fmt=fmt, achieved=result.removed / (total * unit),
        sensitivity=method, per_layer=per_layer, total_sensitivity=result.cost,
        lower_bound=result.lower_bound, exact=result.exact, total_before=total)
    if not result.exact:
        logger.warning("allocation: the knapsack frontier was cut; the total sensitivity is "
                       "within %.4g of optimal", alloc.gap)
    logger.info("allocation: target %g, achieved %.4f of %s, total %s sensitivity %.6g (%s)",
                target, alloc.achieved, budget, method, alloc.total_sensitivity,
                "exact" if alloc.exact else f"gap <= {alloc.gap:.3g}")
    return alloc


class Allocate(GraphPass):
    """Analysis pass (run after AnalyzeLayers): :func:`allocate` and its result in node.meta.

    Writes ``node.meta["vbxfx.repeat"]`` on every layer call node (ineligible layers: 4;
    structured format only) and ``node.meta["vbxfx.sensitivity"]`` (``{level: value}``) on
    the eligible ones; returns ``PassResult(gm, modified=False, details=Allocation)``. The
    options are those of :func:`allocate` and are checked here, when they are given.

    >>> result = Allocate(0.66)(gm)                                      # doctest: +SKIP
    >>> result.details.achieved >= 0.66, result.modified                 # doctest: +SKIP
    (True, False)
    """

    in_place = True
    changes_input = False

    def __init__(self, target: float, **options: Any):
        known = {"budget", "sensitivity", "json_file", "overrides", "allow_dense", "calib_data",
                 "eval_fn", "model", "fmt"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"Allocate: unknown option(s) {unknown}; known: {sorted(known)}")
        _check_options(target, options.get("budget", "macs"), options.get("sensitivity", "weight"),
                       options.get("fmt", "comp"), options.get("allow_dense", False),
                       options.get("eval_fn"), options.get("calib_data"))
        self.target = target
        self.options = options

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if TABLE_KEY not in gm.meta:
            raise ConfigError("Allocate needs the layer table: run vbxfx.passes.AnalyzeLayers "
                              "first")
        alloc = allocate(gm, self.target, **self.options)
        by_name = {r.name: r for r in alloc.per_layer}
        for node in gm.graph.nodes:
            info = node.meta.get(LAYER_KEY)
            if info is None:
                continue
            record = by_name.get(info.name)
            if alloc.fmt == "comp":
                node.meta[REPEAT_KEY] = record.repeat if record is not None else 4
            if record is not None:
                node.meta[SENSITIVITY_KEY] = dict(record.sensitivity)
        return PassResult(gm, modified=False, details=alloc)


# --------------------------------------------------------------------------- helpers


def _table_and_module(gm_or_table: Any,
                      model: nn.Module | None) -> tuple[LayerTable, nn.Module | None]:
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(gm_or_table, LayerTable):
        return gm_or_table, model
    if isinstance(gm_or_table, torch.fx.GraphModule):
        gm = gm_or_table
        if TABLE_KEY not in gm.meta:
            AnalyzeLayers()(gm)
        return gm.meta[TABLE_KEY], model if model is not None else gm
    raise ConfigError(f"allocate takes a traced GraphModule or a LayerTable, got "
                      f"{type(gm_or_table).__name__}; trace the model with vbxfx.trace first")


def _weights(module: nn.Module | None, layers: list[LayerInfo],
             why: str) -> dict[str, torch.Tensor]:
    if module is None:
        raise ConfigError(f"{why} needs the layers' weights: pass a GraphModule, or model= "
                          "along with the LayerTable")
    out = {}
    for layer in layers:
        try:
            w = module.get_parameter(f"{layer.name}.weight" if layer.name else "weight")
        except AttributeError:
            raise ConfigError(f"the model has no parameter {layer.name!r}.weight for layer "
                              f"{layer.name!r} of the table; is it the traced model?") from None
        if tuple(w.shape) != tuple(layer.weight_shape):
            raise ConfigError(f"layer {layer.name!r}: the model's weight has shape "
                              f"{tuple(w.shape)}, the table says {layer.weight_shape}")
        out[layer.name] = w
    return out


def _sensitivities(method: str, given: Any, module: nn.Module | None,
                   gm: torch.fx.GraphModule | None, layers: list[LayerInfo],
                   levels: dict[str, tuple], fmt: str, calib_data: Any,
                   eval_fn: Any) -> dict[str, dict[Any, float]]:
    if method == "given":
        return _given(given, levels, fmt)
    params = _weights(module, layers, f"sensitivity={method!r}")
    if method == "weight":
        if gm is None:
            logger.info("allocate: no graph given, so no BatchNorm statistics; the 'weight' "
                        "sensitivity is the plain relative projection error")
        stats = layer_statistics(gm) if gm is not None else None
        return weight_sensitivity(params, levels, fmt, stats)
    if method == "output":
        return output_sensitivity(module, params, levels, fmt, calib_data)
    return eval_fn_sensitivity(module, params, levels, fmt, eval_fn)


def _given(given: Mapping, levels: dict[str, tuple], fmt: str) -> dict[str, dict[Any, float]]:
    out = {}
    dense = 4 if fmt == "comp" else 0.0
    for name, lvs in levels.items():
        row = given.get(name)
        if not isinstance(row, Mapping):
            raise ConfigError(f"the sensitivity mapping has no entry {{level: value}} for "
                              f"layer {name!r}")
        out[name] = {}
        for lv in lvs:
            value = row.get(lv, 0.0 if lv == dense else None)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ConfigError(f"the sensitivity mapping gives layer {name!r} at level "
                                  f"{lv!r} the value {value!r}; a finite number is needed "
                                  f"for each of {lvs}")
            out[name][lv] = float(value)
    return out


def _quantity(layer: LayerInfo, budget: str, fmt: str) -> int:
    if budget == "params":
        return math.prod(layer.weight_shape)
    return layer.hw_macs[4] if fmt == "comp" else layer.macs


def _unit(budget: str, fmt: str) -> int:
    """Integer removals: quarters of a weight (comp params), 1/_SCALE (ucomp), 1 (comp MACs)."""
    if fmt == "ucomp":
        return _SCALE
    return 4 if budget == "params" else 1


def _removed(layer: LayerInfo, level: Any, budget: str, fmt: str) -> int:
    if fmt == "ucomp":
        return round(float(level) * _SCALE) * _quantity(layer, budget, fmt)
    if budget == "params":
        return math.prod(layer.weight_shape) * (4 - level)
    return layer.hw_macs[4] - layer.hw_macs[level]


def _fraction(level: Any, fmt: str) -> float:
    return _COMP_FRACTION[level] if fmt == "comp" else float(level)
