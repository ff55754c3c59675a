"""Annotated ONNX export: schema round trip, layer mapping, both exporters, BN folding, errors."""

from __future__ import annotations

import base64
import json
import os
import zlib

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import vbxfx
from vbxfx.errors import CheckError, ConfigError, ExportError
from vbxfx.export.annotations import (SCHEMA, LayerAnnotation, decode_layer, encode_layer)
from vbxfx.modules import from_dense, is_compressed
from vbxfx.passes.finalize import finalize
from vbxfx.format import PairEncoding, encode_unstructured, from_blocks, project_unstructured, to_blocks

# --------------------------------------------------------------------------- helpers (shared)


def fit_fast(weight: torch.Tensor, repeat: int) -> torch.Tensor:
    """A weight near ``weight`` that fits ``repeat`` with every kept weight paired.

    Not a least-squares projection (that is ``vbxfx.project_weight``, too slow for whole
    real models on a shared CPU): repeat 2 keeps all 8 weights of a block as 4 pairs
    ``b2=b0, b3=-b1, b6=b4, b7=-b5``; repeat 1 keeps ``b0=b2`` and ``b4=b6``.
    """
    b = to_blocks(weight.detach()).clone()
    if repeat == 2:
        b[:, 2], b[:, 3], b[:, 6], b[:, 7] = b[:, 0], -b[:, 1], b[:, 4], -b[:, 5]
    elif repeat == 1:
        b[:, [1, 3, 5, 7]] = 0
        b[:, 2], b[:, 6] = b[:, 0], b[:, 4]
    return from_blocks(b, weight.shape).to(weight.dtype)


_PARTNERS = {2: [2, 3, 0, 1, 6, 7, 4, 5], 1: [2, 1, 0, 3, 6, 5, 4, 7]}


def fast_encoding(weight: torch.Tensor, repeat: int) -> PairEncoding:
    """``vbxfx.encode_weight`` of a ``fit_fast`` weight, built from its known pairs (the
    library's encoder searches every split; test_fast_encoding_is_encode_weight holds them
    equal)."""
    w = to_blocks(weight.detach())
    flat = to_blocks(torch.arange(weight.numel()).reshape(weight.shape), dtype=torch.int64,
                     pad_value=-1)
    partner = torch.tensor(_PARTNERS[repeat]).expand_as(flat)
    wp = w.gather(1, partner)
    paired = (w != 0) & (wp != 0) & (partner != torch.arange(8))
    index = torch.where(paired, flat.gather(1, partner), -1)
    sign = torch.where(paired, torch.where((w < 0) == (wp < 0), 1, -1), 0).to(torch.int8)
    return PairEncoding(repeat, (weight != 0).detach().clone(), from_blocks(index, weight.shape),
                        from_blocks(sign, weight.shape))


def eligible(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)]


def compress_by_hand(model: nn.Module, repeats: dict[str, int] | int = 2,
                     fast: bool = True) -> dict[str, LayerAnnotation]:
    """Make the layers fit in place (fit_fast or project_weight) and build their annotations."""
    names = eligible(model)
    if isinstance(repeats, int):
        repeats = {n: repeats for n in names}
    notes = {}
    for name, repeat in repeats.items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            fit = fit_fast if fast else vbxfx.project_weight
            w = fit(layer.weight, repeat)
            layer.weight.copy_(w)
        enc = (fast_encoding if fast else vbxfx.encode_weight)(layer.weight.detach(), repeat)
        notes[name] = LayerAnnotation(name, "comp", repeat, enc)
    return notes


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """BatchNorm statistics and affine terms that make folding non-trivial (negative scales)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def fold_scales(path: str, out: str, seed: int = 0, per_input: bool = False) -> None:
    """Multiply every annotated weight in ``path`` by one random scale per output channel
    (negative ones included), as a BatchNorm folded by a later optimizer would; with
    ``per_input`` the scale varies along the input channels instead (which is not a fold)."""
    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    rng = np.random.default_rng(seed)
    for node in proto.graph.node:
        if not any(p.key == "vbxfx.layer" for p in node.metadata_props):
            continue
        name = node.input[1]
        while name not in inits:
            name = producers[name].input[0]
        w = numpy_helper.to_array(inits[name])
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _trans_b(node))
        axis = 1 if transposed else 0
        if per_input:
            axis = 1 - axis if w.ndim == 2 else 1
        s = rng.uniform(0.2, 3.0, w.shape[axis]) * rng.choice([-1.0, 1.0], w.shape[axis])
        view = [1] * w.ndim
        view[axis] = -1
        inits[name].CopyFrom(numpy_helper.from_array((w * s.reshape(view)).astype(w.dtype), name))
    onnx.save(proto, out)


def _trans_b(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "transB"), 0)


def tamper(path: str, out: str, layer: str, flat: int, factor: float) -> str:
    """Scale one element (flat index in ONNX layout) of ``layer``'s weight; return the node name."""
    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if props.get("vbxfx.layer") != layer:
            continue
        name = node.input[1]
        while name not in inits:
            name = producers[name].input[0]
        w = numpy_helper.to_array(inits[name]).copy()
        w.reshape(-1)[flat] *= factor
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
        onnx.save(proto, out)
        return node.name
    raise KeyError(layer)


