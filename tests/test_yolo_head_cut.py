"""YOLO's int8 file ends at the Detect head's convolutions; the host decodes the rest.

``cut_onnx`` on a small exported net (onnxruntime against torch), then on a real
``yolo export format=onnx`` file: ``head_outputs`` finds the six head convolutions,
onnxruntime runs the cut file, and ``decode_head`` gives back what the whole file gives. The
conversion test (slow, needs the converter) runs ``vbxfx export --cut-head`` as a user would
and checks that the int8 file keeps the class probabilities the whole-graph file loses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vbxfx.errors import ConfigError, ExportError
from vbxfx.export.cut import cut_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from yolo_data import make_detection_set, offline_ultralytics  # noqa: E402

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return torch.cat([self.a(y) * 100, torch.sigmoid(self.b(y))], 1)


def _export(model, path, x):
    torch.onnx.export(model, (x,), str(path), input_names=["images"], dynamo=False)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"vbxfx.note": "kept"})
    return proto


def test_cut_keeps_what_leads_to_the_named_tensors(tmp_path):
    torch.manual_seed(0)
    model, x = _TwoBranch().eval(), torch.randn(2, 3, 16, 16)
    proto = _export(model, tmp_path / "m.onnx", x)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    names = [convs[1].output[0], convs[2].output[0]]
    cut = cut_onnx(proto, names)
    assert [o.name for o in cut.graph.output] == names
    assert {n.op_type for n in cut.graph.node} <= {"Conv", "Relu"}
    assert {p.key: p.value for p in cut.metadata_props} == {"vbxfx.note": "kept"}
    onnx.save(cut, str(tmp_path / "cut.onnx"))
    a, b = ort.InferenceSession(str(tmp_path / "cut.onnx")).run(None, {"images": x.numpy()})
    with torch.no_grad():
        y = torch.relu(model.stem(x))
        torch.testing.assert_close(torch.from_numpy(a), model.a(y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(b), model.b(y), rtol=1e-4, atol=1e-5)
    assert len(proto.graph.node) > len(cut.graph.node)       # the source proto is untouched


def test_a_name_no_node_produces_is_refused_with_the_closest(tmp_path):
    proto = _export(_TwoBranch().eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    real = [n for n in proto.graph.node if n.op_type == "Conv"][1].output[0]
    with pytest.raises(ExportError, match="no node produces") as e:
        cut_onnx(proto, [real + "x"], "m.onnx")
    assert real in str(e.value) and "m.onnx" in str(e.value)
    with pytest.raises(ExportError, match="one or more"):
        cut_onnx(proto, [])


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory):
    pytest.importorskip("ultralytics")
    root = tmp_path_factory.mktemp("yolo-cut")
    offline_ultralytics(root)
    from ultralytics import YOLO

    y = YOLO("yolov8n.yaml")
    pt = root / "dense.pt"
    y.save(str(pt))
    path = Path(YOLO(str(pt)).export(format="onnx", imgsz=64))
    return root, pt, path


def test_the_head_outputs_decode_to_what_the_whole_file_gives(yolo_onnx):
    from ultralytics import YOLO

    from vbxfx.integrations.ultralytics_head import decode_head, head_outputs

    root, pt, path = yolo_onnx
    proto = onnx.load(str(path))
    names = head_outputs(proto, str(path))
    assert len(names) == 6 and all("/model.22/cv" in n for n in names)
    onnx.save(cut_onnx(proto, names), str(root / "cut.onnx"))
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)   # a batch of 1
    full = ort.InferenceSession(str(path)).run(None, {"images": x})[0]
    parts = ort.InferenceSession(str(root / "cut.onnx")).run(None, {"images": x})
    model = YOLO(str(pt)).model.float().eval()
    got = decode_head(parts[::-1], model)                     # any order
    np.testing.assert_allclose(got.numpy(), full, rtol=1e-4, atol=2e-3)
    nhwc = decode_head([np.transpose(p, (0, 2, 3, 1)) for p in parts], model, layout="NHWC")
    np.testing.assert_allclose(nhwc.numpy(), full, rtol=1e-4, atol=2e-3)
    with pytest.raises(ConfigError, match="6 outputs"):
        decode_head(parts[:5], model)


def test_a_file_without_a_detect_head_is_refused(tmp_path):
    from vbxfx.integrations.ultralytics_head import head_outputs

    proto = _export(_TwoBranch().eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="no ultralytics Detect head"):
        head_outputs(proto, "m.onnx")


@pytest.mark.slow
def test_vbxfx_export_cut_head_keeps_the_class_probabilities(yolo_onnx, tmp_path):
    """The whole graph in int8 shares one grid between pixel boxes and probabilities;
    cut at the head, the file's class logits follow the float model's."""
    from ultralytics import YOLO

    from converter import onnx2tf_or_skip
    from vbxfx.cli.main import main
    from vbxfx.integrations.ultralytics_head import decode_head
    from vbxfx.quant.interpreter import TfliteRunner

    exe = onnx2tf_or_skip()
    root, pt, path = yolo_onnx
    images = make_detection_set(tmp_path / "data", train=8, val=4, size=64).parent
    calib = str(images / "images" / "train")
    out = tmp_path / "cut.tflite"
    assert main(["export", str(path), "--tflite", str(out), "--onnx2tf", exe, "--cut-head",
                 "--normalize", "none", "--calib", calib, "--int8", "ranges"]) == 0
    runner = TfliteRunner(out)
    assert len(runner.outputs) == 6
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    model = YOLO(str(pt)).model.float().eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0]
    got = decode_head(runner.run(x), model, layout="NHWC")
    scores, ref_scores = got[:, 4:], ref[:, 4:]
    assert float((scores - ref_scores).abs().max()) < 0.1     # probabilities survive int8
    assert float(scores.max()) > 0
