"""Cut an ONNX graph at named tensors: what the hardware runs ends there, the host does the rest.

The VectorBlox SDK's own YOLO tutorials cut their int8 TFLite files at the detection head's
convolutions (``tflite_cut``): everything after them (distribution-to-box decoding, sigmoid,
the concatenation of pixel boxes with probabilities) runs on the host in float. Left in the
int8 graph, that last concatenation puts box coordinates in pixels and class probabilities in
[0, 1] on one int8 grid, and every probability rounds to zero. :func:`cut_onnx` makes the cut
before conversion, on the ONNX graph: the kept nodes are copied unchanged (vbxfx's node
annotations included) and the model's metadata is kept.

>>> cut = cut_onnx(onnx.load("yolo.onnx"), ["/model.22/cv2.0/cv2.0.2/Conv_output_0"])  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence

from vbxfx.errors import ExportError

__all__ = ["cut_onnx"]

logger = logging.getLogger(__name__)


def cut_onnx(proto, outputs: Sequence[str], source: str = "the ONNX model"):
    """A copy of ``proto`` whose outputs are ``outputs`` (tensor names), with every node that
    does not lead to them removed.

    Raises:
        ExportError: no outputs, a name no node produces (closest names given), or weights
            stored as external data.
    """
    import onnx

    outputs = list(outputs)
    if not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise ExportError(f"cutting {source} needs one or more tensor names, got {outputs!r}")
    produced = {o for n in proto.graph.node for o in n.output if o}
    missing = [o for o in outputs if o not in produced]
    if missing:
        near = difflib.get_close_matches(missing[0], sorted(produced), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise ExportError(f"{source}: no node produces tensor {missing[0]!r}{hint}")
    if any(t.external_data for t in proto.graph.initializer):
        raise ExportError(f"{source} keeps its weights as external data; cutting it is not "
                          "supported (save it as one file first)")
    cut = _extract(proto, outputs)
    cut.ir_version = proto.ir_version
    cut.producer_name, cut.producer_version = proto.producer_name, proto.producer_version
    del cut.opset_import[:]
    cut.opset_import.extend(proto.opset_import)
    del cut.metadata_props[:]
    cut.metadata_props.extend(proto.metadata_props)
    cut.graph.name = proto.graph.name
    onnx.checker.check_model(cut)
    logger.info("cut %s at %d tensor(s): %d of %d nodes kept", source, len(outputs),
                len(cut.graph.node), len(proto.graph.node))
    return cut


def _extract(proto, outputs: list[str]):
    """The nodes ``outputs`` depend on, in the original order, with their weights and inputs;
    the outputs' types come from shape inference where it knows them (else float, shape
    unknown)."""
    import onnx
    from onnx import helper

    producer = {o: n for n in proto.graph.node for o in n.output if o}
    keep, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:               # subgraphs (If / Loop) read outer names
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                stack.extend(i for n in g.node for i in n.input if i)
    nodes = [n for n in proto.graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input} | set(outputs)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:                             # inference is only for the output types
        known = {}
    outs = [known[o] if o in known else helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
            for o in outputs]
    graph = helper.make_graph(
        nodes, proto.graph.name,
        [i for i in proto.graph.input if i.name in used],
        outs,
        initializer=[t for t in proto.graph.initializer if t.name in used],
        value_info=[v for v in proto.graph.value_info if v.name in used])
    return helper.make_model(graph)