class SmallNet(nn.Module):
    """Conv+BN (stem with 3 channels), strided Conv+BN, depthwise (left dense), Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, groups=32, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.dw(x).mean((2, 3)))


def small_model(seed: int = 0, repeats=None, fast: bool = False):
    torch.manual_seed(seed)
    model = SmallNet().eval()
    randomize_bn(model, seed)
    notes = compress_by_hand(model, repeats or {"conv1": 1, "conv2": 2, "fc": 2}, fast=fast)
    return model, notes, torch.randn(1, 3, 16, 16)


def same_encoding(a, b) -> bool:
    return (a.repeat == b.repeat and a.format == b.format and torch.equal(a.mask, b.mask)
            and torch.equal(a.pair_index, b.pair_index) and torch.equal(a.pair_sign, b.pair_sign))


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("repeat", [1, 2])
@pytest.mark.parametrize("shape", [(16, 20, 3, 3), (3, 3, 1, 1), (12, 64)])
def test_fast_encoding_is_encode_weight(repeat, shape):
    torch.manual_seed(0)
    w = fit_fast(torch.randn(shape), repeat)
    w.view(-1)[::7] = 0.0                                    # some unpaired weights too
    assert vbxfx.weight_repeat(w) <= repeat
    assert same_encoding(fast_encoding(w, repeat), vbxfx.encode_weight(w, repeat))


def test_encode_decode_round_trip_comp_and_ucomp():
    torch.manual_seed(1)
    w = vbxfx.project_weight(torch.randn(4, 19, 3, 3), 2)
    comp = LayerAnnotation("a.conv", "comp", 2, vbxfx.encode_weight(w, 2))
    u = project_unstructured(torch.randn(6, 300), 0.6)
    u[0, 1], u[0, 250] = 0.5, -0.5               # a pair 249 channels apart: int16 offsets
    ucomp = LayerAnnotation("fc", "ucomp", 0, encode_unstructured(u))
    for ann, dtype in ((comp, "int8"), (ucomp, "int16")):
        props = encode_layer(ann, "w")
        assert props["vbxfx.pair_offset_dtype"] == dtype
        assert all(isinstance(v, str) for v in props.values())
        back = decode_layer(props, "node n")
        assert (back.name, back.fmt, back.repeat) == (ann.name, ann.fmt, ann.repeat)
        assert same_encoding(back.encoding, ann.encoding)


def test_schema_decodes_with_numpy_only():
    """The recipe of docs/onnx_schema.md, without torch."""
    w = torch.tensor([[5., 3., 3., -5., 2., 4., -4., 2.]])
    props = encode_layer(LayerAnnotation("fc", "comp", 2, vbxfx.encode_weight(w, 2)), "fc.weight")
    shape = tuple(int(d) for d in props["vbxfx.shape"].split(","))
    raw = lambda key: zlib.decompress(base64.b64decode(props[key]))
    n = int(np.prod(shape))
    mask = np.unpackbits(np.frombuffer(raw("vbxfx.mask"), np.uint8), count=n, bitorder="little")
    offset = np.frombuffer(raw("vbxfx.pair_offset"), props["vbxfx.pair_offset_dtype"])
    opposite = np.unpackbits(np.frombuffer(raw("vbxfx.pair_sign"), np.uint8), count=n,
                             bitorder="little")
    assert mask.tolist() == [1] * 8
    assert (np.arange(8) + offset).tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    assert opposite.tolist() == [1, 0, 0, 1, 0, 1, 1, 0]


def test_decode_rejects_malformed_values():
    w = vbxfx.project_weight(torch.randn(2, 8), 2)
    props = encode_layer(LayerAnnotation("fc", "comp", 2, vbxfx.encode_weight(w, 2)), "w")
    for key, value, words in (("vbxfx.mask", "%%%", "base64"), ("vbxfx.repeat", "3", "repeat 3"),
                              ("vbxfx.shape", "2,9", "bytes"),
                              ("vbxfx.pair_offset_dtype", "int64", "int64")):
        bad = dict(props, **{key: value})
        with pytest.raises(CheckError, match=words):
            decode_layer(bad, "node n")
    with pytest.raises(CheckError, match="missing: vbxfx.mask"):
        decode_layer({k: v for k, v in props.items() if k != "vbxfx.mask"}, "node n")


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("dynamo", [False, True])
def test_export_small_model_both_exporters(tmp_path, dynamo):
    model, notes, x = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.onnx"
    report = vbxfx.export_onnx(model, x, path, annotations=notes, dynamo=dynamo)
    assert report.exporter == ("dynamo" if dynamo else "torchscript")
    # nothing else is left beside the output: the dynamo exporter writes its weights to a
    # side file, which must end up inside the one self-contained .onnx
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert set(report.layers) == {"conv1", "conv2", "fc"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["vbxfx.schema"] == SCHEMA
    assert json.loads(meta["vbxfx.layers"]) == report.layers
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= {"Conv", "Gemm", "Relu", "ReduceMean", "Identity", "Constant", "Reshape",
                   "Flatten", "Squeeze", "Unsqueeze", "Add", "Mul", "Div", "Sub"}, ops
    assert "BatchNormalization" not in ops                    # folded by the exporter
    back = vbxfx.read_annotations(path)
    assert set(back) == set(notes)
    for name, ann in notes.items():
        assert isinstance(back[name], LayerAnnotation)
        assert back[name].encoding.mask.shape == model.get_submodule(name).weight.shape
        assert same_encoding(back[name].encoding, ann.encoding)
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x)
    assert check.ok, str(check)


def test_export_maps_layers_by_value_when_names_are_lost(tmp_path):
    """TorchScript renames BN-folded weights (onnx::Conv_*); the mapping must still be right,
    also between two layers of equal shape."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    randomize_bn(model, 3)
    notes = compress_by_hand(model, {"0": 1, "3": 2})
    path = tmp_path / "seq.onnx"
    report = vbxfx.export_onnx(model, torch.randn(1, 8, 8, 8), path, annotations=notes)
    proto = onnx.load(str(path))
    names = {n.name: n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert all(not names[node].endswith(".weight") for node in report.layers.values())
    back = vbxfx.read_annotations(path)
    assert back["0"].repeat == 1 and back["3"].repeat == 2
    assert vbxfx.check_onnx(path, torch_model=model, example_inputs=torch.randn(1, 8, 8, 8)).ok


def test_export_ucomp_layer(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 12)).eval()
    with torch.no_grad():
        model[1].weight.copy_(project_unstructured(model[1].weight, 0.7))
    notes = {"1": LayerAnnotation("1", "ucomp", 0, encode_unstructured(model[1].weight.detach()))}
    path = tmp_path / "u.onnx"
    vbxfx.export_onnx(model, torch.randn(2, 40), path, annotations=notes)
    back = vbxfx.read_annotations(path)
    assert back["1"].fmt == "ucomp" and same_encoding(back["1"].encoding, notes["1"].encoding)
    report = vbxfx.check_onnx(path, torch_model=model, example_inputs=torch.randn(2, 40))
    assert report.ok, str(report)
    row = report.layers[0]
    assert row.hw_macs == vbxfx.unstructured_macs(model[1].weight) <= round(0.3 * 480)


