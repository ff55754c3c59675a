"""The int8 calibration of ``vbxfx export --tflite`` (vbxfx.quant.calibrate): activation
ranges of least error, biases corrected on the data, filters rounded anew inside their
patterns (OPTQ), written in place.

The parts are tested on numbers made here; the whole on a real compressed DemoNet converted
by onnx2tf (slow; skipped without the converter environment unless ``VBXFX_REQUIRE_TFLITE``)
and run with LiteRT.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vbxfx
from vbxfx.errors import CheckError, ConfigError, ExportError
from vbxfx.export.tflite_reader import read_tflite
from vbxfx.inputs.calib import natural_image_crops
from vbxfx.inputs.demo import DemoNet
from vbxfx.integrations.onnx2tf import convert_to_tflite
from vbxfx.quant import calibrate_int8, compare_int8, float_reference_path
from vbxfx.quant.ranges import _best_range, grid_error, int8_params
from vbxfx.quant.rounding import optq_round, patches

from converter import onnx2tf_or_skip

CALIB = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
HELD_OUT = ("cat", "immunohistochemistry", "colorwheel", "retina")


# ------------------------------------------------------------------------------ the parts


def test_int8_params_hold_zero_and_the_range():
    scale, zero = int8_params(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and -128 <= zero <= 127
    np.testing.assert_allclose((np.array([-128, 127]) - zero) * scale, [-1.0, 3.0], atol=scale)
    assert int8_params(0.5, 2.0)[1] == -128              # widened to hold 0: [0, 2]
    assert grid_error(np.array([0.0, 1.0, 2.0]), *int8_params(0.0, 2.0)) < 1e-4


def test_the_chosen_range_beats_min_max_on_outliers():
    x = np.random.default_rng(0).normal(size=100_000)
    x[:5] = [40.0, -35.0, 30.0, 25.0, -20.0]               # a few outliers stretch min/max
    chosen = _best_range(x)
    minmax = int8_params(x.min(), x.max())
    assert grid_error(x, *chosen) < 0.9 * grid_error(x, *minmax)
    assert chosen[0] < minmax[0]


def test_optq_rounding_is_nearest_without_correlation_and_better_with_it():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 24))
    scale = np.abs(w).max(1) / 127
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    np.testing.assert_array_equal(optq_round(w, np.eye(24), scale), nearest)
    x = rng.normal(size=(2000, 24)) @ rng.normal(size=(24, 24))     # correlated inputs
    q = optq_round(w, x.T @ x, scale)
    err = lambda v: np.linalg.norm(x @ (w - v * scale[:, None]).T)  # noqa: E731
    assert err(q) < 0.8 * err(nearest)
    assert np.abs(q).max() <= 127


def test_optq_keeps_zeros_and_pairs():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 8))
    zero = np.zeros((4, 8), bool)
    zero[:, 1] = True
    partner = -np.ones((4, 8), int)
    partner[:, 5] = 2                                      # column 5 pairs with column 2
    sign = np.ones((4, 8), int)
    sign[0, 5] = -1
    x = rng.normal(size=(500, 8))
    q = optq_round(w, x.T @ x, np.full(4, 0.01), zero, partner, sign)
    assert (q[:, 1] == 0).all()
    np.testing.assert_array_equal(q[:, 5], sign[:, 5] * q[:, 2])


def test_patches_are_the_convolution():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 7, 3))
    w = rng.normal(size=(5, 3, 3, 3))                       # TFLite [O, kh, kw, I]
    for padding, stride in (("SAME", 2), ("VALID", 1)):
        rows = patches(x, 3, 3, {"padding": padding, "stride": (stride, stride)})
        ref = torch.nn.functional.conv2d(
            torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(w).permute(0, 3, 1, 2),
            stride=stride, padding=1 if padding == "SAME" else 0)
        got = rows @ w.reshape(5, -1).T
        np.testing.assert_allclose(got, ref[0].permute(1, 2, 0).reshape(-1, 5).numpy(),
                                   rtol=1e-10, atol=1e-10)


def test_a_consumer_computes_its_layer_as_torch_does():
    """The search at the consumers' outputs runs each filtered layer on rows of its input:
    a strided depthwise convolution with its fused ReLU6, as torch computes it."""
    from types import SimpleNamespace

    from vbxfx.quant.consumer_ranges import _Layer

    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 9, 9, 6))
    w = rng.normal(size=(1, 3, 3, 6))                     # TFLite depthwise [1, kh, kw, C]
    b = rng.normal(size=6)
    op = SimpleNamespace(op="DEPTHWISE_CONV_2D", inputs=[0, 1, 2],
                         options={"padding": "SAME", "stride": (2, 2), "activation": "RELU6"})
    layer = _Layer(SimpleNamespace(q=op, f=op), lambda i: {1: w, 2: b}[i])
    layer.add(x, rng)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).permute(3, 0, 1, 2),
        torch.from_numpy(b), stride=2, padding=1, groups=6).clamp(0, 6)
    np.testing.assert_allclose(layer.out(layer.rows[0]),
                               ref[0].permute(1, 2, 0).reshape(-1, 6).numpy(), atol=1e-10)


# ------------------------------------------------------------------------------ real files


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """DemoNet compressed at 0.5 -> vbxfx ONNX -> onnx2tf's int8 file as it is
    (``int8="converter"``) and its float32 reference."""
    exe = onnx2tf_or_skip()
    root = tmp_path_factory.mktemp("calib8")
    dense = DemoNet().eval()
    x = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    calib = natural_image_crops(32, 64, seed=1, photos=CALIB)
    model = vbxfx.compress(dense, x, compression=0.5).model.eval()
    vbxfx.export_onnx(model, x, str(root / "demo.onnx"))
    np.save(root / "calib.npy", calib.numpy())
    result = convert_to_tflite(root / "demo.onnx", root / "demo.tflite", calib=root / "calib.npy",
                               onnx2tf=exe, int8="converter")
    return dict(root=root, tflite=root / "demo.tflite",
                float=float_reference_path(root / "demo.tflite"),
                onnx=root / "demo.onnx", calib=calib, model=model, exe=exe, result=result,
                held=natural_image_crops(48, 64, seed=0, photos=HELD_OUT))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ranges", "bias", "optq"])
def test_calibration_improves_the_file_and_keeps_every_repeat(converted, method, tmp_path):
    out = tmp_path / f"{method}.tflite"
    assert converted["result"].int8 is None                 # int8="converter": untouched
    report = calibrate_int8(converted["tflite"], converted["float"], converted["calib"],
                            method=method, output=out)
    assert report.kept and report.sqnr_after > report.sqnr_before
    assert report.ranges_changed > 0 and (report.layers_refit > 0) == (method != "ranges")
    # only numbers changed: same size, same operators and tensors; "bias" moves no weight
    before, after = read_tflite(converted["tflite"]), read_tflite(out)
    filters = [op.inputs[1] for op in before.operators if op.op in ("CONV_2D", "FULLY_CONNECTED")]
    moved = [t for t in filters
             if not np.array_equal(before.data(before.tensors[t]), after.data(after.tensors[t]))]
    assert (moved == []) == (method != "optq")
    assert out.stat().st_size == Path(converted["tflite"]).stat().st_size
    assert [o.op for o in before.operators] == [o.op for o in after.operators]
    assert [t.shape for t in before.tensors] == [t.shape for t in after.tensors]
    # every repeat vbxfx declared still holds in the int8 filters
    check = vbxfx.check_tflite(str(out), expect=str(converted["onnx"]))
    assert check.ok, check
    assert any((row.declared_repeat or 4) < 4 for row in check.layers)
    # closer to float on held-out images too
    original = compare_int8(converted["tflite"], converted["model"], converted["held"],
                            reference=False)
    better = compare_int8(out, converted["model"], converted["held"], reference=False)
    assert better.sqnr_db > original.sqnr_db and better.kl < original.kl


@pytest.mark.slow
def test_export_calibrates_by_default(converted, tmp_path):
    shutil.copy(converted["onnx"], tmp_path / "demo.onnx")
    result = convert_to_tflite(tmp_path / "demo.onnx", tmp_path / "demo.tflite",
                               calib=converted["root"] / "calib.npy", onnx2tf=converted["exe"])
    assert result.int8 is not None and result.int8.method == "bias" and result.check.ok
    assert result.int8.samples == 32 and "biases corrected" in result.int8.line()
    assert result.to_dict()["int8"]["layers_refit"] == result.int8.layers_refit


@pytest.mark.slow
def test_bad_calibration_input_is_refused_before_any_change(converted, tmp_path):
    target = tmp_path / "copy.tflite"
    shutil.copy(converted["tflite"], target)
    data = target.read_bytes()
    with pytest.raises(ConfigError, match="one of"):
        calibrate_int8(target, converted["float"], converted["calib"], method="best")
    with pytest.raises(ConfigError, match="finite samples"):
        calibrate_int8(target, converted["float"], converted["calib"] * float("nan"))
    with pytest.raises(CheckError, match="not a float32 TFLite"):
        calibrate_int8(target, target, converted["calib"])      # not the float32 file
    with pytest.raises(ExportError, match="int8 must be one of"):
        convert_to_tflite(converted["onnx"], tmp_path / "x.tflite", int8="best",
                          onnx2tf=converted["exe"])
    assert target.read_bytes() == data and not (tmp_path / "x.tflite").exists()


@pytest.mark.slow
def test_unstructured_layers_keep_their_filters(converted, tmp_path):
    """Layers declared in the unstructured format ("ucomp") keep their int8 filters under
    OPTQ (it knows only the structured patterns); the file still checks against the ONNX."""
    model = DemoNet().eval()
    vbxfx.compress_vbx3_unstructured(model, 0.6)
    x = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    vbxfx.export_onnx(model, x, str(tmp_path / "u.onnx"))
    result = convert_to_tflite(tmp_path / "u.onnx", tmp_path / "u.tflite",
                               calib=converted["root"] / "calib.npy", onnx2tf=converted["exe"],
                               int8="optq")
    assert result.check.ok, result.check
    assert any(r.declared_fmt == "ucomp" for r in result.check.layers)
    assert any("declared unstructured" in n for n in result.int8.notes)


def test_export_command_refuses_an_unknown_int8_method(tmp_path, capsys):
    from vbxfx.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "m.onnx"), "--tflite", str(tmp_path / "m.tflite"),
              "--int8", "best"])
    assert e.value.code == 2 and "--int8" in capsys.readouterr().err


@pytest.mark.slow
def test_export_command_reports_the_calibration(converted, tmp_path, capfd):
    """``vbxfx export --int8 ranges --json`` as a user runs it: stdout holds the JSON alone,
    and it says what the calibration did."""
    import json

    from vbxfx.cli import main

    out = tmp_path / "cli.tflite"
    code = main(["export", str(converted["onnx"]), "--tflite", str(out), "--calib",
                 str(converted["root"] / "calib.npy"), "--onnx2tf", converted["exe"],
                 "--int8", "ranges", "--json"])
    captured = capfd.readouterr()
    report = json.loads(captured.out)
    assert code == 0 and out.is_file() and report["check"]["ok"]
    assert report["int8"]["method"] == "ranges" and report["int8"]["ranges_changed"] > 0


@pytest.mark.slow
def test_operators_pair_by_the_graph_when_the_files_order_them_differently(converted):
    """onnx2tf sometimes runs two operators that read one tensor in another order in the int8
    file than in the float32 one (a YOLO head's box and class convolutions): the pairing
    follows the data, and each filter meets its own float filter."""
    import dataclasses

    from vbxfx.quant.patch import pair_operators

    q, f = read_tflite(converted["tflite"]), read_tflite(converted["float"])
    ops = list(f.operators)
    readers: dict[int, list[int]] = {}
    for k, op in enumerate(ops):
        if op.op not in ("QUANTIZE", "DEQUANTIZE"):
            readers.setdefault(op.inputs[0], []).append(k)
    i, j = next(v for v in readers.values() if len(v) == 2)    # a block's two branches
    ops[i], ops[j] = ops[j], ops[i]
    swapped = dataclasses.replace(f, operators=ops)
    straight = {p.q.index: p.f.index for p in pair_operators(q, f)}
    crossed = {p.q.index: p.f.index for p in pair_operators(q, swapped)}
    assert crossed == straight                    # the same partners, found another way
    missing = dataclasses.replace(f, operators=[op for k, op in enumerate(ops) if k != i])
    with pytest.raises(CheckError, match="does not hold the operators"):
        pair_operators(q, missing)


@pytest.mark.slow
def test_ranges_before_filtered_layers_are_chosen_at_their_outputs(converted):
    """A tensor read only by convolutions takes the range of least error at their outputs;
    one that an ADD also reads keeps the tensor's own measure."""
    from vbxfx.quant.consumer_ranges import consumers_of
    from vbxfx.quant.patch import Int8File, pair_operators
    from vbxfx.quant.ranges import _groups

    f, ref = Int8File(converted["tflite"]), Int8File(converted["float"])
    pairs = pair_operators(f.model, ref.model)
    groups, fixed = _groups(f, pairs)
    kinds = {}
    for members in groups.values():
        if fixed.intersection(members):
            continue
        readers = consumers_of(f, pairs, members)
        users = {op.op for op in f.model.operators if set(op.inputs) & set(members)}
        kinds[tuple(members)] = (readers, users)
    assert any(r and {p.q.op for p in r} == {"DEPTHWISE_CONV_2D"} for r, _ in kinds.values())
    assert all(r is None for r, users in kinds.values() if "ADD" in users)
    assert all(r for r, users in kinds.values()
               if users and users <= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})
