"""Finding compressed layers in the exported graph (issue 17 items 3 and 4): weights reached
through Transpose / Reshape / Cast chains, layers the forward never calls, weights a parent
reads directly, and weights an exporter folds away (left unannotated, never claimed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import vbxfx
from test_export import compress_by_hand
from vbxfx.errors import ExportError
from vbxfx.export.graph import OnnxGraph
from vbxfx.export.onnx_export import annotate
from vbxfx.modules import from_dense, is_compressed


def _matmul_through(chain):
    """x [1, 4] @ W' where W' comes from the float16 initializer w [2, 4] (torch layout
    [O, I]) through ``chain`` (a list of (op, extra inputs, attributes))."""
    w = np.arange(8, dtype=np.float16).reshape(2, 4)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([4, 2], np.int64), "shape42")]
    nodes, name = [], "w"
    for k, (op, extra, attrs) in enumerate(chain):
        nodes.append(helper.make_node(op, [name, *extra], [f"t{k}"], **attrs))
        name = f"t{k}"
    nodes.append(helper.make_node("MatMul", ["x", name], ["y"], name="mm"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    return OnnxGraph(helper.make_model(g)), w


@pytest.mark.parametrize("chain", [
    [("Cast", [], {"to": TensorProto.FLOAT}), ("Transpose", [], {"perm": [1, 0]})],
    [("Cast", [], {"to": TensorProto.FLOAT}), ("Identity", [], {}), ("Transpose", [], {})],
    [("Transpose", [], {}), ("Reshape", ["shape42"], {}), ("Cast", [], {"to": TensorProto.FLOAT})],
])
def test_weight_followed_through_chains(chain):
    graph, w = _matmul_through(chain)
    ref = graph.weight(graph.graph.node[-1])
    assert ref is not None and ref.source == "w"
    assert ref.chain == tuple(op for op, _, _ in chain)
    np.testing.assert_array_equal(ref.torch_layout(), w.astype(np.float32))


def test_a_computed_weight_is_not_followed():
    graph, _ = _matmul_through([("Cast", [], {"to": TensorProto.FLOAT}), ("Relu", [], {})])
    assert graph.weight(graph.graph.node[-1]) is None


class Aux(nn.Module):
    """A main path and an auxiliary head that runs in training only (googlenet's aux_logits)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return (self.head(y), self.aux(y)) if self.training else self.head(y)


def test_a_layer_the_forward_never_calls_is_no_export_error(tmp_path):
    torch.manual_seed(0)
    model = Aux()
    report = vbxfx.compress_vbx3(model, 0.66)
    assert "aux" in report["layers"]                 # it trains: compressed
    model.eval()
    x = torch.randn(1, 8, 6, 6)
    path = tmp_path / "aux.onnx"
    export = vbxfx.export_onnx(model, x, path)
    assert set(export.layers) == {"conv", "head"}
    assert "not called by the forward" in export.skipped["aux"]
    assert "1 compressed layer(s) not annotated" in str(export)
    assert export.to_dict()["skipped"] == export.skipped
    assert is_compressed(model.aux)                  # the caller's model as it was
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=1)
    assert check.ok, str(check)


def test_a_weight_its_parent_reads_is_exported_dense(tmp_path):
    """nn.MultiheadAttention computes with ``out_proj.weight`` itself: a compressed out_proj
    changes nothing torch computes, so the file must hold the dense weight, unannotated."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = Block().eval()
    model.attn.out_proj = from_dense(model.attn.out_proj, repeat=1)   # by hand
    x = torch.randn(1, 5, 16)
    path = tmp_path / "mha.onnx"
    export = vbxfx.export_onnx(model, x, path)
    assert export.layers == {}
    assert "passed to multi_head_attention_forward" in export.skipped["attn.out_proj"]
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=1)
    assert check.ok, str(check)                     # onnxruntime computes what torch does


def test_a_weight_the_exporter_folded_away_is_left_out_not_claimed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4))
    model.eval()
    notes = compress_by_hand(model, {"0": 2, "3": 1})
    path = tmp_path / "m.onnx"
    vbxfx.export_onnx(model, torch.randn(1, 8, 6, 6), path, annotations=notes)
    proto = onnx.load(str(path))
    for node in proto.graph.node:                    # as if an optimizer folded the weight
        del node.metadata_props[:]
    inits = {t.name: t for t in proto.graph.initializer}
    gemm = next(n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul"))
    w = numpy_helper.to_array(inits[gemm.input[1]]).copy()
    w[0, :8] = np.arange(8)                          # no longer the layer's weight
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(w, gemm.input[1]))
    with pytest.raises(ExportError, match="layer '3': no Conv/Gemm/MatMul node"):
        annotate(proto, model, notes)
    skipped: dict[str, str] = {}
    layers = annotate(proto, model, notes, skipped)
    assert set(layers) == {"0"} and "no Conv/Gemm/MatMul node" in skipped["3"]
    assert {p.key for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")
            for p in n.metadata_props if p.key.startswith("vbxfx.")} == set()
