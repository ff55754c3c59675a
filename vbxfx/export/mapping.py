"""Find each compressed layer's node in an exported ONNX graph and write its annotation.

A layer is found by its weight: the initializer named ``<fqn>.weight``, the node's module path
(dynamo's ``pkg.torch.onnx.name_scopes``, TorchScript's ``/a/a.0/conv/Conv`` node names), and
always a value match up to one scale per output channel (a folded BatchNorm), through the
``Identity`` / ``Transpose`` / ``Reshape`` / ``Cast`` chains :class:`OnnxGraph` follows. A
layer whose weight no node holds (an exporter folded it into something else) is left out with
the reason, never annotated: the file must not claim a compressed layer whose weight it does
not hold in the format.

>>> proportional(np.ones((2, 3)), np.array([[2.0] * 3, [-1.0] * 3]))
True
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from vbxfx.errors import ExportError
from vbxfx.export.annotations import (LAYERS_KEY, PRODUCER_KEY, SCHEMA, SCHEMA_KEY, LayerAnnotation,
                                      encode_layer)
from vbxfx.export.graph import OnnxGraph, WeightRef
from vbxfx.export.verify import verify_layer

__all__ = ["map_layers", "annotate", "proportional"]

logger = logging.getLogger(__name__)

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


# --------------------------------------------------------------------------- mapping


def _torchscript_fqn(node_name: str) -> str | None:
    """``/features/features.4/block/block.2/fc1/Conv`` -> ``features.4.block.2.fc1``."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not node_name.startswith("/") or not parts:
        return None
    pieces, prev = [], None
    for p in parts:
        pieces.append(p[len(prev) + 1:] if prev and p.startswith(prev + ".") else p)
        prev = p
    return ".".join(pieces)


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    return []


def proportional(torch_w: np.ndarray, onnx_w: np.ndarray, tol: float = 1e-5) -> bool:
    """Whether ``onnx_w == s[o] * torch_w`` for one scale per output channel (BN folding)."""
    if torch_w.shape != onnx_w.shape:
        return False
    a = torch_w.reshape(torch_w.shape[0], -1).astype(np.float64)
    b = onnx_w.reshape(onnx_w.shape[0], -1).astype(np.float64)
    if (b[a == 0] != 0).any():
        return False
    den = (a * a).sum(axis=1)
    s = np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 0.0)
    resid = np.abs(b - s[:, None] * a).max(axis=1)
    return bool((resid <= tol * np.abs(b).max(axis=1) + 1e-30).all())


def map_layers(graph: OnnxGraph, work: nn.Module, names: Sequence[str],
               missing: dict[str, str] | None = None) -> dict[str, WeightRef]:
    """The Conv/Gemm/MatMul node of every torch layer in ``names`` (see module docstring).

    A layer whose weight no node holds goes into ``missing`` (``{fqn: reason}``) when it is
    given, and raises otherwise.

    Raises:
        ExportError: a layer whose weight no node of the graph holds (``missing`` is None).
    """
    refs = [r for r in (graph.weight(n) for n in graph.layer_nodes()) if r is not None]
    taken: set[int] = set()
    found: dict[str, WeightRef] = {}
    for name in names:
        w = work.get_submodule(name).weight.detach().to(torch.float32).cpu().numpy()
        same_shape = [(i, r) for i, r in enumerate(refs)
                      if i not in taken and r.torch_layout().shape == w.shape]

        def hinted(item: tuple[int, WeightRef]) -> int:
            r = item[1]
            if r.source == f"{name}.weight":
                return 0
            if name in _scopes(r.node) or _torchscript_fqn(r.node.name) == name:
                return 1
            return 2

        matches = [(hinted(c), c) for c in same_shape if proportional(w, c[1].torch_layout())]
        if not matches:
            shapes = sorted({str(r.torch_layout().shape) for r in refs})
            why = (f"no Conv/Gemm/MatMul node of the exported graph holds its weight "
                   f"{tuple(w.shape)} (not even up to a per-channel scale, through "
                   f"Identity/Transpose/Reshape/Cast); nodes with constant weights have shapes "
                   f"{', '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}")
            if missing is None:
                raise ExportError(f"layer {name!r}: {why}")
            missing[name] = why
            continue
        matches.sort(key=lambda m: (m[0], m[1][0]))
        hint, (i, ref) = matches[0]
        if hint == 2 and len(matches) > 1:
            logger.warning("layer %r: %d nodes hold proportional weights and none is named after "
                           "it; annotating %r", name, len(matches), ref.node.name)
        taken.add(i)
        found[name] = ref
    return found


def annotate(proto: onnx.ModelProto, work: nn.Module, notes: Mapping[str, LayerAnnotation],
             skipped: dict[str, str] | None = None) -> dict[str, str]:
    """Write the annotations of ``notes`` into ``proto`` (in place); return ``{fqn: node}``.

    A layer whose weight no node holds is left out, with a warning and its reason in
    ``skipped`` when that is given (else it raises).

    Raises:
        ExportError: an ONNX weight that does not hold its annotation, or (``skipped`` None)
            a layer not found.
    """
    graph = OnnxGraph(proto)
    missing: dict[str, str] | None = {} if skipped is not None else None
    refs = map_layers(graph, work, list(notes), missing)
    if missing:
        logger.warning("%d compressed layer(s) are not in the exported graph as Conv/Gemm/MatMul "
                       "weights and stay unannotated (the hardware runs them as the exporter "
                       "left them): %s", len(missing), "; ".join(
                           f"{k}: {v}" for k, v in list(missing.items())[:3]))
        skipped.update(missing)
    names = {n.name for n in proto.graph.node}
    seen: set[str] = set()
    for node in proto.graph.node:  # unique, non-empty names for the layer nodes
        if node.name in seen or not node.name:
            node.name = _fresh(f"vbxfx_{node.op_type}", names)
        seen.add(node.name)
    layers = {}
    for name, ann in notes.items():
        if name not in refs:
            continue
        ref = refs[name]
        verdict = verify_layer(torch.from_numpy(ref.torch_layout().astype(np.float32)), ann,
                               f"layer {name!r} (ONNX node {ref.node.name!r})")
        if not verdict.ok:
            raise ExportError("; ".join(verdict.problems))
        for warning in verdict.warnings:
            logger.warning("%s", warning)
        props = encode_layer(ann, ref.input_name)
        keep = [(p.key, p.value) for p in ref.node.metadata_props if not p.key.startswith("vbxfx.")]
        del ref.node.metadata_props[:]
        for key, value in keep + list(props.items()):
            ref.node.metadata_props.add(key=key, value=value)
        layers[name] = ref.node.name
    _set_model_props(proto, {SCHEMA_KEY: SCHEMA, PRODUCER_KEY: _producer(),
                             LAYERS_KEY: json.dumps(layers)})
    return layers


def _fresh(base: str, names: set[str]) -> str:
    k = 0
    while f"{base}_{k}" in names:
        k += 1
    names.add(f"{base}_{k}")
    return f"{base}_{k}"


def _producer() -> str:
    from vbxfx import __version__
    return f"vbxfx {__version__}"


def _set_model_props(proto: onnx.ModelProto, values: Mapping[str, str]) -> None:
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in keep + list(values.items()):
        proto.metadata_props.add(key=key, value=value)
