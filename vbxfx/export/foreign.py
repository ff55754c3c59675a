"""ONNX files that another tool exported (``yolo export``, a plain ``torch.onnx.export``): find
which node holds which compressed layer, so that the file can be checked or annotated.

Such a file has no vbxfx annotations, and its weights may differ from the torch model's by
one scale per output channel (``yolo export`` fuses BatchNorm into the convolutions first).
The declared layers come from one of:

* the compressed torch model (``model=``; e.g. the ultralytics ``best.pt``): every compressed
  layer is finalized (its mask and pairs derived from its final weight) and found in the
  graph as :func:`vbxfx.export.onnx_export.map_layers` finds it for vbxfx's own export: the
  initializer name, the node's module path (TorchScript's ``/model.0/conv/Conv`` node names,
  dynamo's name scopes) and a value match up to a per-channel scale;
* a layers file (``layers=``): the JSON report of ``vbxfx compress --json`` (or its
  ``report`` part), or a plain mapping ``{layer: repeat}``; layers are found by module path
  (and shape, when the report gives it), and their encodings derived from the int8 weights
  of the file, so what is checked is that each one fits its declared repeat.

>>> import vbxfx                                                          # doctest: +SKIP
>>> vbxfx.check_onnx("best.onnx", torch_model=best_model).ok              # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from vbxfx.errors import CheckError, FormatError
from vbxfx.export.annotations import LayerAnnotation
from vbxfx.export.graph import OnnxGraph
from vbxfx.export.reader import AnnotatedNode

__all__ = ["foreign_nodes", "load_layers_file", "annotate_onnx", "has_annotations"]

logger = logging.getLogger(__name__)


def has_annotations(proto: onnx.ModelProto) -> bool:
    """Whether the file carries vbxfx annotations (a ``vbxfx.schema`` model property)."""
    from vbxfx.export.annotations import SCHEMA_KEY

    return any(p.key == SCHEMA_KEY for p in proto.metadata_props)


def _declared_from_model(model: nn.Module) -> tuple[nn.Module, dict[str, LayerAnnotation]]:
    from vbxfx.passes.finalize import finalize

    plain, notes = finalize(model)
    if not notes:
        raise CheckError(f"the torch model ({type(model).__name__}) holds no compressed layer; "
                         "give the compressed model (e.g. the best.pt trained with "
                         "vbxfx.integrations.ultralytics.compressed_trainer)")
    return plain, dict(notes)


def _map_by_model(graph: OnnxGraph, plain: nn.Module, names: list[str],
                  problems: list[str]) -> dict[str, Any]:
    from vbxfx.export.mapping import map_layers

    missing: dict[str, str] = {}
    found = map_layers(graph, plain, names, missing=missing)
    named = _refs_by_name(graph)
    for name, why in missing.items():
        ref = named.get(name)
        shape = tuple(plain.get_submodule(name).weight.shape)
        if ref is not None and tuple(ref.torch_layout().shape) == shape:
            # the node named after the layer holds other values: check those
            logger.info("layer %r: node %r is named after it but its weight is not the "
                        "model's (up to a per-channel scale)", name, ref.node.name)
            found[name] = ref
        else:
            problems.append(f"layer {name!r}: {why} - the file does not hold this compressed "
                            "layer")
    return found


def _refs_by_name(graph: OnnxGraph) -> dict[str, Any]:
    """``{module path: weight ref}`` from the node names / name scopes of the file."""
    by_name: dict[str, Any] = {}
    for node in graph.layer_nodes():
        ref = graph.weight(node)
        if ref is not None:
            for name in _node_names(node):
                by_name.setdefault(name, ref)
    return by_name


def load_layers_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{layer: {"fmt", "repeat", "shape" or None}}`` of the compressed layers in a layers file.

    Raises:
        CheckError: missing file, not JSON, or no layer levels in it (says what is accepted).
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckError(f"--layers {where}: no such file") from None
    except (OSError, ValueError) as e:
        raise CheckError(f"--layers {where}: not a JSON file ({e})") from e
    if isinstance(data, Mapping) and isinstance(data.get("report"), Mapping):
        data = data["report"]                       # `vbxfx compress --json` output
    out: dict[str, dict[str, Any]] = {}
    if isinstance(data, Mapping) and isinstance(data.get("layers"), list):
        for row in data["layers"]:                  # a compress report
            if isinstance(row, Mapping) and row.get("fmt") in ("comp", "ucomp"):
                out[str(row["name"])] = {"fmt": row["fmt"], "repeat": int(row["repeat"] or 0),
                                         "shape": tuple(row.get("weight_shape") or ()) or None}
    elif isinstance(data, Mapping) and data and all(
            isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        for name, repeat in data.items():           # {layer: repeat}
            if repeat not in (0, 1, 2, 4):
                raise CheckError(f"--layers {where}: layer {name!r} has repeat {repeat!r}; "
                                 "accepted are 1, 2, 4 (comp) or 0 (ucomp)")
            if repeat != 4:
                out[str(name)] = {"fmt": "ucomp" if repeat == 0 else "comp", "repeat": repeat,
                                  "shape": None}
    else:
        raise CheckError(f"--layers {where}: expected the JSON report of `vbxfx compress --json`"
                         " or a mapping {layer: repeat}")
    if not out:
        raise CheckError(f"--layers {where}: no compressed layer in it")
    return out


def _node_names(node: onnx.NodeProto) -> set[str]:
    from vbxfx.export.mapping import _scopes, _torchscript_fqn

    names = set(_scopes(node))
    fqn = _torchscript_fqn(node.name)
    if fqn:
        names.add(fqn)
    return names


def _declared_from_file(graph: OnnxGraph, declared: Mapping[str, Mapping[str, Any]],
                        problems: list[str]) -> list[tuple[str, Any, LayerAnnotation]]:
    from vbxfx.format import (encode_unstructured, encode_weight, project_weight,
                              quantize_int8)

    by_name = _refs_by_name(graph)
    out = []
    for name, level in declared.items():
        ref = by_name.get(name)
        if ref is None:
            problems.append(f"layer {name!r}: no Conv/Gemm/MatMul node of the file is named "
                            "after it (the file's node names must keep the module path)")
            continue
        w = torch.from_numpy(np.array(ref.torch_layout(), dtype=np.float32))
        if level["shape"] is not None and tuple(w.shape) != tuple(level["shape"]):
            problems.append(f"layer {name!r}: node {ref.node.name!r} holds a weight of shape "
                            f"{tuple(w.shape)}, the report says {tuple(level['shape'])}")
            continue
        q = quantize_int8(w)[0].to(torch.float32)     # the integers the compiler reads
        if level["fmt"] == "ucomp":
            enc = encode_unstructured(q)
        else:
            try:
                enc = encode_weight(q, level["repeat"])
            except FormatError:              # it does not fit: the check will say so
                enc = encode_weight(project_weight(q, level["repeat"]), level["repeat"])
        out.append((name, ref, LayerAnnotation(name, level["fmt"], level["repeat"], enc)))
    return out


def foreign_nodes(proto: onnx.ModelProto, where: str, *, model: nn.Module | None = None,
                  layers: Any = None, problems: list[str]) -> list[AnnotatedNode]:
    """The declared compressed layers of an unannotated file, as annotated nodes.

    Layers that cannot be found are appended to ``problems``.

    Raises:
        CheckError: neither ``model`` nor ``layers`` given (the message says what to give).
    """
    graph = OnnxGraph(proto)
    if model is not None:
        plain, notes = _declared_from_model(model)
        refs = _map_by_model(graph, plain, list(notes), problems)
        found = [(name, refs[name], notes[name]) for name in notes if name in refs]
    elif layers is not None:
        declared = layers if isinstance(layers, Mapping) else load_layers_file(layers)
        found = _declared_from_file(graph, declared, problems)
    else:
        raise CheckError(f"{where} has no vbxfx annotations; export it with vbxfx.export_onnx, "
                         "or, for a file another tool exported (yolo export, torch.onnx.export),"
                         " give the compressed torch model (--model best.pt) or the layers "
                         "(--layers report.json) to check it against")
    logger.info("%s: %d declared layer(s) found in a file without annotations", where,
                len(found))
    return [AnnotatedNode(ref.node, ref.input_name, ann) for _, ref, ann in found]


def annotate_onnx(src: str | os.PathLike, model: nn.Module, dst: str | os.PathLike, *,
                  overwrite: bool = False) -> dict[str, str]:
    """Write a copy of ``src`` with vbxfx's annotations for ``model``'s compressed layers.

    Returns ``{layer: node name}``.

    Raises:
        CheckError: ``dst`` is ``src`` or exists (without ``overwrite``), or ``src`` unreadable.
        ExportError: a compressed layer that the file does not hold, or whose weight in the
            file does not fit its pattern.
    """
    from vbxfx.export.mapping import annotate
    from vbxfx.export.reader import load_onnx

    src_path, dst_path = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise CheckError(f"{dst_path}: the annotated copy must go to another file than the input")
    if os.path.exists(dst_path) and not overwrite:
        raise CheckError(f"{dst_path} exists; choose another name or allow overwriting")
    proto = load_onnx(src_path)
    if has_annotations(proto):
        raise CheckError(f"{src_path} already carries vbxfx annotations")
    plain, notes = _declared_from_model(model)
    layers = annotate(proto, plain, notes)
    try:
        onnx.save(proto, dst_path)
    except OSError as e:
        raise CheckError(f"{dst_path}: cannot write ({e.strerror or e})") from e
    return layers
