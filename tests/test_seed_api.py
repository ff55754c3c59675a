"""The seed-compatible API: compress_vbx3 / compress_vbx3_unstructured, in place."""

import json
import math

import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.errors import ConfigError, FormatError
from vbxfx.format import project_weight, unstructured_macs, weight_repeat
from vbxfx.modules import VBXConv2d, VBXLinear, compressed_modules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


ELIGIBLE = ["features.0", "features.3", "head"]


def _model(seed=0):
    torch.manual_seed(seed)
    return Net()


def _snapshot(model):
    return ([type(m) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _unchanged(model, snap):
    types, state = _snapshot(model)
    return types == snap[0] and state.keys() == snap[1].keys() and all(
        torch.equal(state[k], v) or (v.isnan().any() and torch.equal(state[k].isnan(), v.isnan()))
        for k, v in snap[1].items())


@pytest.mark.parametrize("compression,repeat", [(0.5, 2), (0.75, 1)])
def test_in_place_uniform_levels(compression, repeat):
    model = _model()
    params = {n: p for n, p in model.named_parameters()}
    report = vbxfx.compress_vbx3(model, compression)
    assert sorted(report["layers"]) == ELIGIBLE and report["dense"] == []
    assert isinstance(model.features[0], VBXConv2d) and isinstance(model.head, VBXLinear)
    assert type(model.features[5]) is nn.Conv2d                  # depthwise stays dense
    for name, layer in compressed_modules(model):
        assert layer.repeat == repeat and weight_repeat(layer.compressed_weight()) <= repeat
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameters
    assert math.isclose(report["weights_removed"], compression)
    json.dumps(report)
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_mixture_in_between():
    model = _model()
    report = vbxfx.compress_vbx3(model, 0.66)
    repeats = {n: r["repeat"] for n, r in report["layers"].items()}
    assert set(repeats.values()) == {1, 2}
    assert report["weights_removed"] >= 0.66 and report["achieved"] >= 0.66


@pytest.mark.parametrize("value", [0.4, 0.8, float("nan"), "0.5", True, None])
def test_out_of_range_leaves_model_untouched(value):
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=r"\[0.5, 0.75\].*" + repr(value)[:3]):
        vbxfx.compress_vbx3(model, value)
    assert _unchanged(model, snap)


def test_unstructured():
    model = _model()
    report = vbxfx.compress_vbx3_unstructured(model, 0.8)
    assert sorted(report["layers"]) == ELIGIBLE
    for name, layer in compressed_modules(model):
        w = layer.compressed_weight().detach()
        assert layer.fmt == "ucomp" and unstructured_macs(w) <= round(0.2 * w.numel())
    everything = _model()
    vbxfx.compress_vbx3_unstructured(everything, 1.0)
    assert all(int(l.mask.sum()) == 0 for _, l in compressed_modules(everything))
    for value in (0.3, 1.2):
        fresh = _model()
        snap = _snapshot(fresh)
        with pytest.raises(ConfigError, match=r"\[0.5, 1.0\]"):
            vbxfx.compress_vbx3_unstructured(fresh, value)
        assert _unchanged(fresh, snap)


def test_json_file(tmp_path, caplog):
    model = _model()
    path = tmp_path / "levels.json"
    path.write_text(json.dumps({"features.0": "dense", "features.3": 0.75, "head": 0.66}))
    with caplog.at_level("WARNING"):
        report = vbxfx.compress_vbx3(model, 0.6, json_file=path)
    assert report["dense"] == ["features.0"] and type(model.features[0]) is nn.Conv2d
    assert model.features[3].repeat == 1 and model.head.repeat == 1   # 0.66 -> nearest: 1:4
    assert "0.66" in caplog.text


@pytest.mark.parametrize("content,match", [
    ({"features.03": 0.5}, r"'features.03'.*closest.*'features.0'"),
    ({"head": 0.9, "features.0": "half"}, "'features.0' has value 'half'"),
    ("not json {", "not valid JSON"),
    ([0.5], "must hold a JSON object"),
])
def test_bad_json_leaves_model_untouched(tmp_path, content, match):
    path = tmp_path / "levels.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=match):
        vbxfx.compress_vbx3(model, 0.6, json_file=path)
    assert _unchanged(model, snap)
    with pytest.raises(ConfigError, match="does not exist"):
        vbxfx.compress_vbx3(model, 0.6, json_file=tmp_path / "missing.json")
    assert _unchanged(model, snap)


def test_twice_recompresses_from_dense_weights():
    model = _model()
    vbxfx.compress_vbx3(model, 0.5)
    first = model.features[3]
    with torch.no_grad():
        first.weight.add_(0.01 * torch.randn_like(first.weight))  # as fine-tuning would
    report = vbxfx.compress_vbx3(model, 0.75)
    second = model.features[3]
    assert second is not first and type(second) is VBXConv2d     # replaced, not wrapped
    assert not any(isinstance(m, VBXConv2d) for m in second.children())
    assert second.weight is first.weight and second.repeat == 1
    torch.testing.assert_close(second.compressed_weight().detach(),
                               project_weight(first.weight.detach(), 1))
    assert len(report["layers"]) == 3 and len(list(compressed_modules(model))) == 3


def test_no_eligible_layer():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU())
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match="no layer to compress.*groups=1.*depthwise"):
        vbxfx.compress_vbx3(model, 0.5)
    with pytest.raises(ConfigError, match="no layer to compress"):
        vbxfx.compress_vbx3_unstructured(nn.Sequential(nn.ReLU()), 0.5)
    assert _unchanged(model, snap)
    with pytest.raises(ConfigError, match="takes an nn.Module"):
        vbxfx.compress_vbx3("resnet18", 0.5)


def test_nan_weights_leave_model_untouched():
    model = _model()
    with torch.no_grad():
        model.head.weight[1, 2] = float("nan")
    snap = _snapshot(model)
    for call in (lambda: vbxfx.compress_vbx3(model, 0.6),
                 lambda: vbxfx.compress_vbx3_unstructured(model, 0.6)):
        with pytest.raises(FormatError, match="'head' holds 1 NaN/Inf"):
            call()
        assert _unchanged(model, snap)


def test_bare_layer_cannot_be_swapped_in_place():
    conv = nn.Conv2d(8, 8, 1)
    with pytest.raises(ConfigError, match="wrap it"):
        vbxfx.compress_vbx3(conv, 0.5)
    assert type(conv) is nn.Conv2d


def test_json_fixes_some_layers_and_allocates_the_rest(tmp_path):
    model = _model()
    path = tmp_path / "levels.json"
    path.write_text(json.dumps({"features.0": 0.5}))
    report = vbxfx.compress_vbx3(model, 0.6, json_file=str(path))
    assert model.features[0].repeat == 2
    assert report["weights_removed"] >= 0.6 and sorted(report["layers"]) == ELIGIBLE
