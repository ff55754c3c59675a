"""AnalyzeLayers on real models: MACs against an independent Conv2d/Linear hook count and
every multiply counted (torchvision classifiers, ViT attention, ultralytics YOLO)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import vbxfx
from independent_macs import count_multiplies
from vbxfx.passes import AnalyzeLayers


def hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """An independent count: Conv2d O*I/groups*kh*kw*Hout*Wout + Linear in*out*positions."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += m.out_channels * (m.in_channels // m.groups) * kh * kw * out.shape[-2] \
                * out.shape[-1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features * (out.numel() // out.shape[0]
                                                       // m.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


def check_against_hooks(model, x, frontend):
    gm = vbxfx.trace(model, x)
    assert gm.meta["vbxfx.frontend"] == frontend
    table = AnalyzeLayers()(gm).details
    assert table.layer_macs == hook_macs(model, x)       # the Conv/Linear layers called
    counted = count_multiplies(model, x, {})             # every multiply
    assert (table.total_macs, table.hw_macs()) == (counted.standard, counted.dense)
    return table


TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_macs_match_hooks(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None)
    table = check_against_hooks(model, torch.randn(1, 3, 224, 224), "symbolic_trace")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(table) == len(convs)
    depthwise = [layer for layer in table if (layer.reason or "").startswith("depthwise")]
    assert len(table.eligible()) == len(table) - len(depthwise)
    if name == "resnet18":
        assert table.total_macs == 1_814_073_344
        assert table["conv1"].hw_macs == {4: 314703872, 2: 157351936, 1: 78675968}
        assert table["fc"].kind == "linear" and len(table) == 21
    if name == "mobilenet_v2":
        assert len(depthwise) == 17


@pytest.fixture(scope="module")
def vit():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.vit_b_16(weights=None)


@pytest.mark.slow
def test_vit_b_16_macs_match_hooks(vit):
    x = torch.randn(1, 3, 224, 224)
    table = check_against_hooks(vit, x, "symbolic_trace")
    attention = 12 * (197 * 768 * 768 * 4 + 2 * 197 * 197 * 768)   # projections + products
    assert table.other_macs == attention and len(table.ops) == 12
    out_proj = table["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert out_proj.calls == 0 and not out_proj.eligible
    mlp = table["encoder.layers.encoder_layer_0.mlp.0"]
    assert mlp.output_positions == 197 and mlp.macs == 768 * 3072 * 197
    assert table["heads.head"].output_positions == 1
    assert table["conv_proj"].output_positions == 196


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [("yolov8n", 4_371_993_600),
                                            ("yolo11n", 3_240_531_200)])
def test_yolo_macs_match_hooks(name, expected):
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(f"{name}.yaml", verbose=False)
    table = check_against_hooks(model, torch.randn(1, 3, 640, 640), "export")
    assert table.layer_macs == expected          # NOTES.md: a Conv2d + Linear hook count
    if name == "yolo11n":                        # C2PSA's attention: q k^T and a v
        assert table.other_macs == table.total_macs - expected > 0
    assert table["model.0.conv"].kind == "conv2d"
    assert table["model.22.dfl.conv" if name == "yolov8n" else "model.23.dfl.conv"].calls == 1
