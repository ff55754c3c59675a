"""Layers whose forward never runs stay dense, in both APIs (issue 17 item 1), frozen layers too
(issue 13 item 3): nn.MultiheadAttention's out_proj, a small torchvision Swin's qkv / proj,
TransformerEncoderLayer's fast path, a user parent that reads ``self.fc.weight``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vbxfx
from independent_macs import count_multiplies
from vbxfx.modules import compressed_modules, is_compressed

FRONTENDS = ["symbolic_trace", "export"]


class Attention(nn.Module):
    """The issue's minimal case: one nn.MultiheadAttention in a wrapper, and a Linear after."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, 8)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.fc(y)


def small_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=10).eval()


SWIN_ATTENTION = [f"features.{s}.{b}.attn.{p}" for s in (1, 3) for b in (0, 1)
                  for p in ("qkv", "proj")]


def _export_and_check(model, x, path):
    report = vbxfx.export_onnx(model, x, path)
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=1)
    return report, check


# --------------------------------------------------------------------------- seed API


def test_multihead_attention_out_proj_stays_dense_in_compress_vbx3(tmp_path):
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(1, 5, 16)
    report = vbxfx.compress_vbx3(model, 0.75)
    assert sorted(report["layers"]) == ["fc"]
    assert not is_compressed(model.attn.out_proj)
    assert "used directly by MultiheadAttention 'attn'" in report["not_compressible"][
        "attn.out_proj"]
    export, check = _export_and_check(model, x, tmp_path / "mha.onnx")
    assert set(export.layers) == {"fc"} and check.ok, str(check)


def test_swin_attention_stays_dense_in_compress_vbx3(tmp_path):
    model = small_swin()
    x = torch.randn(1, 3, 32, 32)
    dense = copy.deepcopy(model)
    report = vbxfx.compress_vbx3(model, 0.75)
    assert not set(SWIN_ATTENTION) & set(report["layers"])
    assert set(SWIN_ATTENTION) <= set(report["not_compressible"])
    assert "features.1.0.mlp.0" in report["layers"]
    # what the report says compressed is what changed the output
    with torch.no_grad():
        assert not torch.equal(model(x), dense(x))
    _, check = _export_and_check(model, x, tmp_path / "swin.onnx")
    assert check.ok, str(check)


def test_parent_reading_a_weight_in_its_forward_is_found_statically():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, x):          # fc's forward never runs; out's does (.shape is metadata)
            assert self.out.weight.shape[1] == x.shape[-1]
            return self.out(F.linear(x, self.fc.weight, self.fc.bias))

    from vbxfx.analysis.weight_use import direct_weight_readers
    model = nn.Sequential(Gate())
    readers = direct_weight_readers(model)
    assert list(readers) == ["0.fc"] and "Gate '0' in its forward" in readers["0.fc"]
    report = vbxfx.compress_vbx3(model, 0.5)
    assert sorted(report["layers"]) == ["0.out"]


def test_example_inputs_catch_weights_the_source_does_not_show():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def weights(self):
            return getattr(self, "fc").weight

        def forward(self, x):
            return self.out(F.linear(x, self.weights()))

    from vbxfx.analysis.weight_use import called_layers, direct_weight_readers
    model = nn.Sequential(Hidden(), nn.ReLU())
    assert direct_weight_readers(model) == {}          # the source check cannot see it
    ran, direct = called_layers(model, (torch.randn(2, 8),), ["0.fc", "0.out"])
    assert ran == {"0.out"} and "passed to linear outside" in direct["0.fc"]
    fresh = copy.deepcopy(model)
    report = vbxfx.compress_vbx3(fresh, 0.5, example_inputs=torch.randn(2, 8))
    assert sorted(report["layers"]) == ["0.out"] and "0.fc" in report["not_compressible"]
    assert sorted(vbxfx.compress_vbx3(model, 0.5)["layers"]) == ["0.fc", "0.out"]  # static only


def test_transformer_encoder_layer_fast_path_weights_stay_dense():
    from vbxfx.analysis.weight_use import direct_weight_readers
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 4))
    readers = direct_weight_readers(model)
    assert {"0.linear1", "0.linear2", "0.self_attn.out_proj"} <= set(readers)
    assert "fast path" in readers["0.linear1"]
    assert sorted(vbxfx.compress_vbx3(model, 0.5)["layers"]) == ["1"]