def test_export_vbx_modules_are_finalized_on_a_copy(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    model[0] = from_dense(model[0], repeat=2)
    model[3] = from_dense(model[3], repeat=1)
    path = tmp_path / "vbx.onnx"
    x = torch.randn(1, 8, 8, 8)
    report = vbxfx.export_onnx(model, x, path)
    assert is_compressed(model[0]) and is_compressed(model[3])   # not finalized
    assert set(report.layers) == {"0", "3"}
    back = vbxfx.read_annotations(path)
    _, expected = finalize(model)
    for name in ("0", "3"):
        assert same_encoding(back[name].encoding, expected[name].encoding)
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x)
    assert check.ok, str(check)


def test_export_accepts_pair_encodings_and_empty_annotations(tmp_path, caplog):
    model, notes, x = small_model(fast=True)
    encs = {k: v.encoding for k, v in notes.items()}
    report = vbxfx.export_onnx(model, x, tmp_path / "e.onnx", annotations=encs)
    assert set(report.layers) == set(encs)
    report = vbxfx.export_onnx(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4), tmp_path / "d.onnx")
    assert report.layers == {}
    assert "no compressed layer" in caplog.text
    assert vbxfx.read_annotations(tmp_path / "d.onnx") == {}


# --------------------------------------------------------------------------- BN folding


