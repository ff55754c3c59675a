"""Real models: compress, export, read back, check, fold BN, tamper (``-m slow -s`` prints numbers).

``vbxfx.compress(model, x, compression=0.6)`` allocates a mix of repeats 1 and 2 over every
eligible layer; BatchNorm statistics are randomised first so that the exporter's BN folding
uses negative scales too. A second test exports a fully paired resnet18 (``fit_fast``: all
eight weights of every block kept as four pairs), the hardest case for the encoding.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import vbxfx
import vbxfx.testing
from test_export import compress_by_hand, eligible, fold_scales, randomize_bn, same_encoding, tamper

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a CPU shared with other jobs, torch's spinning worker threads
    make these tests several times slower (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)


def _mobilenet_v3_large():
    import torchvision
    return torchvision.models.mobilenet_v3_large(), torch.randn(1, 3, 224, 224)


def _yolov8n():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel
    return DetectionModel("yolov8n.yaml", verbose=False), torch.randn(1, 3, 640, 640)


# name: (builder, exporter chosen, layer to tamper with in the file, layer to change in torch)
MODELS = {"resnet18": (_resnet18, "torchscript", "layer3.0.conv2", "fc"),
          "mobilenet_v3_large": (_mobilenet_v3_large, "torchscript", "features.12.block.0.0",
                                 "classifier.3"),
          "yolov8n": (_yolov8n, "dynamo", "model.8.m.0.cv1.conv", "model.22.cv3.0.2")}


def _tamper_and_check(path, tmp_path, notes, victim):
    """One paired weight of ``victim`` grows by 30% in the file: the check names its node
    and block."""
    bad = tmp_path / "tampered.onnx"
    flat = int((notes[victim].encoding.pair_index.reshape(-1) >= 0).nonzero()[7])
    node = tamper(str(path), str(bad), victim, flat, 1.3)
    broken = vbxfx.check_onnx(bad, n_random=0)
    assert not broken.ok
    assert [r.name for r in broken.layers if not r.fits] == [victim]
    assert any(f"node {node!r}" in p and "block" in p for p in broken.problems), broken.problems


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_compress_export_check(tmp_path, name):
    build, exporter, victim, changed = MODELS[name]
    torch.manual_seed(0)
    model, x = build()
    model.eval()
    randomize_bn(model)
    t0 = time.perf_counter()
    compressed = vbxfx.compress(model, x, compression=0.6).model
    t_compress = time.perf_counter() - t0
    plain, notes = vbxfx.finalize(compressed)
    trainable = {n for n in eligible(model) if model.get_submodule(n).weight.requires_grad}
    assert set(notes) == trainable               # yolov8n's frozen DFL conv stays dense
    assert {a.repeat for a in notes.values()} == {1, 2}
    path = tmp_path / f"{name}.onnx"

    t0 = time.perf_counter()
    report = vbxfx.export_onnx(compressed, x, path)          # finalizes a copy itself
    t_export = time.perf_counter() - t0
    assert report.exporter == exporter and set(report.layers) == set(notes)
    assert vbxfx.is_compressed(compressed.get_submodule(victim))   # the caller's model as it was

    back = vbxfx.read_annotations(path)
    assert set(back) == set(notes)
    assert all(back[n].fmt == "comp" and same_encoding(back[n].encoding, notes[n].encoding)
               for n in notes)

    t0 = time.perf_counter()
    check = vbxfx.check_onnx(path, torch_model=compressed, example_inputs=x, n_random=1)
    t_check = time.perf_counter() - t0
    assert check.ok, str(check)
    assert all(r.fits and r.agrees and r.compiler_repeat <= r.repeat for r in check.layers)
    totals = check.totals()
    assert totals["hw_macs"] < totals["macs"]
    print(f"\n{name}: {len(notes)} layers, compress {t_compress:.1f} s, export {t_export:.1f} s "
          f"({report.exporter}), check {t_check:.1f} s, max abs {check.max_abs:.3g}, max rel "
          f"{check.max_rel:.3g} over {totals['compared']} outputs, MACs {totals['macs']:,} -> hw "
          f"{totals['hw_macs']:,}, model MACs {totals['model_macs']:,}, "
          f"{report.size_bytes / 1e6:.1f} MB")

    # a BatchNorm folded later in the chain (one scale per output channel, some negative)
    folded = tmp_path / "folded.onnx"
    fold_scales(str(path), str(folded), seed=1)
    refolded = vbxfx.check_onnx(folded, n_random=0)
    assert refolded.ok and all(r.fits and r.agrees for r in refolded.layers), str(refolded)

    # the torch model changes by one weight, by the RMS of its layer's weights (a pruned
    # weight come back, a pair that lost its average): the comparison sees it
    with torch.no_grad():
        w = plain.get_submodule(changed).weight
        kept = int(notes[changed].encoding.mask.reshape(-1).nonzero()[0])
        w.view(-1)[kept] += w.square().mean().sqrt()
    with pytest.raises(AssertionError, match="differs from torch: max abs error") as caught:
        vbxfx.testing.assert_onnx_equivalent(plain, path, x)
    print(f"{name}: one weight of {changed!r} moved by its layer's RMS: {caught.value}")

    _tamper_and_check(path, tmp_path, notes, victim)


def test_real_model_fully_paired_resnet18(tmp_path):
    torch.manual_seed(1)
    model, x = _resnet18()
    model.eval()
    randomize_bn(model, 1)
    names = eligible(model)
    notes = compress_by_hand(model, {n: 1 if k % 3 == 2 else 2 for k, n in enumerate(names)})
    path = tmp_path / "paired.onnx"
    t0 = time.perf_counter()
    report = vbxfx.export_onnx(model, x, path, annotations=notes)
    t_export = time.perf_counter() - t0
    back = vbxfx.read_annotations(path)
    assert all(same_encoding(back[n].encoding, notes[n].encoding) for n in names)
    t0 = time.perf_counter()
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=1)
    t_check = time.perf_counter() - t0
    assert check.ok, str(check)
    print(f"\nresnet18 fully paired: export {t_export:.1f} s ({report.exporter}), check "
          f"{t_check:.1f} s, max abs {check.max_abs:.3g}, max rel {check.max_rel:.3g}")
    _tamper_and_check(path, tmp_path, notes, "layer2.0.conv1")


@pytest.mark.filterwarnings("ignore:The tensor attributes")
def test_yolov8n_after_a_torch_export_of_the_callers_model(tmp_path):
    """torch.export leaves FakeTensors in Detect's anchor cache of the model it traces; the
    exporter and the checker still work on (a clean copy of) that model."""
    model, x = _yolov8n()
    model.eval()
    torch.export.export(model, (x,), strict=False)
    names = [n for n in eligible(model) if n.startswith("model.22.cv3")]
    notes = compress_by_hand(model, {n: 2 for n in names})
    path = tmp_path / "yolo.onnx"
    assert set(vbxfx.export_onnx(model, x, path, annotations=notes).layers) == set(names)
    assert vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=0).ok
    vbxfx.testing.assert_onnx_equivalent(model, path, x)