# --------------------------------------------------------------------------- fx pipeline


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_multihead_attention_in_the_fx_pipeline(frontend):
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(1, 5, 16)
    gm = vbxfx.trace(model, x, frontend=frontend)
    table = vbxfx.passes.AnalyzeLayers()(gm).details
    assert [l.name for l in table.eligible()] == ["fc"]
    assert "used directly by MultiheadAttention 'attn'" in table["attn.out_proj"].reason
    # every multiply is in the totals: the in/out projections and both attention products
    assert table.total_macs == 5 * 16 * 16 * 4 + 2 * 5 * 5 * 16 + 5 * 16 * 8
    result = vbxfx.compress(model, x, 0.66)
    rows = {r["name"]: r for r in result.report["layers"]}
    assert rows["fc"]["fmt"] == "comp" and rows["attn.out_proj"]["fmt"] == "dense"


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_swin_in_the_fx_pipeline(frontend, caplog):
    model = small_swin()
    x = torch.randn(1, 3, 32, 32)
    with caplog.at_level(logging.WARNING):
        table = vbxfx.analyze(model, x, frontend=frontend)
    for name in SWIN_ATTENTION:
        assert not table[name].eligible and "used directly by" in table[name].reason
    assert "features.1.0.mlp.0" in [l.name for l in table.eligible()]
    assert table.other_share > 0.1 and "cannot remove them" in caplog.text
    text = str(table)
    assert "other multiply-heavy ops" in text and "warning:" in text


def test_swin_compress_export_check_and_an_independent_count(tmp_path):
    model = small_swin()
    x = torch.randn(1, 3, 32, 32)
    result = vbxfx.compress(model, x, 0.66)
    totals = result.report["totals"]
    plain, notes = vbxfx.finalize(result.model)
    assert not set(SWIN_ATTENTION) & set(notes)
    counted = count_multiplies(plain, x, {n: a.repeat for n, a in notes.items()})
    assert (totals["macs"], totals["hw_macs_dense"], totals["hw_macs"]) == (
        counted.standard, counted.dense, counted.after)
    _, check = _export_and_check(result.model, x, tmp_path / "swin.onnx")
    assert check.ok, str(check)
    assert check.totals()["hw_macs"] == totals["hw_macs"]


# --------------------------------------------------------------------------- frozen


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3)
        self.fixed = nn.Conv2d(16, 8, 1, bias=False).requires_grad_(False)

    def forward(self, x):
        return self.fixed(self.conv(x))


def test_frozen_layers_stay_dense_unless_included():
    x = torch.randn(1, 8, 8, 8)
    table = vbxfx.analyze(Frozen(), x)
    assert table["conv"].eligible and not table["fixed"].eligible
    assert table["fixed"].reason.startswith("frozen")
    report = vbxfx.compress(Frozen(), x, 0.6).report
    assert {r["name"]: r["fmt"] for r in report["layers"]} == {"conv": "comp", "fixed": "dense"}
    assert vbxfx.compress(Frozen(), x, 0.6, include_frozen=True).report["totals"]["compressed"] == 2
    seed = vbxfx.compress_vbx3(Frozen(), 0.5)
    assert sorted(seed["layers"]) == ["conv"] and seed["not_compressible"]["fixed"].startswith(
        "frozen")
    assert sorted(vbxfx.compress_vbx3(Frozen(), 0.5, include_frozen=True)["layers"]) == [
        "conv", "fixed"]
    # a model frozen as a whole (for inference) is compressed like any other
    whole = Frozen().requires_grad_(False)
    assert len(list(compressed_modules(whole))) == 0
    assert sorted(vbxfx.compress_vbx3(whole, 0.5)["layers"]) == ["conv", "fixed"]
    with pytest.raises(vbxfx.errors.ConfigError, match="include_frozen must be True or False"):
        vbxfx.compress_vbx3(Frozen(), 0.5, include_frozen="yes")


@pytest.mark.slow
def test_yolov8n_dfl_conv_stays_dense():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False)
    x = torch.randn(1, 3, 320, 320)
    rows = {r["name"]: r for r in vbxfx.compress(model, x, 0.66).report["layers"]}
    assert rows["model.22.dfl.conv"]["fmt"] == "dense"
    assert "DFL" in rows["model.22.dfl.conv"]["reason"]
    assert rows["model.0.conv"]["fmt"] == "comp"
    # loaded for inference (YOLO("best.pt").model): every weight frozen, the DFL still dense
    model.requires_grad_(False)
    rows = {r["name"]: r for r in vbxfx.compress(model, x, 0.66).report["layers"]}
    assert rows["model.22.dfl.conv"]["fmt"] == "dense" and rows["model.0.conv"]["fmt"] == "comp"
    model.requires_grad_(True)
    seed = vbxfx.compress_vbx3(model, 0.66)
    assert "model.22.dfl.conv" not in seed["layers"] and "model.0.conv" in seed["layers"]
    assert "DFL" in seed["not_compressible"]["model.22.dfl.conv"]
