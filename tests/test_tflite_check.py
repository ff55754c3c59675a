"""vbxfx check model.tflite on TFLite files written here with the flatbuffers builder.

No TensorFlow and no onnx2tf: these run everywhere. The real onnx2tf round trip is in
test_tflite_export.py.
"""

from __future__ import annotations

import json
import os
import numpy as np
import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.cli.main import main
from vbxfx.errors import CheckError
from vbxfx.export.tflite_reader import read_tflite
from vbxfx.check.tflite_expect import Declared, match_layers

from tflite_files import independent_ucomp, write_tflite


def per_channel(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """int8 filter in TFLite's OHWI order (per output channel) and its scales."""
    q, s = vbxfx.quantize_int8(w)
    q = q.permute(0, 2, 3, 1) if q.dim() == 4 else q
    return q.numpy(), s.numpy()


def per_tensor(w: torch.Tensor) -> tuple[np.ndarray, float]:
    scale = float(w.abs().max()) / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8).numpy(), scale


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A CONV_2D at repeat 1 (16x16x3x3 on 8x8 -> 6x6) and a per-tensor FULLY_CONNECTED at
    repeat 2 (10x64), plus a depthwise layer that the compiler leaves dense."""
    g = torch.Generator().manual_seed(0)
    conv = vbxfx.project_weight(torch.randn(16, 16, 3, 3, generator=g), 1)
    fc = vbxfx.project_weight(torch.randn(10, 64, generator=g), 2)
    qc, sc = per_channel(conv)
    qf, sf = per_tensor(fc)
    qd = np.random.default_rng(0).integers(-127, 128, (1, 3, 3, 16)).astype(np.int8)
    path = tmp_path_factory.mktemp("tfl") / "small.tflite"
    write_tflite(path, [
        dict(op="CONV_2D", filter=qc, scale=sc, input=(1, 8, 8, 16), output=(1, 6, 6, 16),
             name="model/tf.nn.convolution/convolution"),
        dict(op="DEPTHWISE_CONV_2D", filter=qd, scale=np.full(16, 0.01), input=(1, 6, 6, 16),
             output=(1, 6, 6, 16), name="dw"),
        dict(op="FULLY_CONNECTED", filter=qf, scale=sf, input=(1, 64), output=(1, 10),
             name="model/tf.linalg.matmul/MatMul")])
    report = {"layers": [
        {"name": "conv", "fmt": "comp", "repeat": 1, "weight_shape": [16, 16, 3, 3]},
        {"name": "dw", "fmt": "dense", "repeat": 4, "weight_shape": [16, 1, 3, 3],
         "reason": "depthwise conv (groups=16)"},
        {"name": "fc", "fmt": "comp", "repeat": 2, "weight_shape": [10, 64]}]}
    expect = path.parent / "report.json"
    expect.write_text(json.dumps({"model": "test", "report": report}))
    return path, expect, qc, qf


def test_reader_reads_what_was_written(small):
    path, _, qc, qf = small
    model = read_tflite(path)
    assert [op.op for op in model.operators] == ["CONV_2D", "DEPTHWISE_CONV_2D",
                                                 "FULLY_CONNECTED"]
    conv = model.tensors[model.operators[0].inputs[1]]
    assert conv.dtype == "int8" and conv.shape == (16, 3, 3, 16)
    assert conv.quantization.per_channel and conv.quantization.axis == 0
    np.testing.assert_array_equal(model.data(conv), qc)
    fc = model.tensors[model.operators[2].inputs[1]]
    assert not fc.quantization.per_channel
    np.testing.assert_array_equal(model.data(fc), qf)
    raw = path.read_bytes()          # the offset points at the filter's bytes in the file
    assert raw[conv.data_offset:conv.data_offset + conv.data_size] == qc.tobytes()


def test_repeats_and_hardware_macs(small):
    path, _, qc, qf = small
    report = vbxfx.check_tflite(path)
    assert report.ok, str(report)
    conv, fc = report.layers
    assert (conv.op, conv.repeat, conv.positions) == ("CONV_2D", 1, 36)
    assert (fc.op, fc.repeat, fc.positions, fc.per_channel) == ("FULLY_CONNECTED", 2, 1, False)
    # O * kh*kw * ceil(I/8)*8 * H_out*W_out * 2R/8, by hand
    assert (conv.macs, conv.hw_macs) == (16 * 9 * 16 * 36, 16 * 9 * 16 * 36 * 2 // 8)
    assert (fc.macs, fc.hw_macs) == (640, 320)
    assert report.dense_ops == {"DEPTHWISE_CONV_2D": 1}
    assert conv.ucomp_mults == independent_ucomp(qc)
    assert report.totals()["hw_macs"] == 16 * 9 * 16 * 36 // 4 + 320


def test_per_tensor_fully_connected_counted_as_the_file_holds_it(tmp_path):
    # row 1's two largest weights differ by 0.5 %: per channel they stay 127 and 126 (two
    # multipliers), with the one scale of the tensor (set by row 0) both become 3 (one).
    w = torch.zeros(4, 8)
    w[0, 0], w[0, 2] = 1.0, 0.5
    w[1, 0], w[1, 1] = 0.02, 0.0199
    w[2, 2], w[2, 3], w[3, 4] = 0.3, -0.3, 0.7
    q, scale = per_tensor(w)
    path = tmp_path / "fc.tflite"
    write_tflite(path, [dict(op="FULLY_CONNECTED", filter=q, scale=scale, input=(1, 8),
                             output=(1, 4), name="fc")])
    row = vbxfx.check_tflite(path).layers[0]
    assert not row.per_channel
    assert row.ucomp_mults == independent_ucomp(q) == 5
    assert vbxfx.unstructured_macs(w) == 6          # the per-channel count differs
    assert row.ucomp_macs == 5


def test_expect_report_passes_and_an_edited_byte_fails(small, tmp_path, capsys):
    path, expect, qc, _ = small
    assert main(["check", str(path), "--expect", str(expect)]) == 0
    out = capsys.readouterr().out
    assert "repeat as declared on 2/2" in out and "OK" in out
    # one int8 value: a zero beside a nonzero in one sub-pair breaks repeat 1
    flat = qc.reshape(-1)
    k = next(i for i in range(0, flat.size, 2) if (flat[i] == 0) != (flat[i + 1] == 0))
    k = k if flat[k] == 0 else k + 1
    raw = bytearray(path.read_bytes())
    start = bytes(raw).find(qc.tobytes())
    assert start > 0 and bytes(raw).find(qc.tobytes(), start + 1) == -1
    raw[start + k] = 1
    edited = tmp_path / "edited.tflite"
    edited.write_bytes(bytes(raw))
    assert main(["check", str(edited), "--expect", str(expect)]) == 1
    out = capsys.readouterr().out
    assert "problem: layer 'conv' (TFLite op 0 CONV_2D): the int8 filter fits repeat 2, " \
           "vbxfx declared repeat 1" in out
    assert "FAILED (1 problem(s))" in out
    assert main(["check", str(edited), "--expect", str(expect), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert not data["ok"] and data["layers"][0]["repeat"] == 2


def test_ucomp_declared_fewer_multipliers_is_a_warning(small, tmp_path):
    path, _, qc, qf = small
    mults = independent_ucomp(qf)
    report = {"layers": [{"name": "fc", "fmt": "ucomp", "repeat": None, "weight_shape": [10, 64],
                          "macs_before": 640, "macs_after": mults - 1}]}
    expect = tmp_path / "u.json"
    expect.write_text(json.dumps(report))
    result = vbxfx.check_tflite(path, expect=str(expect))
    assert result.ok
    assert result.layers[1].declared == "fc" and result.layers[1].declared_mults == mults - 1
    assert any(f"needs {mults:,} multipliers per output position where vbxfx counted "
               f"{mults - 1:,}" in w and "per tensor" in w for w in result.warnings)


def test_matching_by_content_when_shapes_repeat(tmp_path):
    torch.manual_seed(0)
    compressed = nn.Sequential(vbxfx.VBXConv2d.from_dense(nn.Conv2d(16, 16, 3), repeat=1),
                               vbxfx.VBXConv2d.from_dense(nn.Conv2d(16, 16, 3), repeat=2))
    w0, w1 = (compressed.get_submodule(k).compressed_weight().detach() for k in ("0", "1"))
    q0, s0 = per_channel(w0)
    q1, s1 = per_channel(w1)
    path = tmp_path / "swapped.tflite"          # the file holds layer "1" first
    write_tflite(path, [dict(op="CONV_2D", filter=q1, scale=s1, input=(1, 8, 8, 16),
                             output=(1, 6, 6, 16), name="b"),
                        dict(op="CONV_2D", filter=q0, scale=s0, input=(1, 10, 10, 16),
                             output=(1, 8, 8, 16), name="a")])
    report = vbxfx.check_tflite(path, expect=compressed)
    assert report.ok, str(report)
    assert [(r.declared, r.repeat, r.declared_repeat) for r in report.layers] == \
        [("1", 2, 2), ("0", 1, 1)]
    # the content decides: by order alone the repeats would not agree
    by_order, _ = match_layers([((16, 3, 3, 16), q0, None), ((16, 3, 3, 16), q1, None)],
                               [Declared("x", "comp", 1, (16, 16, 3, 3)),
                                Declared("y", "comp", 2, (16, 16, 3, 3))])
    assert [d.name for d in by_order] == ["x", "y"]


def test_warns_where_quantization_raised_the_scale(tmp_path):
    g = torch.Generator().manual_seed(1)
    q, s = per_channel(vbxfx.project_weight(torch.randn(16, 16, 1, 1, generator=g), 2))
    q = q.copy()
    q[:4] = np.round(q[:4] / 4).astype(np.int8)      # 4 channels at a 4x scale
    q[4:12] = 0                                      # 8 channels lost all weights
    path = tmp_path / "raised.tflite"
    write_tflite(path, [dict(op="CONV_2D", filter=q, scale=s, input=(1, 4, 4, 16),
                             output=(1, 4, 4, 16), name="model/tf.nn.convolution_7/convolution")])
    report = vbxfx.check_tflite(path)
    assert report.ok and len(report.warnings) == 1
    text = report.warnings[0]
    assert "TFLite op 0 CONV_2D (filter 'model/tf.nn.convolution_7/convolution')" in text
    assert "in 4 of 16 output channels" in text and "8 of 16 output channels are all zero" in text


@pytest.mark.parametrize("kind", ["float32", "onnx", "junk", "truncated", "missing"])
def test_unusable_files_exit_2_with_one_line(kind, small, tmp_path, capsys):
    path = tmp_path / "model.tflite"
    if kind == "float32":
        write_tflite(path, [dict(op="CONV_2D", filter=np.ones((8, 1, 1, 8), np.int8),
                                 scale=np.ones(8), input=(1, 2, 2, 8), output=(1, 2, 2, 8))],
                     float_model=True)
        expected = "not a full-integer int8 TFLite"
    elif kind == "onnx":
        path = tmp_path / "model.onnx"
        vbxfx.export_onnx(nn.Sequential(nn.Conv2d(8, 8, 1)), torch.randn(1, 8, 4, 4), str(path))
        path = path.rename(tmp_path / "model.tflite")
        expected = "not a TFLite file (no 'TFL3' identifier at byte 4)"
    elif kind == "junk":
        path.write_bytes(b"\x00" * 64)
        expected = "not a TFLite file"
    elif kind == "truncated":
        path.write_bytes(small[0].read_bytes()[:200])
        expected = "does not parse"
    else:
        expected = "no such file"
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if not ln.startswith("  ")]   # progress
    assert len(lines) == 1 and lines[0].startswith("vbxfx check: error: ") and expected in lines[0]
    with pytest.raises(CheckError, match="no such file|not a|does not parse"):
        vbxfx.check_tflite(path)


def test_bad_expect_and_onnx_options(small, tmp_path, capsys):
    path, _, _, _ = small
    other = tmp_path / "notes.txt"
    other.write_text("x")
    assert main(["check", str(path), "--expect", str(other)]) == 2
    assert "unknown kind of file" in capsys.readouterr().err
    assert main(["check", str(path), "--model", "demo"]) == 2
    assert "--model applies to ONNX files" in capsys.readouterr().err
    onnx_path = tmp_path / "m.onnx"
    vbxfx.export_onnx(nn.Sequential(nn.Conv2d(8, 8, 1)), torch.randn(1, 8, 4, 4), str(onnx_path))
    assert main(["check", str(onnx_path), "--expect", str(path)]) == 2
    assert "--expect applies to .tflite files" in capsys.readouterr().err


def test_export_without_onnx2tf_says_how_to_install(tmp_path, capsys, monkeypatch):
    onnx_path = tmp_path / "m.onnx"
    vbxfx.export_onnx(nn.Sequential(nn.Conv2d(3, 8, 1)), torch.randn(1, 3, 8, 8), str(onnx_path))
    before = onnx_path.read_bytes()
    assert main(["export", str(onnx_path), "--tflite", str(tmp_path / "m.tflite"),
                 "--onnx2tf", str(tmp_path / "nowhere" / "onnx2tf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tools/setup_tflite_env.sh" in err[0]
    existing = tmp_path / "old.tflite"
    existing.write_bytes(b"keep me")
    assert main(["export", str(onnx_path), "--tflite", str(existing)]) == 2
    assert "exists; vbxfx does not overwrite it (give --force)" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me" and onnx_path.read_bytes() == before


def test_export_refuses_unusable_inputs_before_converting(tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    vbxfx.export_onnx(nn.Sequential(nn.Conv2d(3, 8, 1)), torch.randn(1, 3, 8, 8), str(onnx_path))
    bad = tmp_path / "calib.npy"
    np.save(bad, np.zeros((4, 3, 16, 16), np.float32))
    out = tmp_path / "m.tflite"
    args = ["export", str(onnx_path), "--tflite", str(out), "--onnx2tf", "/bin/true"]
    assert main(args + ["--calib", str(bad)]) == 2
    assert "has shape (4, 3, 16, 16); the model takes [N, 3, 8, 8]" in capsys.readouterr().err

    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    two = tmp_path / "two.onnx"
    torch.onnx.export(Two(), (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), str(two),
                      dynamo=False)
    assert main(["export", str(two), "--tflite", str(out), "--onnx2tf", "/bin/true"]) == 2
    assert "2 graph inputs" in capsys.readouterr().err
    assert not out.exists()


def test_matching_by_output_size_when_the_file_order_differs(tmp_path):
    # YOLO's heads: same filter shape at 80x80, 40x40, 20x20, and onnx2tf reorders them
    g = torch.Generator().manual_seed(2)
    w1, w2 = (vbxfx.project_weight(torch.randn(8, 8, 1, 1, generator=g), r) for r in (1, 2))
    (q1, s1), (q2, s2) = per_channel(w1), per_channel(w2)
    path = tmp_path / "heads.tflite"
    write_tflite(path, [dict(op="CONV_2D", filter=q2, scale=s2, input=(1, 4, 4, 8),
                             output=(1, 4, 4, 8), name="small"),
                        dict(op="CONV_2D", filter=q1, scale=s1, input=(1, 8, 8, 8),
                             output=(1, 8, 8, 8), name="large")])
    rows = [{"name": "head.large", "fmt": "comp", "repeat": 1, "weight_shape": [8, 8, 1, 1],
             "macs_before": 8 * 8 * 64},
            {"name": "head.small", "fmt": "comp", "repeat": 2, "weight_shape": [8, 8, 1, 1],
             "macs_before": 8 * 8 * 16}]
    expect = tmp_path / "report.json"
    expect.write_text(json.dumps({"fmt": "comp", "layers": rows}))
    report = vbxfx.check_tflite(path, expect=str(expect))
    assert report.ok, str(report)
    assert [r.declared for r in report.layers] == ["head.small", "head.large"]
    for row in rows:                       # without the sizes, order alone gets it wrong
        del row["macs_before"]
    expect.write_text(json.dumps({"fmt": "comp", "layers": rows}))
    assert not vbxfx.check_tflite(path, expect=str(expect)).ok


def test_setup_script_refuses_bad_arguments(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "setup_tflite_env.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash tools/setup_tflite_env.sh DIR" in usage.stderr
    wrong = subprocess.run(["bash", str(script), str(tmp_path / "env")], capture_output=True,
                           text=True, env={**os.environ, "PYTHON": "/bin/false"})
    assert wrong.returncode == 2 and "3.11 is required" in wrong.stderr
    assert not (tmp_path / "env").exists()
