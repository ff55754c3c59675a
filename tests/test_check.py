"""check_onnx, the check command and vbxfx.testing: reports, tampering, numerics, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import vbxfx
import vbxfx.testing
from test_export import fold_scales, small_model, tamper
from vbxfx.check import main_check
from vbxfx.errors import CheckError
from vbxfx.export.annotations import LayerAnnotation
from vbxfx.format import encode_unstructured, project_unstructured


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small model (conv1 at repeat 1, conv2 and fc at 2, BN folded) and its file."""
    model, notes, x = small_model(fast=True)
    path = tmp_path_factory.mktemp("check") / "small.onnx"
    vbxfx.export_onnx(model, x, path, annotations=notes)
    return model, notes, x, str(path)


def _edit(path: str, out: str, edit) -> str:
    proto = onnx.load(path)
    edit(proto)
    onnx.save(proto, out)
    return out


def _set_meta(proto: onnx.ModelProto, key: str, value: str) -> None:
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value


# --------------------------------------------------------------------------- reports


def test_report_rows_macs_table_and_json(exported):
    model, notes, x, path = exported
    report = vbxfx.check_onnx(path, torch_model=model, example_inputs=x)
    assert report.ok and report.onnx_checker, str(report)
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"conv1", "conv2", "fc"}
    # counted by hand: conv1 16x3x3x3 on 16x16 (3 channels cost 8), conv2 32x16x3x3 on 7x7,
    # fc 10x32; the depthwise conv (32x9 on 7x7) is in the model total only
    assert (rows["conv1"].macs, rows["conv1"].hw_macs) == (110_592, 16 * 9 * 8 * 256 * 2 // 8)
    assert (rows["conv2"].macs, rows["conv2"].hw_macs) == (225_792, 112_896)
    assert (rows["fc"].macs, rows["fc"].hw_macs) == (320, 160)
    assert rows["conv1"].compiler_repeat == 1 and rows["conv2"].shape == (32, 16, 3, 3)
    totals = report.totals()
    assert totals["annotated_macs"] == 336_704
    assert totals["macs"] == totals["model_macs"] == 336_704 + 32 * 9 * 49
    # the whole model as `vbxfx compress` counts it: dense = every layer at R=4 with conv1's 3
    # channels padded to 8, the depthwise conv at its standard MACs; after = the compiler's R
    assert totals["hw_macs_dense"] == 16 * 9 * 8 * 256 + 225_792 + 32 * 9 * 49 + 320
    assert totals["hw_macs"] == 16 * 9 * 8 * 256 // 4 + 112_896 + 32 * 9 * 49 + 160
    assert totals["macs_removed"] == pytest.approx(1 - totals["hw_macs"] / totals["hw_macs_dense"])
    assert totals["compared"] == 3 and report.max_rel < report.rtol      # example + 2 random
    text = str(report)
    assert "conv2" in text and "HW MACs" in text and "225,792" in text and text.endswith("OK")
    data = json.loads(report.to_json())
    assert data["ok"] and data["totals"]["hw_macs"] == totals["hw_macs"]
    assert [r["name"] for r in data["layers"]] == ["conv1", "conv2", "fc"]


def test_user_inputs_lists_and_numpy(exported):
    model, _, x, path = exported
    sets = [x, (x.numpy() * 2,)]
    report = vbxfx.check_onnx(path, torch_model=model, inputs=sets, n_random=0)
    assert report.ok and [o.inputs for o in report.outputs] == ["inputs[0]", "inputs[1]"]
    assert vbxfx.check_onnx(path, n_random=1).ok                       # no torch model: ORT runs


# --------------------------------------------------------------------------- failures


def test_tampered_weight_names_node_and_block(exported, tmp_path, capsys):
    _, notes, _, path = exported
    flat = int((notes["conv2"].encoding.pair_index.reshape(-1) >= 0).nonzero()[5])
    bad = str(tmp_path / "tampered.onnx")
    node = tamper(path, bad, "conv2", flat, 1.25)
    report = vbxfx.check_onnx(bad, n_random=0)
    assert not report.ok
    row = next(r for r in report.layers if r.name == "conv2")
    assert not row.fits and not row.agrees and row.compiler_repeat == 4
    first = report.problems[0]
    assert f"layer 'conv2' (node {node!r})" in first and "block 0" in first
    assert "does not fit repeat 2" in first
    assert any("int8 magnitudes differ" in p for p in report.problems)
    assert main_check([bad, "--random", "0"]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "FAILED" in out


def test_one_changed_weight_fails_the_numerical_check(exported):
    """One weight of the classifier moves by one int8 step of its channel (the smallest
    change the hardware can see): the default tolerances catch it."""
    model, _, x, path = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        w = changed.fc.weight
        w[3, 5] += w[3].abs().max() / 127
    report = vbxfx.check_onnx(path, torch_model=changed, example_inputs=x)
    assert not report.ok and all(r.fits and r.agrees for r in report.layers)
    assert any("differs from torch: max abs error" in p for p in report.problems)
    with pytest.raises(AssertionError, match=r"output '.*' of .* differs from torch: max abs "
                                             r"error .*, max rel error"):
        vbxfx.testing.assert_onnx_equivalent(changed, path, x)
    vbxfx.testing.assert_onnx_equivalent(model, path, [x, torch.randn(1, 3, 16, 16)])


def test_ucomp_more_multiplies_than_declared(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight.copy_(project_unstructured(model[0].weight, 0.6))
    notes = {"0": LayerAnnotation("0", "ucomp", 0, encode_unstructured(model[0].weight.detach()))}
    path, bad = str(tmp_path / "u.onnx"), str(tmp_path / "bad.onnx")
    vbxfx.export_onnx(model, torch.randn(1, 32), path, annotations=notes)
    zero = int((~notes["0"].encoding.mask).reshape(-1).nonzero()[0])

    def fill(proto):
        gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
        init = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
        w = onnx.numpy_helper.to_array(init).copy()
        w.reshape(-1)[zero] = 0.3
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    _edit(path, bad, fill)
    report = vbxfx.check_onnx(bad, n_random=0)
    assert not report.layers[0].fits and "the annotation promises" in report.problems[0]
    assert any("mask does not match" in p for p in report.problems)


def test_zero_scale_fold_is_accepted(exported, tmp_path):
    """A BatchNorm with a zero scale leaves an all-zero output channel: still in format."""
    _, _, _, path = exported

    def zero_channel(proto):
        for node in proto.graph.node:
            if any(p.key == "vbxfx.layer" and p.value == "conv2" for p in node.metadata_props):
                init = next(t for t in proto.graph.initializer if t.name == node.input[1])
                w = onnx.numpy_helper.to_array(init).copy()
                w[4] = 0
                init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    folded = str(tmp_path / "folded.onnx")
    fold_scales(path, folded, seed=2)
    report = vbxfx.check_onnx(_edit(folded, str(tmp_path / "z.onnx"), zero_channel), n_random=0)
    assert report.ok, str(report)


# --------------------------------------------------------------------------- unusable input


def _plain_onnx(path: str) -> str:
    torch.onnx.export(nn.Conv2d(3, 4, 1).eval(), (torch.randn(1, 3, 4, 4),), path, dynamo=False)
    return path


def test_bad_files_raise_one_line_check_errors(exported, tmp_path):
    _, _, x, path = exported
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a model\n" * 20)
    newer = _edit(path, str(tmp_path / "newer.onnx"),
                  lambda p: _set_meta(p, "vbxfx.schema", "vbxfx.compression/2"))
    foreign = _edit(path, str(tmp_path / "foreign.onnx"),
                    lambda p: _set_meta(p, "vbxfx.schema", "acme.sparsity/1"))

    def strip(proto):
        node = next(n for n in proto.graph.node if n.op_type == "Gemm")
        del node.metadata_props[:]
    stripped = _edit(path, str(tmp_path / "stripped.onnx"), strip)

    def garble(proto):
        node = next(n for n in proto.graph.node if n.op_type == "Gemm")
        next(p for p in node.metadata_props if p.key == "vbxfx.mask").value = "not base64!"
    garbled = _edit(path, str(tmp_path / "garbled.onnx"), garble)
    cases = [(tmp_path / "missing.onnx", "no such file"),
             (not_onnx, "not an ONNX model"),
             (_plain_onnx(str(tmp_path / "plain.onnx")), "has no vbxfx annotations"),
             (newer, "newer than this vbxfx reads"),
             (foreign, "accepted is 'vbxfx.compression/1'"),
             (stripped, "'fc' .* are missing from the graph"),
             (garbled, "node .*fc.*vbxfx.mask is not base64")]
    for bad, words in cases:
        for call in (vbxfx.check_onnx, vbxfx.read_annotations):
            with pytest.raises(CheckError, match=words) as caught:
                call(bad)
            assert "\n" not in str(caught.value)


def test_bad_inputs_raise_check_errors(exported):
    model, _, x, path = exported
    cases = [(torch.randn(1, 3, 8, 8),
              r"input '.*' expects shape \[1,3,16,16\], got \[1, 3, 8, 8\]"),
             (x.double(), "expects float32, got float64"),
             ((x, x), "2 array\\(s\\) given, the ONNX model takes 1"),
             ("x", "expected Tensors or numpy arrays")]
    for inputs, words in cases:
        with pytest.raises(CheckError, match=words):
            vbxfx.check_onnx(path, torch_model=model, inputs=inputs)
    with pytest.raises(CheckError, match="expects shape"):
        vbxfx.testing.assert_onnx_equivalent(model, path, torch.randn(2, 3, 16, 16))
    with pytest.raises(CheckError, match="n_random"):
        vbxfx.check_onnx(path, n_random=-1)


# --------------------------------------------------------------------------- command line


def test_cli_exit_codes_and_output(exported, tmp_path, capsys):
    model, _, x, path = exported
    saved = str(tmp_path / "model.pt")
    torch.save(model, saved)
    good_input, bad_input = str(tmp_path / "x.npy"), str(tmp_path / "bad.npy")
    np.save(good_input, x.numpy())
    np.save(bad_input, np.zeros((1, 3, 5, 5), np.float32))

    assert main_check([path, "--model", saved, "--input", good_input]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime vs torch: 3 comparison(s)" in out and out.strip().endswith("OK")

    assert main_check([path, "--json", "--random", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and len(data["layers"]) == 3

    for argv, words in (([str(tmp_path / "missing.onnx")], "no such file"),
                        ([path, "--model", saved, "--input", bad_input], "expects shape"),
                        ([path, "--input", str(tmp_path / "none.npy")], "no such file"),
                        ([path, "--model", "nonsense:spec"], "nonsense:spec"),
                        ([_plain_onnx(str(tmp_path / "plain.onnx"))], "no vbxfx annotations")):
        assert main_check(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("vbxfx check: error:") and words in err and "\n" not in err
        assert "Traceback" not in captured.out + captured.err

    assert main_check([str(tmp_path / "missing.onnx"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out) == {
        "ok": False, "exit_code": 2, "error": f"{tmp_path / 'missing.onnx'}: no such file"}
    assert main_check([]) == 2                                          # argparse usage error
    assert "usage: vbxfx check" in capsys.readouterr().err


# --------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_export_float32_and_check_with_their_tolerances(dtype, tmp_path, caplog):
    """float16 failed the float32 tolerances, float64 gave a file onnxruntime cannot load."""
    from vbxfx.inputs.demo import DemoNet
    from vbxfx.check.tolerances import tolerances_for

    model = DemoNet().to(dtype)
    x = torch.randn(1, 3, 64, 64).to(dtype)
    compressed = vbxfx.compress(model, x, compression=0.66).model
    path = tmp_path / "m.onnx"
    with caplog.at_level("WARNING", logger="vbxfx.export.onnx_export"):
        vbxfx.export_onnx(compressed, x, path)
    assert "the ONNX file is float32" in caplog.text
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = vbxfx.check_onnx(path, torch_model=compressed, example_inputs=x)
    assert report.ok, str(report)
    assert (report.rtol, report.atol) == tolerances_for(dtype)
    assert report.max_rel > 0 and len(report.outputs) == 3
    vbxfx.testing.assert_onnx_equivalent(compressed, path, x)


def test_a_meta_model_is_one_clear_line_and_nothing_changes(exported):
    _, _, x, path = exported
    meta = nn.Sequential(nn.Conv2d(3, 16, 3, device="meta"), nn.Conv2d(16, 16, 3, device="meta"))
    for call, error in ((lambda: vbxfx.compress(meta, torch.randn(1, 3, 8, 8)), vbxfx.ConfigError),
                        (lambda: vbxfx.compress_vbx3(meta, 0.5), vbxfx.ConfigError),
                        (lambda: vbxfx.export_onnx(meta, torch.randn(1, 3, 8, 8), path + ".meta.onnx"),
                         vbxfx.ConfigError),
                        (lambda: vbxfx.check_onnx(path, torch_model=meta), CheckError)):
        with pytest.raises(error, match=r"parameter '0.weight' is on the meta device") as caught:
            call()
        assert "\n" not in str(caught.value)
    assert not any(vbxfx.is_compressed(m) for m in meta.modules())


def test_example_inputs_may_be_a_list(exported):
    model, _, x, path = exported
    report = vbxfx.check_onnx(path, torch_model=model, example_inputs=[x])
    assert report.ok and [o.inputs for o in report.outputs][0] == "example_inputs"


def test_report_says_when_and_why_it_did_not_compare(exported):
    model, _, x, path = exported
    alone = vbxfx.check_onnx(path, n_random=1)
    assert alone.ok and alone.not_compared == "no torch model given"
    assert "onnxruntime vs torch: not compared (no torch model given)" in str(alone)
    assert alone.to_dict()["not_compared"] == "no torch model given"
    assert vbxfx.check_onnx(path, torch_model=model, n_random=0).not_compared.startswith("no input")
    assert vbxfx.check_onnx(path, torch_model=model, example_inputs=x).not_compared is None


def test_a_torch_model_with_other_weights_is_named_as_the_cause(exported):
    model, _, x, path = exported
    fresh = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in fresh.parameters():
            p.copy_(torch.randn_like(p))
    report = vbxfx.check_onnx(path, torch_model=fresh, example_inputs=x)
    assert not report.ok
    hint = [p for p in report.problems if "weights are not the exported ones" in p]
    assert len(hint) == 1 and "3 of 3 annotated layer(s) differ" in hint[0]
    # one weight changed after the export: the hint names that layer alone
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc.weight[3, 5] += changed.fc.weight[3].abs().max() / 127
    report = vbxfx.check_onnx(path, torch_model=changed, example_inputs=x)
    hint = [p for p in report.problems if "weights are not the exported ones" in p]
    assert len(hint) == 1 and "(1 of 3 annotated layer(s) differ, e.g. 'fc')" in hint[0]
    assert vbxfx.check_onnx(path, torch_model=model, example_inputs=x).ok       # no false alarm
