"""ONNX graph helpers: a layer node's constant weight in torch layout, and output shapes.

The weight of a Conv is its input 1 (``[O, I/groups, kh, kw]``, torch's layout). The weight
of a Gemm is input 1, ``[O, I]`` when ``transB=1`` and ``[I, O]`` otherwise; the weight of a
MatMul is input 1, ``[I, O]``. Inputs are followed through ``Identity`` nodes (the TorchScript
exporter deduplicates equal initializers that way) to an initializer or a ``Constant`` node.

>>> import onnx
>>> from onnx import helper, numpy_helper
>>> import numpy as np
>>> w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
>>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
...     [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [w])
>>> ref = OnnxGraph(helper.make_model(g)).weight(g.node[0])
>>> ref.source, ref.torch_layout().shape
('w', (2, 4))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["LAYER_OPS", "WeightRef", "OnnxGraph", "attribute"]

#: The ONNX ops whose weights vbxfx annotates.
LAYER_OPS = ("Conv", "Gemm", "MatMul")


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node attribute, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class WeightRef:
    """Where a layer node's weight comes from and how it maps to torch's layout."""

    node: onnx.NodeProto
    input_name: str          # the node's input (maybe an Identity output)
    source: str              # the initializer (or Constant output) holding the values
    array: np.ndarray        # the values as stored in ONNX
    transposed: bool         # torch layout is ``array.T`` (Gemm transB=0, MatMul)

    def torch_layout(self) -> np.ndarray:
        """The weight as torch holds it: ``[O, I, kh, kw]`` or ``[O, I]``."""
        return np.ascontiguousarray(self.array.T) if self.transposed else self.array


class OnnxGraph:
    """Index of one ONNX model's main graph: initializers, producers, shapes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producers = {out: n for n in self.graph.node for out in n.output}
        self._shapes: dict[str, tuple[int | None, ...]] | None = None

    def layer_nodes(self) -> list[onnx.NodeProto]:
        """The Conv/Gemm/MatMul nodes of the main graph, in graph order."""
        return [n for n in self.graph.node
                if n.op_type in LAYER_OPS and n.domain in ("", "ai.onnx")]

    def _constant(self, name: str) -> tuple[str, np.ndarray] | None:
        seen = 0
        while name not in self.initializers:
            node = self.producers.get(name)
            if node is None or seen > 64:
                return None
            if node.op_type == "Identity":
                name = node.input[0]
            elif node.op_type == "Constant" and attribute(node, "value") is not None:
                return name, numpy_helper.to_array(attribute(node, "value"))
            else:
                return None
            seen += 1
        return name, numpy_helper.to_array(self.initializers[name])

    def weight(self, node: onnx.NodeProto) -> WeightRef | None:
        """The node's constant weight, or None when it is computed or has an unusual rank."""
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            return None
        found = self._constant(node.input[1])
        if found is None:
            return None
        source, array = found
        if not np.issubdtype(array.dtype, np.floating):
            return None
        if node.op_type == "Conv":
            if array.ndim != 4:
                return None
            transposed = False
        elif array.ndim != 2:
            return None
        else:
            transposed = node.op_type == "MatMul" or not attribute(node, "transB", 0)
        return WeightRef(node, node.input[1], source, array, transposed)

    def output_shape(self, node: onnx.NodeProto) -> tuple[int | None, ...] | None:
        """Shape of the node's first output from ONNX shape inference (None if unknown)."""
        if self._shapes is None:
            self._shapes = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # shape inference is best effort: MACs become unknown
                inferred = self.model
            g = inferred.graph
            for vi in list(g.value_info) + list(g.output) + list(g.input):
                t = vi.type.tensor_type
                if t.HasField("shape"):
                    self._shapes[vi.name] = tuple(
                        d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        return self._shapes.get(node.output[0])

    def output_positions(self, node: onnx.NodeProto) -> int | None:
        """Output positions per batch element: ``H_out*W_out`` (Conv), 1 (Gemm), the
        product of the middle dims (MatMul); None when shape inference does not know."""
        shape = self.output_shape(node)
        if shape is None:
            return None
        if node.op_type == "Gemm":
            return 1
        dims = shape[2:] if node.op_type == "Conv" else shape[1:-1]
        if any(d is None for d in dims):
            return None
        return math.prod(dims)
