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
>>> t = helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0])
>>> g2 = helper.make_graph([t, helper.make_node("MatMul", ["x2", "wt"], ["y"])], "g",
...     [helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, [1, 2])],
...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w])
>>> ref = OnnxGraph(helper.make_model(g2)).weight(g2.node[1])
>>> ref.source, ref.chain, ref.torch_layout().shape
('w', ('Transpose',), (4, 2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["LAYER_OPS", "CHAIN_OPS", "WeightRef", "OnnxGraph", "attribute"]

#: The ONNX ops whose weights vbxfx annotates.
LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: Ops followed back from a layer node's weight input to the constant behind it.
CHAIN_OPS = ("Identity", "Transpose", "Reshape", "Cast")
_MAX_CHAIN = 64


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
    array: np.ndarray        # the values as the node sees them (after ``chain``)
    transposed: bool         # torch layout is ``array.T`` (Gemm transB=0, MatMul)
    chain: tuple[str, ...] = field(default=())  # ops from the constant to the node, in order

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

    def _stored(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and attribute(node, "value") is not None:
            return numpy_helper.to_array(attribute(node, "value"))
        return None

    def _constant(self, name: str) -> tuple[str, np.ndarray, tuple[str, ...]] | None:
        """``(source, value as seen at name, ops applied)`` or None when ``name`` is computed
        from anything but one constant through :data:`CHAIN_OPS`."""
        steps: list[onnx.NodeProto] = []
        while (array := self._stored(name)) is None:
            node = self.producers.get(name)
            if node is None or node.op_type not in CHAIN_OPS or len(steps) >= _MAX_CHAIN:
                return None
            steps.append(node)
            name = node.input[0]
        source = name
        for node in reversed(steps):
            array = self._apply(node, array)
            if array is None:
                return None
        return source, array, tuple(n.op_type for n in reversed(steps))

    def _apply(self, node: onnx.NodeProto, array: np.ndarray) -> np.ndarray | None:
        if node.op_type == "Identity":
            return array
        if node.op_type == "Transpose":
            perm = attribute(node, "perm")
            return np.transpose(array, perm if perm is None else list(perm))
        if node.op_type == "Cast":
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(int(attribute(node, "to")))
            except (TypeError, KeyError, ValueError):
                return None
            return array.astype(dtype)
        # Reshape: the shape must be a constant; 0 copies the input dim (allowzero=0), -1 infers
        if len(node.input) < 2 or (shape := self._stored(node.input[1])) is None:
            return None
        dims = [int(d) for d in np.asarray(shape).reshape(-1)]
        if not attribute(node, "allowzero", 0):
            dims = [array.shape[i] if d == 0 and i < array.ndim else d for i, d in enumerate(dims)]
        try:
            return array.reshape(dims)
        except ValueError:
            return None

    def weight(self, node: onnx.NodeProto) -> WeightRef | None:
        """The node's constant weight, or None when it is computed or has an unusual rank."""
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            return None
        found = self._constant(node.input[1])
        if found is None:
            return None
        source, array, chain = found
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
        return WeightRef(node, node.input[1], source, array, transposed, chain)

    def output_shape(self, node: onnx.NodeProto) -> tuple[int | None, ...] | None:
        """Shape of the node's first output from ONNX shape inference (None if unknown)."""
        return self.shape_of(node.output[0])

    def shape_of(self, name: str) -> tuple[int | None, ...] | None:
        """Shape of a value (initializers too) from ONNX shape inference (None if unknown)."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
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
        return self._shapes.get(name)

    def complete_shapes(self, names: list[str]) -> bool:
        """Learn the shapes of ``names`` that shape inference left open (reshapes computed in
        the graph, as the TorchScript exporter writes for Swin) by one onnxruntime run on zero
        inputs; False when it cannot (dynamic graph inputs, a run that fails)."""
        import onnxruntime as ort

        shapes = self._shapes if self._shapes is not None else {}
        inits = set(self.initializers)
        feeds = {}
        for vi in self.graph.input:
            if vi.name in inits:
                continue
            shape = self.shape_of(vi.name)
            t = vi.type.tensor_type
            if shape is None or None in shape or not t.HasField("elem_type"):
                return False
            feeds[vi.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        known = {o.name for o in model.graph.output}
        wanted = [n for n in dict.fromkeys(names) if n not in known and n not in inits]
        for name in wanted:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        try:
            session = ort.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            outs = session.run(None, feeds)
        except Exception:  # best effort: the MAC totals stay unknown
            return False
        for meta, value in zip(session.get_outputs(), outs):
            shapes[meta.name] = tuple(np.shape(value))
        self._shapes = shapes
        return True

    def batch(self) -> int:
        """Dim 0 of the first graph input (1 when unknown): MAC figures are per batch element."""
        inits = set(self.initializers)
        for vi in self.graph.input:
            if vi.name not in inits:
                shape = self.shape_of(vi.name)
                if shape and isinstance(shape[0], int) and shape[0] > 0:
                    return shape[0]
                break
        return 1

    def node_macs(self, node: onnx.NodeProto) -> tuple[int, int] | None:
        """``(standard MACs, dense hardware MACs)`` of a Conv, ConvTranspose, Gemm or MatMul
        over the whole batch, constant weight or not; None for other ops or unknown shapes.

        Dense hardware MACs pad the input channels of a Conv with ``group == 1`` (and of a
        Gemm / MatMul with a constant 2-D weight, the hardware's 1x1 convolution) to
        multiples of 8 (VBX_FORMAT.md); other ops count their standard MACs.
        """
        if node.domain not in ("", "ai.onnx") or node.op_type not in (
                "Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            return None
        out = self.output_shape(node)
        a, b = self.shape_of(node.input[0]), self.shape_of(node.input[1])
        if out is None or a is None or b is None or None in out + a + b:
            return None
        pad = lambda c: -(-int(c) // 8) * 8  # noqa: E731
        if node.op_type == "Conv":
            per = math.prod(b[1:])                       # [O, I/g, k...]
            std = math.prod(out) * per
            if int(attribute(node, "group", 1)) == 1 and len(b) == 4:
                return std, math.prod(out) * pad(b[1]) * math.prod(b[2:])
            return std, std
        if node.op_type == "ConvTranspose":
            std = math.prod(a) * math.prod(b[1:])      # every input value scatters a kernel
            return std, std
        if node.op_type == "Gemm":
            k = a[0] if attribute(node, "transA", 0) else a[-1]
            std = math.prod(out) * k
        else:  # MatMul: [.., m, k] @ [.., k, n]
            k = a[-1] if len(a) > 1 or len(b) == 1 else a[0]
            std = (math.prod(out) if out else 1) * k
        if self.weight(node) is not None:                # a Linear: blocks along in_features
            return std, std // k * pad(k)
        return std, std

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
