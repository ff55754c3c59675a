"""Rewrite / Finalize passes and vbxfx.compress on small models and torchvision resnet18."""

import copy
import json

import pytest
import torch
import torch.fx
from torch import nn

import vbxfx
from vbxfx.errors import ConfigError, FormatError
from vbxfx.format import require_fit, unstructured_macs, weight_repeat
from vbxfx.modules import VBXConv2d, VBXLinear, from_dense, is_compressed
from vbxfx.passes import Finalize, Rewrite


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = Block()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.dw(self.block(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(2, 3, 8, 8)
PLAN = {"stem": 2, "block.conv": 1, "fc": ("ucomp", 0.6)}


def _manual(model, plan):
    ref = copy.deepcopy(model)
    for name, level in plan.items():
        parent, _, leaf = name.rpartition(".")
        owner = ref.get_submodule(parent) if parent else ref
        old = getattr(owner, leaf)
        if isinstance(level, tuple):
            new = from_dense(old, fmt="ucomp", compression=level[1])
        else:
            new = from_dense(old, repeat=level)
        setattr(owner, leaf, new)
    return ref


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_rewrite_matches_manual_swap_and_leaves_caller_alone():
    model = _model()
    before = _snapshot(model)
    gm = vbxfx.trace(model, X)
    result = Rewrite(PLAN)(gm)
    assert result.modified and result.module is gm
    root = gm.meta["vbxfx.root"]
    for name in PLAN:
        assert is_compressed(root.get_submodule(name))
    assert gm.get_submodule("stem") is root.stem          # swapped in both
    assert gm.get_submodule("block.conv") is root.block.conv
    gm.graph.lint()
    expected = _manual(model, PLAN)(X)
    torch.testing.assert_close(gm(X), expected)
    torch.testing.assert_close(root(X), expected)
    after = _snapshot(model)
    assert after[1] == before[1]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())

    details = result.details
    assert set(details) == set(PLAN)
    assert details["stem"].repeat == 2 and details["block.conv"].repeat == 1
    assert details["fc"].fmt == "ucomp" and details["fc"].repeat == 0
    assert details["fc"].compression == 0.6
    for rec in details.values():
        assert 0.0 < rec.projection_error < 1.0 and 0.0 <= rec.paired_fraction <= 1.0
        json.dumps(rec.to_dict())


def test_modified_false_both_ways():
    gm = vbxfx.trace(_model(), X)
    assert Rewrite({})(gm).modified is False
    assert Rewrite({"stem": 4, "fc": "dense", "block.conv": ("ucomp", 0.0)})(gm).modified is False
    assert not any(is_compressed(m) for m in gm.meta["vbxfx.root"].modules())
    assert Rewrite({"stem": ("comp", 2)})(gm).modified is True


def test_hooks_requires_grad_training_mode_kept():
    model = _model()
    calls = []
    model.stem.register_forward_hook(lambda m, i, o: calls.append("stem"))
    model.block.conv.register_forward_pre_hook(lambda m, i: calls.append("conv"))
    model.stem.weight.requires_grad_(False)
    model.train()
    model.block.conv.eval()
    gm = vbxfx.trace(model, X)
    Rewrite({"stem": 2, "block.conv": 2})(gm)
    root = gm.meta["vbxfx.root"]
    assert root.stem.training and not root.block.conv.training
    assert not root.stem.weight.requires_grad and root.block.conv.weight.requires_grad
    calls.clear()
    gm(X)
    assert calls == ["stem", "conv"]


def test_unknown_name_lists_closest_and_changes_nothing():
    gm = vbxfx.trace(_model(), X)
    with pytest.raises(ConfigError, match=r"'block.cnv'.*closest: \['block.conv'"):
        Rewrite({"stem": 2, "block.cnv": 2})(gm)
    assert not is_compressed(gm.meta["vbxfx.root"].stem)
    with pytest.raises(ConfigError, match="depthwise"):
        Rewrite({"stem": 2, "dw": 2})(gm)
    assert not is_compressed(gm.meta["vbxfx.root"].stem)
    with pytest.raises(ConfigError, match="only nn.Conv2d"):
        Rewrite({"block.bn": 2})(gm)


@pytest.mark.parametrize("value", [3, 0.5, "2:4", ("ucomp", 1.5), ("comp", 3), True, None])
def test_bad_plan_values_fail_at_construction(value):
    with pytest.raises(ConfigError, match="accepted are"):
        Rewrite({"stem": value})


def test_nan_weight_names_the_layer_and_changes_nothing():
    model = _model()
    with torch.no_grad():
        model.block.conv.weight[0, 0, 0, 0] = float("inf")
    gm = vbxfx.trace(model, X)
    with pytest.raises(FormatError, match="block.conv"):
        Rewrite({"stem": 2, "block.conv": 2})(gm)
    assert not is_compressed(gm.meta["vbxfx.root"].stem)


def test_inside_leaf_module():
    model = _model()
    gm = vbxfx.trace(model, X, leaf_modules=(Block,))
    assert "block.conv" not in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert Rewrite({"block.conv": 1})(gm).modified
    assert is_compressed(gm.get_submodule("block").conv)
    torch.testing.assert_close(gm(X), _manual(model, {"block.conv": 1})(X))


def test_export_front_end_swaps_in_root():
    model = _model()
    gm = vbxfx.trace(model, X, frontend="export")
    dense_out = gm(X)
    result = Rewrite({"stem": 2, "fc": 1})(gm)
    root = gm.meta["vbxfx.root"]
    assert result.modified and is_compressed(root.stem) and is_compressed(root.fc)
    torch.testing.assert_close(root(X), _manual(model, {"stem": 2, "fc": 1})(X))
    torch.testing.assert_close(gm(X), dense_out)   # the exported graph is the analysis view


def test_finalize():
    model = _model()
    gm = vbxfx.trace(model, X)
    Rewrite(PLAN)(gm)
    compressed = gm.meta["vbxfx.root"]
    expected = compressed(X)
    plain, notes = vbxfx.finalize(compressed)
    assert is_compressed(compressed.stem)                 # inplace=False by default
    assert not any(is_compressed(m) for m in plain.modules())
    assert type(plain.stem) is nn.Conv2d and type(plain.fc) is nn.Linear
    torch.testing.assert_close(plain(X), expected)
    assert set(notes) == set(PLAN)
    assert notes["stem"].fmt == "comp" and notes["stem"].repeat == 2
    assert notes["block.conv"].repeat == 1 and notes["fc"].fmt == "ucomp"
    assert notes["fc"].encoding.format == "ucomp" and notes["fc"].repeat == 0
    require_fit(plain.stem.weight, 2)
    require_fit(plain.block.conv.weight, 1)
    assert unstructured_macs(plain.fc.weight) <= round(0.4 * plain.fc.weight.numel())
    assert torch.equal(notes["stem"].encoding.mask, plain.stem.weight != 0)
    json.dumps({k: v.to_dict() for k, v in notes.items()})

    result = Finalize()(gm)                               # the pass: gm and root in place
    assert result.modified and set(result.details) == set(PLAN)
    assert type(gm.meta["vbxfx.root"].stem) is nn.Conv2d and type(gm.stem) is nn.Conv2d
    gm.graph.lint()
    torch.testing.assert_close(gm(X), expected)
    assert Finalize()(gm).modified is False


def test_compress_pipeline_small():
    model = _model()
    before = _snapshot(model)
    result = vbxfx.compress(model, X, compression=0.6)
    compressed, report = result
    assert compressed is result.model and not any(is_compressed(m) for m in model.modules())
    assert all(torch.equal(_snapshot(model)[0][k], v) for k, v in before[0].items())
    json.dumps(report)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["dw"]["fmt"] == "dense" and not rows["dw"]["eligible"]
    for name in ("stem", "block.conv", "fc"):
        layer = compressed.get_submodule(name)
        assert is_compressed(layer) and rows[name]["repeat"] == layer.repeat
        assert weight_repeat(layer.compressed_weight()) <= layer.repeat
    assert report["achieved"] >= 0.6
    assert report["totals"]["macs_after"] == sum(r["macs_after"] for r in report["layers"])
    assert report["totals"]["macs_after"] < report["totals"]["macs_before"]
    compressed(X).sum().backward()

    u = vbxfx.compress(model, X, compression=0.7, fmt="ucomp").report
    assert u["fmt"] == "ucomp" and all(r["fmt"] in ("ucomp", "dense") for r in u["layers"])


@pytest.mark.slow
def test_resnet18_rewrite_and_finalize():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = _snapshot(model)
    x = torch.randn(1, 3, 64, 64)
    gm = vbxfx.trace(model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    plan = {n: (1 if n.startswith("layer4") else 2) for n in convs}
    plan["fc"] = 2
    result = Rewrite(plan)(gm)
    assert result.modified and len(result.details) == len(plan)
    gm.graph.lint()
    root = gm.meta["vbxfx.root"]
    assert isinstance(root.layer4[1].conv2, VBXConv2d) and isinstance(root.fc, VBXLinear)
    assert gm.get_submodule("layer4.1.conv2") is root.layer4[1].conv2
    out = gm(x)
    torch.testing.assert_close(out, _manual(model, plan)(x))
    after = _snapshot(model)
    assert after[1] == before[1]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    plain, notes = vbxfx.finalize(root)
    assert len(notes) == len(plan)
    torch.testing.assert_close(plain(x), out)
    assert weight_repeat(plain.layer4[0].conv1.weight) == 1
