"""Whole-model MAC totals of an ONNX file, counted as ``vbxfx compress`` counts them.

``model_macs`` gives the standard MACs of every Conv / ConvTranspose / Gemm / MatMul (attention
matmuls with two computed inputs too), the dense hardware MACs (R=4, input channels padded to
8 where the hardware reads blocks of 8: Conv with ``group == 1``, and Gemm / MatMul with a
constant weight), and the hardware MACs with each annotated layer at the multiplies the
compiler will use (``hw`` of its :class:`vbxfx.check.LayerRow`); every node fed by the same
weight as an annotated node (a Linear called several times; the dynamo exporter may fold one
transposed copy of it per call) counts at that rate too. All per image (the first graph
input's batch dim divides them).
"""

from __future__ import annotations

import numpy as np
import onnx

from vbxfx.export.graph import OnnxGraph, WeightRef
from vbxfx.export.mapping import proportional

__all__ = ["complete_shapes", "model_macs", "MAC_OPS"]

#: The ONNX ops whose multiplies are counted.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def complete_shapes(graph: OnnxGraph) -> None:
    """Shapes for every MAC node, by one onnxruntime run where shape inference stops."""
    mac_nodes = [n for n in graph.graph.node if n.op_type in MAC_OPS]
    if any(graph.node_macs(n) is None for n in mac_nodes):
        graph.complete_shapes([v for n in mac_nodes for v in (*n.input[:2], n.output[0])])


def model_macs(graph: OnnxGraph, annotated: list[tuple[onnx.NodeProto, int | None, int | None]]
               ) -> tuple[int | None, int | None, int | None]:
    """``(standard, dense hardware, hardware after)`` MACs per image of the whole graph; an
    annotated layer (and every node fed by the same weight) at the repeat the compiler will
    use, ucomp layers at their multiplies; ``(None, None, None)`` when a shape is unknown."""
    per_position: dict[str, tuple[int, int]] = {}  # weight source -> (hw mults, dense mults)
    by_shape: dict[tuple, list[tuple[np.ndarray, tuple[int, int]]]] = {}
    for node, hw, dense in annotated:
        ref = graph.weight(node)
        positions = graph.output_positions(node)
        if ref is None or not positions or hw is None or dense is None:
            continue  # not checkable: counted dense below
        rate = (hw // positions, dense // positions)
        per_position[ref.source] = rate
        w = ref.torch_layout()
        by_shape.setdefault(w.shape, []).append((w, rate))

    def rate_of(ref: WeightRef) -> tuple[int, int] | None:
        """The annotated weight a node holds: the same source, or (a constant the exporter
        folded per call, e.g. one transposed copy per MatMul) the same values."""
        if ref.source in per_position:
            return per_position[ref.source]
        w = ref.torch_layout()
        return next((rate for aw, rate in by_shape.get(w.shape, ()) if proportional(aw, w)),
                    None)

    std = dense_hw = after = 0
    for node in graph.graph.node:
        counted = graph.node_macs(node)
        if counted is None:
            if node.op_type in MAC_OPS:
                return None, None, None
            continue
        ref = graph.weight(node)
        std, dense_hw = std + counted[0], dense_hw + counted[1]
        rate = rate_of(ref) if ref is not None else None
        if rate is not None:
            mults, dense = rate
            after += counted[1] * mults // dense
        else:
            after += counted[1]
    batch = graph.batch()
    return std // batch, dense_hw // batch, after // batch
