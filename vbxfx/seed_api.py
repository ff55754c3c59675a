"""The seed library's two-line API, in place on the user's model, no example input needed.

The seed workflow is: train, compress, fine-tune with the same loop::

    import vbxfx
    vbxfx.compress_vbx3(model, compression=0.66)     # then train as before

Eligible layers are found with ``named_modules``: ``nn.Conv2d`` with ``groups=1`` and
``nn.Linear`` whose own forward computes with their weight. There is no example input, so no
trace; instead a static check (:func:`vbxfx.analysis.weight_use.direct_weight_readers`) reads each
parent's ``forward`` source for ``self.<child>.weight`` and knows the torch/torchvision classes
that do that (``nn.MultiheadAttention``'s ``out_proj``, Swin's ``qkv`` / ``proj``,
``nn.TransformerEncoderLayer``'s fast path): compressing such a layer would change nothing
torch computes while an export would hold the compressed weight, so it stays dense with the
reason. Given ``example_inputs=``, a short run (eval mode, FakeTensors, hooks) also catches
weights handed to any torch function outside their layer's forward. Layers whose weight does
not train (``requires_grad=False``, ultralytics' DFL conv) stay dense as "frozen" unless
``include_frozen=True``; a weight held by two modules stays dense too. Each becomes a :class:`~vbxfx.modules.VBXConv2d` / ``VBXLinear`` holding the
**same** weight and bias Parameters, so an optimizer built before the call keeps training
them. ``compression`` is the fraction of the eligible layers' weights removed: 0.5 puts
every layer at 2:4 (repeat 2), 0.75 every layer at 1:4 (repeat 1), a value in between lets
:func:`vbxfx.allocate` choose per layer with the data-free weight sensitivity.

**Calling it again** re-compresses: every compressed layer is re-projected from its dense
weight (the Parameter it trains) at the new setting; layers are never wrapped twice.

Everything is checked before the first layer is swapped: on any error the model is
untouched.

>>> import torch, vbxfx
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(),
...                             torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
>>> report = vbxfx.compress_vbx3(model, compression=0.75)
>>> {name: layer["repeat"] for name, layer in report["layers"].items()}
{'0': 1, '3': 1}
>>> vbxfx.is_compressed(model[0])
True
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from typing import Any

import torch
from torch import nn

from vbxfx.errors import ConfigError, FormatError
from vbxfx.format import hardware_macs
from vbxfx.analysis.layer_records import parameter_owners
from vbxfx.analysis.layers import LINEAR_NOTE, LayerInfo, LayerTable, module_kind
from vbxfx.model_state import require_real_tensors
from vbxfx.modules import DEFAULT_REFRESH_EVERY
from vbxfx.allocation.overrides import describe, merged_overrides
from vbxfx.passes.allocate import allocate
from vbxfx.passes.analyze_layers import DECODER_REASON, FROZEN_REASON, fixed_decoders
from vbxfx.passes.rewrite import normalize_plan, rewrite_modules
from vbxfx.analysis.weight_use import called_layers, direct_weight_readers

__all__ = ["compress_vbx3", "compress_vbx3_unstructured", "layer_table_of"]

logger = logging.getLogger(__name__)

COMP_RANGE = (0.5, 0.75)
UCOMP_RANGE = (0.5, 1.0)


def _check_rate(value: Any, bounds: tuple[float, float], what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{what}: compression must be a number in [{bounds[0]}, {bounds[1]}], "
                          f"got {value!r}")
    return float(value)


def layer_table_of(model: nn.Module, *, include_frozen: bool = False,
                   example_inputs: Any = None) -> LayerTable:
    """A LayerTable from ``named_modules`` alone (no tracing, so no MAC counts: every layer
    counts one output position). Conv2d with groups=1 and Linear layers are eligible unless a
    parent reads their weight directly, their weight is frozen or shared (module docstring)."""
    readers = direct_weight_readers(model)
    owners = parameter_owners(model)
    layers = []
    for name, m in model.named_modules():
        kind = module_kind(m)
        if kind is None:
            continue
        w = m.weight
        shape = tuple(w.shape)
        groups = getattr(m, "groups", 1)
        if kind == "linear":
            o, i, k = shape[0], shape[1], 1
        else:
            o, i, k = shape[0], shape[1], math.prod(shape[2:])
        reason = None
        if kind != "conv2d" and kind != "linear":
            reason = {"conv_transpose": "transposed conv", "conv1d": "Conv1d",
                      "conv3d": "Conv3d"}.get(kind, kind)
        elif groups != 1:
            reason = (f"depthwise conv (groups={groups})" if groups == m.in_channels
                      else f"grouped conv (groups={groups})")
        elif name in readers:
            reason = readers[name]
        elif _sharers(model, m, owners.get(id(w), ())):
            reason = "weight shared with layer " + ", ".join(_sharers(model, m,
                                                                       owners[id(w)]))
        bias = getattr(m, "bias", None)
        layers.append(LayerInfo(
            name=name, kind=kind, node_name=name, weight_shape=shape, in_shape=(),
            out_shape=(), calls=1, in_channels=i * groups, out_channels=o, groups=groups,
            kernel_positions=k, output_positions=1, macs=w.numel(),
            hw_macs={r: hardware_macs(o, i, k, 1, r) for r in (1, 2, 4)},
            params=w.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0),
            eligible=reason is None, reason=reason,
            note=LINEAR_NOTE if kind == "linear" else None, module_type=type(m).__name__))
    table = LayerTable(layers)
    if example_inputs is not None:
        table = _check_by_running(model, table, example_inputs)
    return table if include_frozen else _frozen_dense(model, table)


def _sharers(model: nn.Module, layer: nn.Module, fqns: Any) -> list[str]:
    """The other modules (not aliases of ``layer``) that hold its weight."""
    out = []
    for fqn in fqns:
        owner = fqn.rpartition(".")[0]
        if model.get_submodule(owner) is not layer and owner not in out:
            out.append(owner)
    return out


def _check_by_running(model: nn.Module, table: LayerTable, example_inputs: Any) -> LayerTable:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConfigError("example_inputs must be a Tensor or a tuple of Tensors, e.g. "
                          "torch.randn(1, 3, 224, 224)")
    names = [layer.name for layer in table.eligible()]
    try:
        ran, direct = called_layers(model, tuple(inputs), names)
    except Exception as e:
        raise ConfigError(f"compress_vbx3: the model does not run on example_inputs "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                          "nothing was changed") from e
    unused = [n for n in names if n not in ran]
    if unused:
        logger.info("compress_vbx3: %d layer(s) not called by forward() on example_inputs in "
                    "eval mode (compressed anyway: training may use them): %s", len(unused),
                    ", ".join(unused[:5]))
    return LayerTable(dataclasses.replace(layer, eligible=False, reason=direct[layer.name])
                      if layer.name in direct else layer for layer in table)


def _frozen_dense(model: nn.Module, table: LayerTable) -> LayerTable:
    decoders = set(fixed_decoders(model, [layer.name for layer in table.eligible()]))
    table = LayerTable(dataclasses.replace(layer, eligible=False, reason=DECODER_REASON)
                       if layer.name in decoders else layer for layer in table)
    eligible = table.eligible()
    frozen = {layer.name for layer in eligible
              if not model.get_submodule(layer.name).weight.requires_grad}
    if not frozen:
        return table
    if len(frozen) == len(eligible):
        logger.info("every eligible layer's weight has requires_grad=False (a model frozen as "
                    "a whole): frozen layers are compressed like the others")
        return table
    logger.info("%d frozen layer(s) stay dense: %s", len(frozen), ", ".join(sorted(frozen)[:5]))
    return LayerTable(dataclasses.replace(layer, eligible=False, reason=FROZEN_REASON)
                      if layer.name in frozen else layer for layer in table)


def _eligible(model: nn.Module, what: str, include_frozen: bool = False,
              example_inputs: Any = None) -> LayerTable:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} takes an nn.Module, got {type(model).__name__}")
    require_real_tensors(model, what)
    if not isinstance(include_frozen, bool):
        raise ConfigError(f"{what}: include_frozen must be True or False, got {include_frozen!r}")
    table = layer_table_of(model, include_frozen=include_frozen, example_inputs=example_inputs)
    if not table.eligible():
        found = ", ".join(f"{l.name or '(root)'}: {l.reason}" for l in table) or "none"
        raise ConfigError(f"{what}: {type(model).__name__} has no layer to compress; accepted "
                          f"are nn.Conv2d with groups=1 and nn.Linear (Conv/Linear layers "
                          f"found: {found})")
    for layer in table.eligible():
        w = model.get_submodule(layer.name).weight
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise FormatError(f"{what}: layer {layer.name!r} holds {bad} NaN/Inf weight(s); "
                              "only finite weights can be compressed (nothing was changed)")
    return table


def _report(what: str, compression: float, records: dict, table: LayerTable,
            extra: dict[str, Any]) -> dict[str, Any]:
    eligible = table.eligible()
    total = sum(math.prod(l.weight_shape) for l in eligible)
    removed = sum(math.prod(table[n].weight_shape) * r.compression for n, r in records.items())
    return {
        "api": what, "compression": compression, **extra,
        "weights_removed": removed / total if total else 0.0,
        "layers": {n: r.to_dict() for n, r in records.items()},
        "dense": [l.name for l in eligible if l.name not in records],
        "not_compressible": {l.name: l.reason for l in table if not l.eligible},
    }


def compress_vbx3(model: nn.Module, compression: float,
                  json_file: str | os.PathLike | None = None, *, pairing: bool = True,
                  refresh_every: int | None = DEFAULT_REFRESH_EVERY, include_frozen: bool = False,
                  example_inputs: Any = None) -> dict[str, Any]:
    """Compress ``model`` in place in the structured format (1:4 / 2:4 with pairing).

    Args:
        model: the model; its eligible layers are swapped for compressed ones.
        compression: fraction of the eligible layers' weights removed, in [0.5, 0.75].
        json_file: per-layer levels in the seed format ``{"layer.fqn": 0.5 | 0.66 | 0.75 |
            "dense"}``, a JSON file's path or the mapping itself (see
            :mod:`vbxfx.allocation.overrides`: 0.66 goes to the nearest level, 1:4);
            the other layers make up the difference to ``compression``. When the file
            sets every eligible layer, ``compression`` is only range-checked.
        pairing, refresh_every: options of the compressed layers (see vbxfx.modules).
        include_frozen: also compress layers whose weight has ``requires_grad=False``.
        example_inputs: optional inputs for one short check run (module docstring); without
            them the static check alone decides which weights are used directly.

    Returns:
        A small report: ``{"layers": {fqn: {"repeat", "projection_error", ...}}, "dense":
        [...], "not_compressible": {fqn: reason}, "weights_removed": ..., "achieved": ...}``
        (``achieved`` is the fraction of the eligible layers' weights removed, as
        ``weights_removed``; ``dense`` the eligible layers left dense, ``not_compressible``
        every other Conv/Linear layer with the reason).

    Raises:
        ConfigError: compression out of range, a model without eligible layer, a bad
            json_file (unknown layer names come with the closest real ones), an
            unreachable target. FormatError: NaN/Inf weights. The model is then untouched.
    """
    c = _check_rate(compression, COMP_RANGE, "compress_vbx3")
    table = _eligible(model, "compress_vbx3", include_frozen, example_inputs)
    fixed = merged_overrides(table, json_file) if json_file is not None else {}
    if fixed and set(fixed) == {layer.name for layer in table.eligible()}:
        # the file sets every layer: nothing is left to allocate, compression is moot
        logger.info("compress_vbx3: %s sets every layer; compression=%g is not "
                    "used", describe(json_file), c)
        repeats = dict(fixed)
    else:
        repeats = allocate(table, c, budget="params", sensitivity="weight",
                           json_file=json_file, model=model, fmt="comp").repeats
    records = rewrite_modules([model], normalize_plan(repeats), pairing=pairing,
                              refresh_every=refresh_every)
    from vbxfx.integrations.ultralytics import warn_if_ultralytics
    warn_if_ultralytics(model, "compress_vbx3")
    report = _report("compress_vbx3", c, records, table, {})
    report["achieved"] = report["weights_removed"]
    logger.info("compress_vbx3: %d layer(s) compressed, %.4f of the weights removed",
                len(records), report["weights_removed"])
    return report


def compress_vbx3_unstructured(model: nn.Module, compression: float, *, pairing: bool = True,
                               refresh_every: int | None = DEFAULT_REFRESH_EVERY,
                               include_frozen: bool = False,
                               example_inputs: Any = None) -> dict[str, Any]:
    """Compress ``model`` in place in the unstructured format, every eligible layer at
    ``compression`` (the fraction of its multiplies removed, in [0.5, 1.0]); eligibility,
    ``include_frozen`` and ``example_inputs`` as in :func:`compress_vbx3`.

    Raises:
        ConfigError / FormatError: as :func:`compress_vbx3`; the model is then untouched.

    >>> import torch, vbxfx
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    >>> vbxfx.compress_vbx3_unstructured(model, 0.8)["layers"]["0"]["fmt"]
    'ucomp'
    """
    c = _check_rate(compression, UCOMP_RANGE, "compress_vbx3_unstructured")
    table = _eligible(model, "compress_vbx3_unstructured", include_frozen, example_inputs)
    plan = normalize_plan({l.name: ("ucomp", c) for l in table.eligible()})
    records = rewrite_modules([model], plan, pairing=pairing, refresh_every=refresh_every)
    return _report("compress_vbx3_unstructured", c, records, table, {"achieved": c})
