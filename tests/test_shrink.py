"""Channel groups, channel pruning and low-rank factors (vbxfx.shrink, the Shrink pass)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import vbxfx
from vbxfx.allocation.sensitivity import layer_statistics
from vbxfx.analysis.channel_groups import channel_groups
from vbxfx.errors import ConfigError
from vbxfx.inputs.demo import DemoNet
from vbxfx.passes import AnalyzeLayers, Shrink
from vbxfx.shrink.apply import ShrinkPlan, apply_shrink
from vbxfx.shrink.slicing import low_rank_factors, spatial_factors

from bn_stats import randomize_bn


def groups_of(model, x):
    gm = vbxfx.trace(model, x)
    return gm, channel_groups(gm, AnalyzeLayers()(gm).details)


class CatNet(nn.Module):
    """A concatenation read by a layer, a chunk, a LayerNorm on the way."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 24, 1)
        self.head = nn.Conv2d(40, 32, 1)
        self.split_src = nn.Conv2d(32, 32, 1)
        self.c = nn.Conv2d(16, 16, 1)
        self.norm_src = nn.Conv2d(32, 16, 1)
        self.norm = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(32, 8, 1)
        self.out2 = nn.Conv2d(16, 8, 1)
        self.d = nn.Conv2d(16, 16, 1)
        self.out3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.head(torch.cat([torch.relu(self.a(x)), self.b(x)], 1))
        p, q = self.split_src(y).chunk(2, 1)
        z = self.out(torch.cat([self.c(p), q], 1))
        r = self.out3(p + self.d(q))               # an add with a chunk piece (YOLO's C2f)
        return z + self.out2(self.norm(self.norm_src(y))) + r


