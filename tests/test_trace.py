"""vbxfx.trace: both front ends, leaf modules, the caller's model left alone, TraceError."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import vbxfx
from vbxfx.errors import ConfigError, TraceError


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


class RowLoop(nn.Module):
    """Iterates over a tensor: symbolic_trace cannot, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        rows = [r * 2 for r in self.conv(x).unbind(2)]
        return torch.stack(rows, 2)


class LoopHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.loop = RowLoop()

    def forward(self, x):
        return self.loop(self.stem(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither front end can trace it
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, id(m), m.training) for name, m in model.named_modules()],
            [id(p) for p in model.parameters()])


def _assert_untouched(model: nn.Module, before) -> None:
    state, modules, params = before
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [(name, id(m), m.training) for name, m in model.named_modules()] == modules
    assert [id(p) for p in model.parameters()] == params


def test_symbolic_trace_records_meta_and_matches_model():
    model = Small().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = vbxfx.trace(model, x)
    assert isinstance(gm, torch.fx.GraphModule)
    assert gm.meta["vbxfx.frontend"] == "symbolic_trace"
    root = gm.meta["vbxfx.root"]
    assert isinstance(root, Small) and root is not model
    assert root.conv is not model.conv
    assert gm.get_submodule("conv") is root.conv  # gm shares the leaf modules with root
    assert isinstance(gm.meta["vbxfx.example_inputs"], tuple)
    assert gm.meta["vbxfx.example_inputs"][0] is x
    torch.testing.assert_close(gm(x), model(x))


def test_caller_model_is_untouched_and_keeps_training_mode():
    model = Small().train()
    before = _snapshot(model)
    gm = vbxfx.trace(model, torch.randn(1, 3, 8, 8))
    _assert_untouched(model, before)
    assert model.training and model.bn.training
    root = gm.meta["vbxfx.root"]
    assert root.training and root.bn.training  # the copy's own flags are restored
    assert root.bn.num_batches_tracked.item() == 0  # tracing ran in eval mode


def test_tuple_and_list_inputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    a, b = torch.randn(1, 3), torch.randn(1, 3)
    assert vbxfx.trace(Two(), (a, b)).meta["vbxfx.example_inputs"] == (a, b)
    assert vbxfx.trace(Two(), [a, b]).meta["vbxfx.example_inputs"] == (a, b)


@pytest.mark.parametrize("bad, words", [
    (None, "NoneType"), ((), "empty tuple"), ([1, 2], "(int, int)"), ({"x": 1}, "dict"),
])
def test_bad_example_inputs(bad, words):
    with pytest.raises(ConfigError, match="Tensor or a tuple of Tensors") as info:
        vbxfx.trace(Small(), bad)
    assert words in str(info.value)


def test_bad_arguments():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="frontend must be one of"):
        vbxfx.trace(Small(), x, frontend="dynamo")
    with pytest.raises(ConfigError, match=r"'convv'.*closest: \['conv'\]"):
        vbxfx.trace(Small(), x, leaf_modules=("convv",))
    with pytest.raises(ConfigError, match="nn.Module subclasses"):
        vbxfx.trace(Small(), x, leaf_modules=(3,))
    with pytest.raises(ConfigError, match="takes an nn.Module"):
        vbxfx.trace(lambda t: t, x)


def test_export_fallback_when_symbolic_trace_fails():
    model = LoopHolder().eval()
    x = torch.randn(1, 3, 4, 5)
    gm = vbxfx.trace(model, x)
    assert gm.meta["vbxfx.frontend"] == "export"
    assert gm.meta["vbxfx.root"] is not model
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default in targets
    weights = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"stem.weight", "loop.conv.weight"} <= weights
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("leaf", [RowLoop, "loop"])
def test_leaf_modules_by_type_or_name(leaf):
    model = LoopHolder().eval()
    x = torch.randn(1, 3, 4, 5)
    gm = vbxfx.trace(model, x, leaf_modules=(leaf,))
    assert gm.meta["vbxfx.frontend"] == "symbolic_trace"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "loop"]
    torch.testing.assert_close(gm(x), model(x))


def test_conv_subclasses_stay_single_nodes():
    class SamePad(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(SamePad(3, 4, 3), nn.ReLU())
    gm = vbxfx.trace(model, torch.randn(1, 3, 6, 6))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module",
                                             "output"]


