"""The whole fx pipeline in one call: trace -> AnalyzeLayers -> Allocate -> Rewrite, then
Reconstruct when calibration data is given (:func:`compress`); trace -> AnalyzeLayers alone
(:func:`analyze`).

``compression`` is the fraction of the *eligible* layers' dense hardware MACs to remove;
``report["totals"]["macs_removed"]`` (and ``report["achieved"]``) is the fraction of the *whole
model's* dense hardware MACs removed. They agree when every layer is eligible (resnet18);
a model with depthwise or grouped convolutions, or attention matmuls, which stay dense, has
less removed of the whole model than of its eligible layers (mobilenet_v2 at 0.5: 0.500 of
the eligible layers, 0.468 of the model).

>>> import torch, torchvision, vbxfx
>>> model = torchvision.models.resnet18()
>>> result = vbxfx.compress(model, torch.randn(1, 3, 224, 224), compression=0.66)
>>> report = result.report                                           # doctest: +SKIP
>>> report["achieved_of_eligible"] >= 0.66, report["totals"]["macs_removed"] >= 0.66
... # doctest: +SKIP
(True, True)
>>> vbxfx.is_compressed(result.model.layer1[0].conv1), vbxfx.is_compressed(model.layer1[0].conv1)
(True, False)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.format import unstructured_macs
from vbxfx.analysis.layers import OTHER_OPS_WARN_SHARE, LayerTable
from vbxfx.model_state import require_real_tensors
from vbxfx.modules import DEFAULT_REFRESH_EVERY
from vbxfx.passes.allocate import Allocate, Allocation
from vbxfx.passes.analyze_layers import AnalyzeLayers
from vbxfx.passes.reconstruct import Reconstruct
from vbxfx.refit.reconstruct import OPTIONS as RECONSTRUCT_OPTIONS
from vbxfx.passes.rewrite import LayerRewrite, Rewrite
from vbxfx.analysis.trace import ROOT_KEY, trace
from vbxfx.pipeline.methods import check_methods, compress_with_methods

__all__ = ["analyze", "compress", "CompressResult", "build_report"]

logger = logging.getLogger(__name__)


def analyze(model: nn.Module, example_inputs: Any, *, exclude: Any = (), leaf_modules: Any = (),
            frontend: str = "auto") -> LayerTable:
    """Trace ``model`` and run :class:`vbxfx.passes.AnalyzeLayers` on it.

    >>> import torch, vbxfx
    >>> table = vbxfx.analyze(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8))
    >>> [(layer.name, layer.macs) for layer in table]
    [('', 7776)]

    Raises:
        TraceError: see :func:`trace`.
        ConfigError: bad arguments, or an ``exclude`` pattern that matches no layer.
    """
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, frontend=frontend)
    return AnalyzeLayers(exclude=exclude)(gm).details


class CompressResult(NamedTuple):
    """``(model, report)``: the compressed deep copy and a JSON-serialisable report."""

    model: nn.Module
    report: dict[str, Any]


def compress(model: nn.Module, example_inputs: Any, compression: float = 0.66,
             budget: str = "macs", sensitivity: str = "weight",
             json_file: str | os.PathLike | Mapping[str, Any] | None = None,
             exclude: str | Iterable[str] = (),
             calib_data: Any = None, eval_fn: Callable[[nn.Module], float] | None = None,
             fmt: str = "comp", *, pairing: bool = True,
             refresh_every: int | None = DEFAULT_REFRESH_EVERY, leaf_modules: Any = (),
             allow_dense: bool = False, reconstruct: bool | Mapping[str, Any] | None = None,
             progress: Callable[[str, int, int], None] | None = None,
             include_frozen: bool = False,
             methods: Sequence[str] = ("sparsity",)) -> CompressResult:
    """Compress a deep copy of ``model`` so that ``compression`` of the budget is removed.

    Args:
        model: the model; it is not modified.
        example_inputs: a Tensor or tuple of Tensors of the shapes the model sees.
        compression: fraction of the budget quantity to remove (e.g. 0.66).
        budget: ``"macs"`` (hardware MACs) or ``"params"`` (weights).
        sensitivity: ``"weight"``, ``"output"`` (needs ``calib_data``) or ``"eval_fn"``.
        json_file: per-layer levels in the seed format, fixed; the others are allocated:
            a JSON file's path or the mapping itself, ``{"layer.fqn": 0.5 | 0.75 | "dense"}``.
        exclude: layer names or globs kept dense.
        fmt: ``"comp"`` (structured, 1:4 / 2:4) or ``"ucomp"`` (unstructured).
        pairing, refresh_every: options of the compressed layers.
        leaf_modules: passed to :func:`vbxfx.trace`.
        allow_dense: let the allocator keep too-sensitive layers dense.
        include_frozen: also compress layers whose weight has ``requires_grad=False`` (by
            default they stay dense, reason "frozen"; see :class:`~vbxfx.passes.AnalyzeLayers`).
        calib_data: unlabeled input batches (a Tensor or an iterable of batches): used by
            ``sensitivity="output"`` and by the reconstruction.
        reconstruct: refit the compressed layers to the dense model's outputs on
            ``calib_data`` (:func:`vbxfx.reconstruct`: layer by layer on the compressed
            model's inputs, patterns chosen on the data); the default, None, does it
            whenever ``calib_data`` is given; a mapping gives options of
            :func:`vbxfx.reconstruct` (e.g. ``{"method": "local", "pattern": "keep"}``).
            MobileNetV2, 128 calibration crops, top-1 agreement with the dense model at
            0.5 / 0.66 / 0.75 of the MACs removed: see BENCHMARKS.md, issue 15
            (``python tools/bench_quality.py``).
        progress: called as ``progress(stage, done, total)`` as the stages run: ``"trace"``,
            ``"analyze"``, ``"allocate"``, ``"rewrite"`` (0 of 1 when a stage starts, 1 of 1
            when it ends), then, with a refit, ``"refit: layers"`` (layers refit).
        methods: what may remove MACs: ``"sparsity"`` (the VBX 1:4 / 2:4 levels, the
            default), ``"channels"`` (channel pruning along the channel groups) and
            ``"lowrank"`` (a layer as two low-rank factors), chosen in one allocation
            (:mod:`vbxfx.pipeline.methods`). With more than sparsity, ``compression`` is the
            fraction of the **whole** model's dense hardware MACs, the layers become
            physically smaller, and ``budget``, ``sensitivity``, ``json_file``, ``fmt`` and
            ``allow_dense`` must keep their defaults.

    Returns:
        ``CompressResult(model, report)``; ``model`` is the traced deep copy with compressed
        layers swapped in, ready to fine-tune.

    Raises:
        TraceError, ConfigError, FormatError: from the passes (see each); ConfigError for
            a model on the meta device, before any work.
    """
    refit_options: dict[str, Any] = {}
    if isinstance(reconstruct, Mapping):
        refit_options = dict(reconstruct)
        unknown = sorted(set(refit_options) - set(RECONSTRUCT_OPTIONS))
        if unknown:
            raise ConfigError(f"reconstruct: unknown option(s) {unknown}; known: "
                              f"{sorted(RECONSTRUCT_OPTIONS)}")
        reconstruct = True
    if reconstruct is not None and not isinstance(reconstruct, bool):
        raise ConfigError(f"reconstruct must be True, False, None (refit when calib_data is "
                          f"given) or a mapping of vbxfx.reconstruct options, got "
                          f"{reconstruct!r}")
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a callable(stage, done, total) or None, got "
                          f"{type(progress).__name__}")
    if reconstruct is None:
        reconstruct = calib_data is not None
    if reconstruct and calib_data is None:
        raise ConfigError("reconstruct=True needs calib_data (a few unlabeled input batches)")
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a callable (stage, done, total) or None, got "
                          f"{type(progress).__name__}")
    if isinstance(model, nn.Module):          # trace() names anything else
        require_real_tensors(model, "compress")
    step = _stage(progress)
    methods = check_methods(methods)
    if methods != ("sparsity",):
        _check_method_options(budget, sensitivity, json_file, fmt, allow_dense, eval_fn)
        if progress is not None and "progress" not in refit_options:
            refit_options["progress"] = _refit_progress(progress)
        small, report = compress_with_methods(
            model, example_inputs, compression, methods, calib_data=calib_data,
            exclude=exclude, leaf_modules=leaf_modules, include_frozen=include_frozen,
            pairing=pairing, refresh_every=refresh_every, refit=bool(reconstruct),
            refit_options=refit_options, step=step, build_report=build_report)
        return CompressResult(small, report)
    with step("trace"):
        gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    with step("analyze"):
        table = AnalyzeLayers(exclude=exclude, include_frozen=include_frozen)(gm).details
    with step("allocate"):
        alloc = Allocate(compression, budget=budget, sensitivity=sensitivity, json_file=json_file,
                         calib_data=calib_data, eval_fn=eval_fn, fmt=fmt,
                         allow_dense=allow_dense)(gm).details
    if fmt == "comp":
        plan: dict[str, Any] = dict(alloc.repeats)
    else:
        plan = {name: ("ucomp", c) for name, c in alloc.compressions.items()}
    with step("rewrite"):
        records = Rewrite(plan, pairing=pairing, refresh_every=refresh_every)(gm).details
    refit = None
    if reconstruct and records:
        if progress is not None and "progress" not in refit_options:
            refit_options["progress"] = _refit_progress(progress)
        refit = Reconstruct(model, calib_data, **refit_options)(gm).details
    compressed = gm.meta[ROOT_KEY]
    report = build_report(table, alloc, records, compressed)
    if refit is not None:
        done = refit.compressed
        n = max(1, len(done))
        report["reconstruct"] = {
            "method": refit.method, "layers": len(refit.compressed),
            "dense_layers": len(refit.layers) - len(refit.compressed),
            "forwards": refit.forwards,
            "mean_output_error": [sum(r.error_before for r in done) / n,
                                  sum(r.error_after for r in done) / n],
            "output_error": {r.name: [r.error_before, r.error_after] for r in refit.layers}}
    logger.info("compress: %d layer(s) compressed; hardware MACs %s -> %s",
                len(records), f"{report['totals']['macs_before']:,}",
                f"{report['totals']['macs_after']:,}")
    return CompressResult(compressed, report)


def _check_method_options(budget, sensitivity, json_file, fmt, allow_dense, eval_fn) -> None:
    given = {"budget": (budget, "macs"), "sensitivity": (sensitivity, "weight"),
             "json_file": (json_file, None), "fmt": (fmt, "comp"),
             "allow_dense": (allow_dense, False), "eval_fn": (eval_fn, None)}
    bad = [f"{k}={v!r}" for k, (v, default) in given.items() if v != default]
    if bad:
        raise ConfigError(f"methods beyond 'sparsity' allocate hardware MACs with the weight "
                          f"sensitivity in the structured format; {', '.join(bad)} cannot be "
                          "combined with them (leave them at their defaults)")


def _refit_progress(progress: Callable[[str, int, int], None]) -> Callable[[int, int, str], None]:
    """The refit's ``(done, total, layer)`` as the stage ``"refit: layers"``, started with
    ``(0, total)`` at its first layer (the refit knows the total only once it runs)."""
    started = []

    def report(done: int, total: int, _layer: str) -> None:
        if not started:
            started.append(True)
            progress("refit: layers", 0, total)
        progress("refit: layers", done, total)
    return report


def _stage(progress: Callable[[str, int, int], None] | None):
    """``with step(name):`` reports ``(name, 0, 1)`` before the block and ``(name, 1, 1)``
    after it (not when it raises)."""
    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        if progress is not None:
            progress(name, 0, 1)
        yield
        if progress is not None:
            progress(name, 1, 1)
    return step


def build_report(table: LayerTable, alloc: Allocation, records: dict[str, LayerRewrite],
                 model: nn.Module) -> dict[str, Any]:
    """Per-layer rows and totals (JSON-serialisable), in the README's MAC terms.

    Structured format: a row's ``macs_before`` is the layer's dense hardware MACs (R=4,
    input channels padded to 8; ineligible layers without the block layout at their standard
    MACs), ``macs_after`` its hardware MACs at the chosen repeat. The unstructured format
    counts standard MACs (the multiplies left after int8 quantization, pairs counted once).
    ``totals`` add the other multiply-heavy ops (attention matmuls, ..., ``other_ops``),
    which stay dense, to both sides; ``macs_removed`` is ``1 - macs_after / macs_before``, of
    the whole model. ``achieved`` is the fraction of the whole model's budget quantity
    removed, ``achieved_of_eligible`` the allocator's figure, the one ``target`` is met on.
    """
    rows = []
    for layer in table:
        rec = records.get(layer.name)
        if alloc.fmt == "comp":
            before = layer.cost(4)
            after = layer.cost(rec.repeat) if rec is not None else before
        else:
            before = layer.macs
            after = before
            if rec is not None:
                w = model.get_submodule(layer.name).compressed_weight().detach()
                after = layer.macs * unstructured_macs(w) // w.numel()
        rows.append({
            "name": layer.name, "kind": layer.kind, "weight_shape": list(layer.weight_shape),
            "calls": layer.calls, "eligible": layer.eligible,
            "reason": layer.reason, "fmt": rec.fmt if rec else "dense",
            "repeat": rec.repeat if rec else (4 if alloc.fmt == "comp" else None),
            "compression": rec.compression if rec else 0.0,
            "macs": int(layer.macs), "macs_before": int(before), "macs_after": int(after),
            "projection_error": rec.projection_error if rec else 0.0,
            "paired_fraction": rec.paired_fraction if rec else 0.0,
        })
    other = table.other_macs
    before = sum(r["macs_before"] for r in rows) + other
    after = sum(r["macs_after"] for r in rows) + other
    removed = 1.0 - after / before if before else 0.0
    params = sum(math.prod(l.weight_shape) for l in table)
    params_removed = sum(math.prod(table[n].weight_shape) * r.compression
                         for n, r in records.items())
    achieved = removed if alloc.budget == "macs" else (params_removed / params if params else 0.0)
    warnings = []
    share = table.other_share
    if share >= OTHER_OPS_WARN_SHARE:
        warnings.append(f"{share:.1%} of the dense hardware MACs are in multiply-heavy ops "
                        "that are not Conv2d/Linear layer calls (attention matmuls, functional "
                        "F.linear / F.conv2d, Conv1d/3d, transposed convs): they stay dense; "
                        "the totals include them")
    unused = [l.name for l in table if l.calls == 0]
    if unused:
        warnings.append(f"{len(unused)} Conv/Linear layer(s) whose own forward never runs stay "
                        "dense (a parent reads the weight directly, or the layer is unused; "
                        f"see their reasons): {', '.join(unused[:5])}"
                        + (" ..." if len(unused) > 5 else ""))
    return {
        "fmt": alloc.fmt, "budget": alloc.budget, "target": alloc.target,
        "achieved": achieved, "achieved_of_eligible": alloc.achieved,
        "sensitivity": alloc.sensitivity,
        "mac_kind": ("hardware" if alloc.fmt == "comp" else "standard"),
        "layers": rows,
        "other_ops": [op.to_dict() for op in table.ops],
        "warnings": warnings,
        "totals": {
            "layers": len(rows), "compressed": len(records),
            "macs": table.total_macs,
            "macs_before": before, "macs_after": after,
            "hw_macs_dense": before, "hw_macs": after,
            "other_macs": other, "other_share": share,
            "macs_removed": removed,
            "params_before": params, "params_removed": params_removed / params if params else 0.0,
            "paired_fraction": (sum(r["paired_fraction"] for r in rows if r["fmt"] != "dense")
                                / max(1, len(records))),
        },
    }
