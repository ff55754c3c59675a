"""Read the vbxfx annotations back from an ONNX file.

>>> import vbxfx                                       # doctest: +SKIP
>>> notes = vbxfx.read_annotations("model.onnx")       # doctest: +SKIP
>>> notes["layer1.0.conv1"].repeat, notes["layer1.0.conv1"].encoding.mask.shape  # doctest: +SKIP
(2, torch.Size([64, 64, 3, 3]))
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from vbxfx.errors import CheckError
from vbxfx.export.annotations import (K_LAYER, LAYERS_KEY, SCHEMA_KEY, LayerAnnotation,
                                      decode_layer, layers_index, parse_schema)

__all__ = ["read_annotations", "load_onnx", "AnnotatedNode", "annotated_nodes"]


@dataclass(frozen=True)
class AnnotatedNode:
    """One annotated node: the node, its weight input and the decoded annotation."""

    node: onnx.NodeProto
    weight_input: str
    annotation: LayerAnnotation


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with a one-line CheckError for a missing file or one that is not ONNX."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckError(f"an ONNX file name is expected, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CheckError(f"{path}: not a file")
    try:
        proto = onnx.load(path, load_external_data=load_external_data)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckError(f"{path}: not an ONNX model ({type(e).__name__}: {first[:200]})") from e
    if not proto.graph.node and not proto.opset_import:
        raise CheckError(f"{path}: not an ONNX model (no graph and no opset in the file)")
    return proto


def annotated_nodes(proto: onnx.ModelProto, where: str) -> list[AnnotatedNode]:
    """Every annotated node of the main graph, decoded, in graph order.

    Raises:
        CheckError: no schema, a schema newer than this vbxfx, malformed annotations, two
            nodes for one layer, or a layer listed in ``vbxfx.layers`` whose node lost its
            annotation.
    """
    meta = {p.key: p.value for p in proto.metadata_props}
    parse_schema(meta.get(SCHEMA_KEY), where)
    index = layers_index(meta.get(LAYERS_KEY), where)
    found: list[AnnotatedNode] = []
    seen: dict[str, str] = {}
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if K_LAYER not in props:
            continue
        label = f"{where}: node {node.name!r}"
        ann = decode_layer(props, label)
        if ann.name in seen:
            raise CheckError(f"{label}: layer {ann.name!r} is annotated on nodes "
                             f"{seen[ann.name]!r} and {node.name!r}")
        seen[ann.name] = node.name
        found.append(AnnotatedNode(node, props["vbxfx.weight"], ann))
    lost = [f"{k!r} (node {v!r})" for k, v in index.items() if k not in seen]
    if lost:
        raise CheckError(f"{where}: annotation(s) of {', '.join(lost[:5])}"
                         f"{' ...' if len(lost) > 5 else ''} listed in {LAYERS_KEY} are missing "
                         "from the graph (a tool rewrote the nodes and dropped metadata_props?)")
    return found


def read_annotations(path: str | os.PathLike) -> dict[str, LayerAnnotation]:
    """``{torch fqn: LayerAnnotation}`` stored in an ONNX file written by :func:`export_onnx`.

    Encodings come back as the library builds them: ``mask`` (bool), ``pair_index`` (int64
    flat indices) and ``pair_sign`` (int8) in torch layout ``[O,I,kh,kw]`` / ``[O,I]``.

    Raises:
        CheckError: missing file, not ONNX, no or newer annotations, malformed values.
    """
    proto = load_onnx(path, load_external_data=False)
    return {a.annotation.name: a.annotation for a in annotated_nodes(proto, os.fspath(path))}
