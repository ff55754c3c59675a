"""The whole fx pipeline in one call: trace -> AnalyzeLayers -> Allocate -> Rewrite, then
Reconstruct when calibration data is given.

>>> import torch, torchvision, vbxfx
>>> model = torchvision.models.resnet18()
>>> result = vbxfx.compress(model, torch.randn(1, 3, 224, 224), compression=0.66)
>>> result.report["totals"]["macs_removed"] >= 0.66                  # doctest: +SKIP
True
>>> vbxfx.is_compressed(result.model.layer1[0].conv1), vbxfx.is_compressed(model.layer1[0].conv1)
(True, False)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.format import unstructured_macs
from vbxfx.layers import LayerTable
from vbxfx.modules import DEFAULT_REFRESH_EVERY
from vbxfx.passes.allocate import Allocate, Allocation
from vbxfx.passes.analyze_layers import AnalyzeLayers
from vbxfx.passes.reconstruct import Reconstruct
from vbxfx.reconstruct import OPTIONS as RECONSTRUCT_OPTIONS
from vbxfx.passes.rewrite import LayerRewrite, Rewrite
from vbxfx.trace import ROOT_KEY, trace

__all__ = ["compress", "CompressResult", "build_report"]

logger = logging.getLogger(__name__)


class CompressResult(NamedTuple):
    """``(model, report)``: the compressed deep copy and a JSON-serialisable report."""

    model: nn.Module
    report: dict[str, Any]


def compress(model: nn.Module, example_inputs: Any, compression: float = 0.66,
             budget: str = "macs", sensitivity: str = "weight",
             json_file: str | os.PathLike | None = None, exclude: str | Iterable[str] = (),
             calib_data: Any = None, eval_fn: Callable[[nn.Module], float] | None = None,
             fmt: str = "comp", *, pairing: bool = True,
             refresh_every: int | None = DEFAULT_REFRESH_EVERY, leaf_modules: Any = (),
             allow_dense: bool = False, reconstruct: bool | Mapping[str, Any] | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> CompressResult:
    """Compress a deep copy of ``model`` so that ``compression`` of the budget is removed.

    Args:
        model: the model; it is not modified.
        example_inputs: a Tensor or tuple of Tensors of the shapes the model sees.
        compression: fraction of the budget quantity to remove (e.g. 0.66).
        budget: ``"macs"`` (hardware MACs) or ``"params"`` (weights).
        sensitivity: ``"weight"``, ``"output"`` (needs ``calib_data``) or ``"eval_fn"``.
        json_file: per-layer levels in the seed format, fixed; the others are allocated.
        exclude: layer names or globs kept dense.
        fmt: ``"comp"`` (structured, 1:4 / 2:4) or ``"ucomp"`` (unstructured).
        pairing, refresh_every: options of the compressed layers.
        leaf_modules: passed to :func:`vbxfx.trace`.
        allow_dense: let the allocator keep too-sensitive layers dense.
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
        progress: ``progress(stage, done, total)`` while the calibrated stages run (stage
            ``"reconstruct"``: ``done`` of ``total`` layers refit).

    Returns:
        ``CompressResult(model, report)``; ``model`` is the traced deep copy with compressed
        layers swapped in, ready to fine-tune.

    Raises:
        TraceError, ConfigError, FormatError: from the passes (see each).
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
    gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    table = AnalyzeLayers(exclude=exclude)(gm).details
    alloc = Allocate(compression, budget=budget, sensitivity=sensitivity, json_file=json_file,
                     calib_data=calib_data, eval_fn=eval_fn, fmt=fmt,
                     allow_dense=allow_dense)(gm).details
    if fmt == "comp":
        plan: dict[str, Any] = dict(alloc.repeats)
    else:
        plan = {name: ("ucomp", c) for name, c in alloc.compressions.items()}
    records = Rewrite(plan, pairing=pairing, refresh_every=refresh_every)(gm).details
    refit = None
    if reconstruct and records:
        if progress is not None and "progress" not in refit_options:
            refit_options["progress"] = lambda done, total, _: progress("reconstruct", done, total)
        refit = Reconstruct(model, calib_data, **refit_options)(gm).details
    compressed = gm.meta[ROOT_KEY]
    report = build_report(table, alloc, records, compressed)
    if refit is not None:
        report["reconstruct"] = {
            "method": refit.method, "layers": len(refit.compressed),
            "dense_layers": len(refit.layers) - len(refit.compressed),
            "forwards": refit.forwards,
            "output_error": {r.name: [r.error_before, r.error_after] for r in refit.layers}}
    logger.info("compress: %d layer(s) compressed; hardware MACs %s -> %s",
                len(records), f"{report['totals']['macs_before']:,}",
                f"{report['totals']['macs_after']:,}")
    return CompressResult(compressed, report)


def build_report(table: LayerTable, alloc: Allocation, records: dict[str, LayerRewrite],
                 model: nn.Module) -> dict[str, Any]:
    """Per-layer rows and totals (JSON-serialisable).

    MACs are hardware MACs at batch 1 for the structured format (channel padding included;
    ineligible layers at their standard MACs), standard MACs for the unstructured one
    (the multiplies left after int8 quantization, pairs counted once).
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
            "eligible": layer.eligible,
            "reason": layer.reason, "fmt": rec.fmt if rec else "dense",
            "repeat": rec.repeat if rec else (4 if alloc.fmt == "comp" else None),
            "compression": rec.compression if rec else 0.0,
            "macs_before": int(before), "macs_after": int(after),
            "projection_error": rec.projection_error if rec else 0.0,
            "paired_fraction": rec.paired_fraction if rec else 0.0,
        })
    before = sum(r["macs_before"] for r in rows)
    after = sum(r["macs_after"] for r in rows)
    return {
        "fmt": alloc.fmt, "budget": alloc.budget, "target": alloc.target,
        "achieved": alloc.achieved, "sensitivity": alloc.sensitivity,
        "layers": rows,
        "totals": {
            "layers": len(rows), "compressed": len(records),
            "macs_before": before, "macs_after": after,
            "macs_removed": 1.0 - after / before if before else 0.0,
            "params_before": sum(math.prod(l.weight_shape) for l in table),
            "paired_fraction": (sum(r["paired_fraction"] for r in rows if r["fmt"] != "dense")
                                / max(1, len(records))),
        },
    }