def test_groups_of_resnet_blocks_and_reasons():
    import torchvision

    gm, groups = groups_of(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    stem = groups["conv1"]
    assert stem.prunable and set(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
            "layer2.0.downsample.0"} <= {c for c, _ in stem.consumers}
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2"} <= set(stem.through)
    inner = groups["layer3.0.conv1"]
    assert inner.consumers == (("layer3.0.conv2", 0),) and inner.through == ("layer3.0.bn1",)
    assert not groups["fc"].prunable and "output" in groups["fc"].reason


def test_groups_follow_concats_and_refuse_what_they_cannot_follow():
    _, groups = groups_of(CatNet().eval(), torch.randn(1, 3, 16, 16))
    assert groups["a"].prunable and groups["a"].consumers == (("head", 0),)
    assert groups["b"].prunable and groups["b"].consumers == (("head", 16),)
    assert not groups["split_src"].prunable and "chunk" in groups["split_src"].reason
    assert not groups["norm_src"].prunable and "GroupNorm" in groups["norm_src"].reason
    assert not groups["d"].prunable and "takes channels from" in groups["d"].reason


def test_keeping_every_channel_changes_nothing_and_halving_runs():
    import torchvision

    model = randomize_bn(torchvision.models.mobilenet_v2())
    x = torch.randn(2, 3, 64, 64)
    _, groups = groups_of(model, x[:1])
    prunable = [g for g in groups.values() if g.prunable]
    assert len(prunable) >= 20
    same = copy.deepcopy(model)
    apply_shrink(same, groups, ShrinkPlan({g.name: range(g.channels) for g in prunable}))
    torch.testing.assert_close(same(x), model(x))
    small = copy.deepcopy(model)
    record = apply_shrink(small, groups, ShrinkPlan(
        {g.name: range(0, g.channels, 2) for g in prunable}))
    assert small(x).shape == (2, 1000)
    name = "features.2.conv.0.0"
    assert small.get_submodule(name).out_channels == 48
    assert small.get_submodule("features.2.conv.1.0").groups == 48       # depthwise follows
    assert small.get_submodule("features.2.conv.2").in_channels == 48
    torch.testing.assert_close(small.get_submodule(name).weight,
                               model.get_submodule(name).weight[record.out_index[name]]
                               [:, record.in_index[name]])


def test_a_bad_plan_changes_nothing():
    model = DemoNet().eval()
    gm, groups = groups_of(model, torch.randn(1, 3, 64, 64))
    name = next(g.name for g in groups.values() if g.prunable)
    before = copy.deepcopy(model.state_dict())
    for plan, words in ((ShrinkPlan({name: [0, 0, 1]}), "distinct"),
                        (ShrinkPlan({name: [10_000]}), "distinct"),
                        (ShrinkPlan({"nope": [0]}), "no channel group"),
                        (ShrinkPlan({name: [0, 1]}, ranks={"fc": 10_000}), "rank")):
        with pytest.raises(ConfigError, match=words):
            apply_shrink(model, groups, plan)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_removed_constant_channels_move_into_the_bias():
    """Channels whose BatchNorm has gamma 0 carry a constant: pruning them with the bias
    correction leaves the output exactly as it was."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    randomize_bn(model)
    with torch.no_grad():
        model[1].weight[8:] = 0.0
    x = torch.randn(2, 3, 8, 8)
    gm = vbxfx.trace(model, x[:1])
    AnalyzeLayers()(gm)
    record = Shrink(ShrinkPlan({"0": range(8)}))(gm).details
    small = vbxfx.analysis.trace.get_root(gm)
    assert small[3].in_channels == 8 and record.in_index["3"].tolist() == list(range(8))
    # the border of a 3x3 conv sees zero padding, not the constant: compare inside
    torch.testing.assert_close(small(x)[..., 1:-1, 1:-1], model(x)[..., 1:-1, 1:-1])
    plain = vbxfx.trace(model, x[:1])
    AnalyzeLayers()(plain)
    Shrink(ShrinkPlan({"0": range(8)}), bias_correction=False)(plain)
    off = (vbxfx.analysis.trace.get_root(plain)(x) - model(x))[..., 1:-1, 1:-1].abs().max()
    assert off > 1e-2


@pytest.mark.parametrize("layer", [nn.Conv2d(12, 20, 3, stride=2, padding=1),
                                   nn.Linear(24, 16)])
def test_low_rank_factors_at_full_rank_reproduce_the_layer(layer):
    x = torch.randn(2, 12, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(5, 24)
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    rms = torch.rand(layer.weight.shape[1]) + 0.1
    torch.testing.assert_close(low_rank_factors(layer, full, rms)(x), layer(x),
                               atol=1e-5, rtol=1e-5)
    small = low_rank_factors(layer, 4)
    assert small[0].weight.shape[0] == 4 and small[1].weight.shape[1] == 4


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 3, stride=2, padding=1),
                                  nn.Conv2d(6, 10, (3, 5), stride=(1, 2), padding=(1, 2),
                                            dilation=(2, 1))])
def test_spatial_factors_at_full_rank_reproduce_the_convolution(conv):
    x = torch.randn(2, 6, 11, 13)
    full = min(6 * conv.kernel_size[0], 10 * conv.kernel_size[1])
    with torch.no_grad():
        seq = spatial_factors(conv, full, torch.rand(6) + 0.1)
        torch.testing.assert_close(seq(x), conv(x), atol=1e-5, rtol=1e-5)
    assert seq[0].kernel_size == (conv.kernel_size[0], 1)
    assert seq[1].kernel_size == (1, conv.kernel_size[1])


def test_low_rank_weighs_by_the_input():
    """With the input's RMS the truncated SVD errs least on such inputs."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    rms = torch.cat([torch.full((8,), 10.0), torch.full((24,), 0.1)])
    x = torch.randn(512, 32) * rms
    with torch.no_grad():
        err = {w: float((low_rank_factors(layer, 8, w)(x) - layer(x)).square().mean())
               for w in (None, rms)}
    assert err[rms] < 0.5 * err[None]


def test_layer_statistics_moments_feed_the_pass():
    model = DemoNet().eval()
    gm, groups = groups_of(model, torch.randn(1, 3, 64, 64))
    stats = layer_statistics(gm)
    assert any(st.in_mean is not None for st in stats.values())