def test_bn_folding_per_output_channel_keeps_every_layer_in_format(tmp_path):
    model, notes, x = small_model(fast=True)
    path, folded, broken = (str(tmp_path / n) for n in ("m.onnx", "folded.onnx", "broken.onnx"))
    vbxfx.export_onnx(model, x, path, annotations=notes)
    fold_scales(path, folded)
    report = vbxfx.check_onnx(folded, n_random=0)
    assert report.ok and all(r.fits and r.agrees for r in report.layers), str(report)
    fold_scales(path, broken, per_input=True)        # not a fold: breaks the equal magnitudes
    report = vbxfx.check_onnx(broken, n_random=0)
    assert not report.ok and not any(r.fits for r in report.layers if r.repeat < 4)


# --------------------------------------------------------------------------- errors


def test_export_errors_name_what_failed(tmp_path):
    model, notes, x = small_model(fast=True)
    with pytest.raises(ExportError, match="'nope' is not a submodule"):
        vbxfx.export_onnx(model, x, tmp_path / "a.onnx",
                          annotations={"nope": LayerAnnotation("nope", "comp", 2,
                                                               notes["conv2"].encoding)})
    with pytest.raises(ExportError, match="'dw' is a Conv2d with groups=32"):
        enc = vbxfx.encode_weight(model.dw.weight.detach(), 4)
        vbxfx.export_onnx(model, x, tmp_path / "a.onnx",
                          annotations={"dw": LayerAnnotation("dw", "comp", 4, enc)})
    with pytest.raises(ExportError, match="does not exist"):
        vbxfx.export_onnx(model, x, tmp_path / "missing" / "a.onnx", annotations=notes)
    with pytest.raises(ConfigError, match="example_inputs"):
        vbxfx.export_onnx(model, "x", tmp_path / "a.onnx", annotations=notes)
    with pytest.raises(ExportError, match="annotation for layer 'fc'"):
        vbxfx.export_onnx(model, x, tmp_path / "a.onnx", annotations={"fc": 3})
    # a weight that does not hold its annotation: the layer and the block are named
    lying = dict(notes)
    lying["conv2"] = LayerAnnotation("conv2", "comp", 1, vbxfx.encode_weight(
        fit_fast(model.conv2.weight, 1), 1))
    with pytest.raises(ExportError, match=r"layer 'conv2'.*block 0 .*does not fit repeat 1"):
        vbxfx.export_onnx(model, x, tmp_path / "a.onnx", annotations=lying)
    assert not (tmp_path / "a.onnx").exists()


def test_schema_doc_recipe_decodes_an_exported_file(tmp_path):
    """The numpy-only decoder printed in docs/onnx_schema.md, run as it is written."""
    import pathlib
    import re
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "onnx_schema.md"
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(doc), "exec"), scope)
    model, notes, x = small_model(fast=True)
    path = str(tmp_path / "m.onnx")
    vbxfx.export_onnx(model, x, path, annotations=notes)
    rows = {r[0]: r for r in scope["layers"](path)}
    assert set(rows) == set(notes)
    for name, (_, _, fmt, repeat, mask, offset, opposite) in rows.items():
        enc = notes[name].encoding
        assert (fmt, repeat) == ("comp", enc.repeat)
        assert np.array_equal(mask, enc.mask.numpy())
        flat = np.arange(mask.size).reshape(mask.shape)
        stride = int(np.prod(mask.shape[2:])) if mask.ndim == 4 else 1
        index = np.where(offset != 0, flat + offset * stride, -1)
        assert np.array_equal(index, enc.pair_index.numpy())
        assert np.array_equal(opposite, enc.pair_sign.numpy() < 0)


@pytest.mark.parametrize("dynamo", [False, True])
def test_equal_weights_map_to_their_own_nodes(tmp_path, dynamo):
    """Two layers with one and the same weight values (the TorchScript exporter then keeps a
    single initializer): the module path decides which node is whose."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    with torch.no_grad():
        model[0].weight.copy_(fit_fast(model[0].weight, 1))
        model[2].weight.copy_(model[0].weight)
    enc = fast_encoding(model[0].weight, 1)                  # fits 1, so it fits 2 as well
    as_two = PairEncoding(2, enc.mask, enc.pair_index, enc.pair_sign)
    # "2" first: graph order alone would give it the first node
    notes = {"2": LayerAnnotation("2", "comp", 1, enc), "0": LayerAnnotation("0", "comp", 2, as_two)}
    path = tmp_path / "twins.onnx"
    report = vbxfx.export_onnx(model, torch.randn(1, 16), path, annotations=notes, dynamo=dynamo)
    proto = onnx.load(str(path))
    order = [n.name for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert [report.layers["0"], report.layers["2"]] == order
    assert {k: a.repeat for k, a in vbxfx.read_annotations(path).items()} == {"0": 2, "2": 1}
