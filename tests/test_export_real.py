"""Real models: compress, export, read back, check, tamper (``pytest -m slow -s`` prints numbers).

Every eligible layer is made to fit a mix of repeats 1 and 2 (``fit_fast``, every weight
paired: the hardest case for the encoding) with BatchNorm statistics randomised so that the
exporter's BN folding uses negative scales too.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import vbxfx
import vbxfx.testing
from test_export import compress_by_hand, eligible, randomize_bn, same_encoding, tamper

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_export_and_check(tmp_path, name):
    build, exporter, victim, changed = MODELS[name]
    torch.manual_seed(0)
    model, x = build()
    model.eval()
    randomize_bn(model)
    names = eligible(model)
    notes = compress_by_hand(model, {n: 1 if k % 3 == 2 else 2 for k, n in enumerate(names)})
    path = tmp_path / f"{name}.onnx"

    t0 = time.perf_counter()
    report = vbxfx.export_onnx(model, x, path, annotations=notes)
    t_export = time.perf_counter() - t0
    assert report.exporter == exporter
    assert set(report.layers) == set(names)

    back = vbxfx.read_annotations(path)
    assert set(back) == set(names)
    assert all(same_encoding(back[n].encoding, notes[n].encoding) for n in names)

    t0 = time.perf_counter()
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=1)
    t_check = time.perf_counter() - t0
    assert check.ok, str(check)
    assert all(r.fits and r.agrees for r in check.layers)
    totals = check.totals()
    assert totals["hw_macs"] < totals["macs"]
    print(f"\n{name}: {len(names)} layers, export {t_export:.1f} s ({report.exporter}), check "
          f"{t_check:.1f} s, max abs {check.max_abs:.3g}, max rel {check.max_rel:.3g}, MACs "
          f"{totals['macs']:,} -> hw {totals['hw_macs']:,}, model MACs {totals['model_macs']:,}, "
          f"{report.size_bytes / 1e6:.1f} MB")

    # the torch model changes by one weight, by the RMS of its layer's weights (a pruned
    # weight come back, a pair that lost its average): the comparison sees it
    with torch.no_grad():
        w = model.get_submodule(changed).weight
        w.view(w.shape[0], -1)[0, 0] += w.square().mean().sqrt()
    with pytest.raises(AssertionError, match="differs from torch: max abs error") as caught:
        vbxfx.testing.assert_onnx_equivalent(model, path, x)
    print(f"{name}: one weight of {changed!r} moved by its layer's RMS: {caught.value}")

    # tamper: one paired weight of one layer grows by 30%; the node and its block are named
    bad = tmp_path / "tampered.onnx"
    w = model.get_submodule(victim).weight
    flat = int((notes[victim].encoding.pair_index.reshape(-1) >= 0).nonzero()[7])
    node = tamper(str(path), str(bad), victim, flat, 1.3)
    broken = vbxfx.check_onnx(bad, n_random=0)
    assert not broken.ok
    assert [r.name for r in broken.layers if not r.fits] == [victim]
    assert any(f"node {node!r}" in p and "block" in p for p in broken.problems), broken.problems
    assert w.shape == back[victim].encoding.mask.shape
