"""The real hand-off: vbxfx ONNX -> onnx2tf (its own environment) -> int8 TFLite -> check.

Needs the converter environment (``bash tools/setup_tflite_env.sh .venv-tflite``), found as
``vbxfx export`` finds it (``--onnx2tf``, ``VBXFX_ONNX2TF``, ``VBXFX_TFLITE_ENV``, PATH,
``./.venv-tflite``) or in the repository's ``.venv-tflite``. Skipped when it is absent,
unless ``VBXFX_REQUIRE_TFLITE`` is set (CI sets it): then a missing environment fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vbxfx
from vbxfx.cli.main import main
from vbxfx.inputs.demo import DemoNet
from vbxfx.export.tflite_reader import is_tflite, read_tflite

from converter import onnx2tf_or_skip

from tflite_files import independent_ucomp

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """DemoNet at 0.66 exported by vbxfx, then ``vbxfx export --tflite`` on it, once."""
    exe = onnx2tf_or_skip()
    root = tmp_path_factory.mktemp("handoff")
    x = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    result = vbxfx.compress(DemoNet(), x, compression=0.66)
    onnx_path, tfl, work = root / "model.onnx", root / "model.tflite", root / "work"
    vbxfx.export_onnx(result.model, x, str(onnx_path))
    (root / "report.json").write_text(json.dumps({"report": result.report}, default=str))
    torch.save(result.model, root / "model.pt")
    before = _sha(onnx_path)
    rc = main(["export", str(onnx_path), "--tflite", str(tfl), "--onnx2tf", exe,
               "--calib", "skimage:8", "--work-dir", str(work)])
    return dict(rc=rc, onnx=onnx_path, tflite=tfl, work=work, before=before, root=root,
                model=result.model, example=x)


def test_export_writes_a_checked_int8_tflite_and_keeps_the_onnx(converted):
    assert converted["rc"] == 0
    assert _sha(converted["onnx"]) == converted["before"]       # byte for byte
    assert len(vbxfx.read_annotations(converted["onnx"])) == 10
    assert is_tflite(converted["tflite"])
    assert (converted["work"] / "saved_model" / "model_full_integer_quant.tflite").read_bytes() \
        == converted["tflite"].read_bytes()
    # onnx2tf rewrote its private copy, not the user's file
    assert _sha(converted["work"] / "model.onnx") != converted["before"]


@pytest.mark.parametrize("expect", ["model.onnx", "report.json", "model.pt"])
def test_check_tflite_against_what_vbxfx_declared(converted, expect, capsys):
    assert main(["check", str(converted["tflite"]),
                 "--expect", str(converted["root"] / expect)]) == 0
    out = capsys.readouterr().out
    assert "declared: 10 layer(s) matched, repeat as declared on 10/10" in out
    assert out.rstrip().endswith("OK")


def test_the_compiler_view_agrees_with_the_onnx_check(converted):
    tfl = vbxfx.check_tflite(converted["tflite"], expect=str(converted["onnx"]))
    onnx = vbxfx.check_onnx(converted["onnx"])
    by_name = {r.name: r for r in onnx.layers}
    assert sorted(r.declared for r in tfl.layers) == sorted(by_name)
    for row in tfl.layers:
        ref = by_name[row.declared]
        assert (row.repeat, row.hw_macs, row.macs) == (ref.compiler_repeat, ref.hw_macs, ref.macs)
    assert tfl.dense_ops == {"DEPTHWISE_CONV_2D": 1} and not tfl.warnings


def test_one_edited_filter_byte_fails_naming_the_layer(converted, tmp_path, capsys):
    model = read_tflite(converted["tflite"])
    report = vbxfx.check_tflite(converted["tflite"], expect=str(converted["onnx"]))
    row = next(r for r in report.layers if r.declared_repeat == 1)
    op = model.operators[row.op_index]
    q = np.array(model.data(model.tensors[op.inputs[1]]))
    flat = q.reshape(-1)
    k = next(i for i in range(0, flat.size, 2) if (flat[i] == 0) != (flat[i + 1] == 0))
    k = k if flat[k] == 0 else k + 1                      # the zero of a half-full sub-pair
    raw = bytearray(converted["tflite"].read_bytes())
    start = bytes(raw).find(q.tobytes())
    assert start > 0 and bytes(raw).find(q.tobytes(), start + 1) == -1
    raw[start + k] = 1
    edited = tmp_path / "edited.tflite"
    edited.write_bytes(bytes(raw))
    assert main(["check", str(edited), "--expect", str(converted["onnx"])]) == 1
    out = capsys.readouterr().out
    assert (f"problem: layer {row.declared!r} (TFLite op {row.op_index} CONV_2D): the int8 "
            "filter fits repeat 2, vbxfx declared repeat 1") in out


def test_fully_connected_is_per_tensor_and_counted_as_the_file_holds_it(converted):
    import tflite                       # read apart from vbxfx's reader

    raw = converted["tflite"].read_bytes()
    fb = tflite.Model.GetRootAs(raw, 0)
    graph = fb.Subgraphs(0)
    fcs = [graph.Operators(k) for k in range(graph.OperatorsLength())
           if fb.OperatorCodes(graph.Operators(k).OpcodeIndex()).BuiltinCode()
           == tflite.BuiltinOperator.FULLY_CONNECTED]
    assert len(fcs) == 1
    filt = graph.Tensors(fcs[0].Inputs(1))
    assert filt.Quantization().ScaleLength() == 1            # one scale for the tensor
    q = fb.Buffers(filt.Buffer()).DataAsNumpy().view(np.int8).reshape(filt.ShapeAsNumpy())
    row = next(r for r in vbxfx.check_tflite(converted["tflite"]).layers
               if r.op == "FULLY_CONNECTED")
    assert not row.per_channel
    assert row.ucomp_mults == independent_ucomp(q)


def test_the_float32_tflite_is_refused(converted, capsys):
    f32 = converted["work"] / "saved_model" / "model_float32.tflite"
    assert main(["check", str(f32), "--expect", str(converted["onnx"])]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("  ")]
    assert len(err) == 1 and "float32 filter and float32 input: not a full-integer int8 TFLite" \
        in err[0]


def test_a_channel_pruned_model_goes_to_int8_tflite_with_every_repeat(tmp_path, capsys):
    """compress(methods=...) gives plain smaller layers and compressed ones: the converter
    takes them, and every declared repeat holds in the int8 filters."""
    exe = onnx2tf_or_skip()
    x = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    result = vbxfx.compress(DemoNet(), x, compression=0.8,
                            methods=("channels", "lowrank", "sparsity"))
    assert any(g["kept"] < g["channels"] for g in result.report["shrink"]["groups"])
    onnx_path, tfl = tmp_path / "small.onnx", tmp_path / "small.tflite"
    vbxfx.export_onnx(result.model, x, str(onnx_path))
    assert main(["export", str(onnx_path), "--tflite", str(tfl), "--onnx2tf", exe,
                 "--calib", "skimage:8", "--work-dir", str(tmp_path / "work")]) == 0
    declared = len(vbxfx.read_annotations(onnx_path))
    capsys.readouterr()
    assert main(["check", str(tfl), "--expect", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert f"repeat as declared on {declared}/{declared}\nOK" in out
