"""`vbxfx check` on ONNX files another tool exported: plain torch.onnx.export (BatchNorm
folded), checked against the compressed torch model or a layers file; annotate_onnx."""

from __future__ import annotations

import copy
import json
import warnings

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import vbxfx
from vbxfx.errors import CheckError, ExportError
from vbxfx.export.foreign import annotate_onnx, load_layers_file


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-2.0, 2.0)                 # negative scales too
    vbxfx.compress_vbx3(m, 0.66)
    return m.eval()


def _fused(m):
    """BatchNorm folded into the compressed convs the way ultralytics' fuse() does it."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    f = copy.deepcopy(m)
    for conv, bn in ((0, 1), (3, 4)):
        c, b = f[conv], f[bn]
        c.weight, c.bias = fuse_conv_bn_weights(c.weight, c.bias, b.running_mean, b.running_var,
                                                b.eps, b.weight, b.bias)
        f[bn] = nn.Identity()
    return f


@pytest.fixture(params=["bn", "fused"])
def exported(tmp_path, request):
    m = _model()
    path = tmp_path / "plain.onnx"
    source = _fused(m) if request.param == "fused" else m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (torch.randn(1, 16, 8, 8),), str(path), dynamo=False)
    has_bn = any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    assert has_bn == (request.param == "bn")
    return m, path


def _tamper(path, out, node_name_part):
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "Conv" and node_name_part in n.name)
    init = next(i for i in proto.graph.initializer if i.name == node.input[1])
    a = numpy_helper.to_array(init).copy()
    a[(0, slice(0, 8)) + (0,) * (a.ndim - 2)] = [0.3, 0.2, 0.1, 0.05, 0.4, 0.25, 0.15, 0.35]
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(proto, str(out))


def test_a_plain_export_checks_against_the_compressed_model(exported):
    m, path = exported
    report = vbxfx.check_onnx(path, torch_model=m, example_inputs=torch.randn(1, 16, 8, 8))
    assert report.ok, report.problems
    assert {r.name for r in report.layers} == {"0", "3", "8"}
    assert report.outputs                                   # same outputs: compared too
    assert any("no vbxfx annotations" in n for n in report.notes)


def test_a_tampered_plain_export_fails_naming_the_layer(exported, tmp_path):
    m, path = exported
    bad = tmp_path / "bad.onnx"
    _tamper(path, bad, "/0/")
    report = vbxfx.check_onnx(bad, torch_model=m)
    assert not report.ok
    assert any(p.startswith("layer '0'") and "does not fit" in p for p in report.problems)


def test_a_layers_file_declares_the_repeats(exported, tmp_path):
    m, path = exported
    repeats = {name: m.get_submodule(name).repeat for name in ("0", "3", "8")}
    assert 2 in repeats.values()                      # 0.66: some layers at 2:4
    good = tmp_path / "layers.json"
    good.write_text(json.dumps(repeats))
    assert vbxfx.check_onnx(path, layers=good).ok
    bad = tmp_path / "all_1_4.json"                  # claims 1:4 where the weights need 2:4
    bad.write_text(json.dumps({k: 1 for k in repeats}))
    report = vbxfx.check_onnx(path, layers=bad)
    failing = {k for k, v in repeats.items() if v == 2}
    assert not report.ok
    assert {p.split("'")[1] for p in report.problems} == failing
    assert all("does not fit repeat 1" in p for p in report.problems)


def test_a_compress_report_is_a_layers_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1))
    result = vbxfx.compress(model, torch.randn(1, 8, 12, 12), compression=0.6)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model": "x", "report": result.report}))
    declared = load_layers_file(path)
    assert set(declared) == {r["name"] for r in result.report["layers"] if r["fmt"] != "dense"}
    assert all(v["shape"] for v in declared.values())


def test_without_model_or_layers_the_error_says_what_to_give(exported):
    _, path = exported
    with pytest.raises(CheckError, match="--model"):
        vbxfx.check_onnx(path)


@pytest.mark.parametrize("content,match", [("[1, 2]", "expected the JSON report"),
                                           ('{"a": 3}', "repeat 3"), ("{oops", "not a JSON")])
def test_bad_layers_files(tmp_path, content, match):
    path = tmp_path / "l.json"
    path.write_text(content)
    with pytest.raises(CheckError, match=match):
        load_layers_file(path)


def test_annotate_writes_a_checked_copy_and_never_overwrites(exported, tmp_path):
    m, path = exported
    before = path.read_bytes()
    out = tmp_path / "annotated.onnx"
    layers = annotate_onnx(path, m, out)
    assert set(layers) == {"0", "3", "8"} and path.read_bytes() == before
    assert set(vbxfx.read_annotations(out)) == {"0", "3", "8"}
    assert vbxfx.check_onnx(out, torch_model=m).ok
    with pytest.raises(CheckError, match="exists"):
        annotate_onnx(path, m, out)
    with pytest.raises(CheckError, match="another file"):
        annotate_onnx(path, m, path)
    bad = tmp_path / "bad.onnx"
    _tamper(path, bad, "/0/")
    with pytest.raises(ExportError, match="'0'"):
        annotate_onnx(bad, m, tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()