def test_forced_frontends():
    x = torch.randn(1, 3, 8, 8)
    assert vbxfx.trace(Small().eval(), x, frontend="export").meta["vbxfx.frontend"] == "export"
    with pytest.raises(TraceError) as info:
        vbxfx.trace(LoopHolder(), torch.randn(1, 3, 4, 5), frontend="symbolic_trace")
    assert "symbolic_trace: TraceError" in str(info.value)
    assert "export:" not in str(info.value)


def test_trace_error_names_module_line_and_both_causes():
    with pytest.raises(TraceError) as info:
        vbxfx.trace(Gated(), torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "could not trace Gated" in message
    assert "Gate at 'gate'" in message
    assert "test_trace.py:" in message and "`if x.sum() > 0:" in message
    lines = message.splitlines()
    assert any(line.strip().startswith("symbolic_trace: ") for line in lines)
    assert any(line.strip().startswith("export: ") for line in lines)
    assert "leaf_modules=" in message and "(1, 3, 4, 4)" in message
    assert info.value.__cause__ is not None
    assert isinstance(info.value, vbxfx.VbxError)


def test_wrong_input_shape_is_a_trace_error():
    with pytest.raises(TraceError, match="input shapes"):
        vbxfx.trace(Small(), torch.randn(1, 5, 8, 8))


def _no_fake_tensors(module: nn.Module) -> None:
    for name, m in module.named_modules():
        for key, value in vars(m).items():
            assert not isinstance(value, FakeTensor), f"{name}.{key}"
        for key, value in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            assert not isinstance(value, FakeTensor), f"{name}.{key}"


@pytest.mark.slow
def test_yolo_traces_with_export_and_onnx_export_still_works(tmp_path):
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, 160, 160)  # the anchors problem does not depend on the size
    before = _snapshot(model)
    gm = vbxfx.trace(model, x)
    assert gm.meta["vbxfx.frontend"] == "export"
    _assert_untouched(model, before)
    root = gm.meta["vbxfx.root"]
    _no_fake_tensors(model)
    _no_fake_tensors(root)
    torch.onnx.export(model, (x,), str(tmp_path / "caller.onnx"), dynamo=False)
    torch.onnx.export(root, (x,), str(tmp_path / "root.onnx"), dynamo=False)
    assert (tmp_path / "caller.onnx").stat().st_size > 1_000_000
    assert (tmp_path / "root.onnx").stat().st_size > 1_000_000


@pytest.mark.slow
def test_resnet18_traces_symbolically_and_stays_untouched():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    before = _snapshot(model)
    gm = vbxfx.trace(model, x)
    assert gm.meta["vbxfx.frontend"] == "symbolic_trace"
    _assert_untouched(model, before)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.slow
def test_detector_error_says_how_to_compress_the_backbone_and_that_works(tmp_path, capsys):
    """torchvision's Faster R-CNN loops over its images (`for img in images:`) and runs NMS:
    neither symbolic_trace nor torch.export (strict or not: "Could not guard on data-dependent
    expression") gets through, leaf modules do not help (the loop is in the root's forward).
    The error shows the way out, and following it works end to end."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    x = torch.randn(1, 3, 320, 320)
    with pytest.raises(TraceError) as info:
        vbxfx.compress(model, x)
    message = str(info.value)
    assert "`for img in images:`" in message and "looks like a detector" in message
    assert "vbxfx.compress(model.backbone, torch.randn(1, 3, 800, 800)" in message
    assert "model.backbone = result.model" in message and "compress_vbx3" in message
    assert "def forward" not in capsys.readouterr().out     # no graph dump on stdout

    result = vbxfx.compress(model.backbone, torch.randn(1, 3, 800, 800), compression=0.66)
    assert result.report["totals"]["compressed"] > 40
    model.backbone = result.model
    with torch.no_grad():
        detections = model([torch.rand(3, 320, 320)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}
    path = tmp_path / "backbone.onnx"
    export = vbxfx.export_onnx(model.backbone, x, path)
    assert len(export.layers) == result.report["totals"]["compressed"]
    assert vbxfx.check_onnx(path, torch_model=model.backbone, example_inputs=x, n_random=0).ok
