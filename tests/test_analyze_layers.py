"""AnalyzeLayers / LayerTable: exact MAC counts, eligibility reasons, both front ends."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vbxfx
from vbxfx.errors import ConfigError, FormatError
from vbxfx.analysis.layers import LINEAR_NOTE, LayerInfo, LayerTable
from vbxfx.meta import LAYER_KEY, get_meta
from vbxfx.passes import AnalyzeLayers, PassResult

FRONTENDS = ["symbolic_trace", "export"]


def analyze_gm(model, x, frontend="auto", **kw):
    gm = vbxfx.trace(model, x, frontend=frontend)
    assert gm.meta["vbxfx.frontend"] == frontend or frontend == "auto"
    result = AnalyzeLayers(**kw)(gm)
    return gm, result


def comparable(table: LayerTable) -> list[dict]:
    """The table without the fx node names, which differ between front ends."""
    rows = []
    for layer in table:
        d = layer.to_dict()
        del d["node_name"], d["node_names"]
        rows.append(d)
    return rows


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_tiny_model_exact_macs(frontend):
    gm, result = analyze_gm(Tiny(), torch.randn(1, 3, 16, 16), frontend)
    table = result.details
    assert isinstance(result, PassResult) and result.modified is False and result.module is gm
    assert table.names() == ["conv1", "conv2", "fc"]
    conv1, conv2, fc = table["conv1"], table["conv2"], table["fc"]
    # conv1: 16 out x 3 in x 3x3 kernel x 8x8 outputs; the hardware pads 3 channels to 8
    assert conv1.macs == 16 * 3 * 9 * 64 == 27648
    assert conv1.hw_macs == {4: 16 * 9 * 8 * 64, 2: 16 * 9 * 8 * 64 // 2, 1: 16 * 9 * 8 * 64 // 4}
    assert (conv1.in_shape, conv1.out_shape) == ((1, 3, 16, 16), (1, 16, 8, 8))
    assert (conv1.kernel_positions, conv1.output_positions, conv1.params) == (9, 64, 448)
    assert conv2.macs == 32 * 16 * 64 == 32768
    assert conv2.hw_macs == {4: 32768, 2: 16384, 1: 8192}
    assert fc.macs == 320 and fc.hw_macs == {4: 320, 2: 160, 1: 80}
    assert fc.kind == "linear" and fc.note == LINEAR_NOTE and fc.eligible
    assert table.total_macs == table.eligible_macs == 27648 + 32768 + 320
    assert table.hw_macs() == 73728 + 32768 + 320
    assert table.hw_macs({"conv1": 1, "conv2": 2}) == 18432 + 16384 + 320
    assert all(layer.calls == 1 and layer.eligible and layer.reason is None for layer in table)


def test_front_ends_agree_on_tiny_model():
    x = torch.randn(1, 3, 16, 16)
    tables = [analyze_gm(Tiny(), x, fe)[1].details for fe in FRONTENDS]
    assert comparable(tables[0]) == comparable(tables[1])


def test_pass_flags_meta_and_graph_untouched():
    gm = vbxfx.trace(Tiny(), torch.randn(1, 3, 16, 16))
    code = gm.code
    assert AnalyzeLayers.in_place is True and AnalyzeLayers.changes_input is False
    table = AnalyzeLayers()(gm).details
    assert gm.code == code
    gm.graph.lint()
    calls = [n for n in gm.graph.nodes if LAYER_KEY in n.meta]
    assert [get_meta(n, LAYER_KEY).name for n in calls] == ["conv1", "conv2", "fc"]
    assert all(get_meta(n, LAYER_KEY) == table[n.target] for n in calls)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")
    assert AnalyzeLayers()(gm).details == table  # running it again gives the same table


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_module_called_twice_costs_twice(frontend):
    gm, result = analyze_gm(Twice(), torch.randn(1, 8, 6, 6), frontend)
    (layer,) = list(result.details)
    assert layer.name == "conv" and layer.calls == 2
    assert layer.macs == 2 * (8 * 8 * 9 * 36)
    assert layer.hw_macs[4] == 2 * (8 * 9 * 8 * 36)
    assert len(layer.node_names) == 2 and layer.output_positions == 36
    per_call = [n.meta[LAYER_KEY] for n in gm.graph.nodes if LAYER_KEY in n.meta]
    assert [c.calls for c in per_call] == [1, 1]
    assert sum(c.macs for c in per_call) == layer.macs


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_tied_weights_are_ineligible(frontend):
    table = analyze_gm(Tied(), torch.randn(2, 8), frontend)[1].details
    assert table["a"].reason == "weight shared with layer b"
    assert table["b"].reason == "weight shared with layer a"
    assert not table["a"].eligible and not table["b"].eligible
    assert table["c"].eligible
    assert table.hw_macs({"a": 1}) == 64 + 64 + table["c"].hw_macs[4]  # tied stay dense
    assert str(table).splitlines()[2].split()[6:9] == ["64", "-", "-"]


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.weight = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.proj = nn.Parameter(torch.randn(5, 6))
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = F.conv2d(self.conv(x), self.block.weight, padding=1)
        return F.linear(y.mean((2, 3)), self.proj)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_functional_calls_on_parameters_are_reported(frontend):
    table = analyze_gm(Functional(), torch.randn(1, 3, 5, 5), frontend)[1].details
    assert table.names() == ["conv", "block", "proj"]
    conv, block, proj = table["conv"], table["block"], table["proj"]
    assert conv.eligible and conv.kind == "conv2d"
    assert block.kind == "functional_conv2d" and not block.eligible
    assert block.reason == ("functional F.conv2d call on parameter 'block.weight' of Module "
                            "'block': vbxfx rewrites modules only")
    assert block.macs == 6 * 4 * 9 * 25 and block.weight_shape == (6, 4, 3, 3)
    assert proj.kind == "functional_linear" and not proj.eligible
    assert proj.reason.startswith("functional F.linear call on parameter 'proj' of the root")
    assert proj.macs == 30


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gc = nn.Conv2d(32, 16, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.pw(self.gc(self.dw(x)))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_depthwise_and_grouped_convs(frontend):
    table = analyze_gm(Grouped(), torch.randn(1, 32, 4, 4), frontend)[1].details
    dw, gc, pw = table["dw"], table["gc"], table["pw"]
    assert dw.reason == "depthwise conv (groups=32)" and dw.groups == 32
    assert dw.macs == 32 * 1 * 9 * 16
    assert gc.reason == "grouped conv (groups=4)"
    assert (gc.in_channels, gc.out_channels) == (32, 16)
    assert gc.macs == 16 * (32 // 4) * 9 * 16
    assert pw.eligible
    # ineligible layers stay dense at their standard MACs whatever repeat is asked
    assert table.hw_macs({"dw": 1, "gc": 2, "pw": 1}) == dw.macs + gc.macs + pw.hw_macs[1]
    assert table.eligible_macs == pw.macs


class OtherConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3)
        self.up = nn.ConvTranspose2d(6, 2, 2, stride=2)
        self.c3 = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        y = self.c1(x)                                   # [1, 6, 8]
        y = self.up(y.view(1, 6, 2, 4))                   # [1, 2, 4, 8]
        return self.c3(y.unsqueeze(2))                    # [1, 3, 1, 4, 8]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_conv1d_conv_transpose_conv3d(frontend):
    table = analyze_gm(OtherConvs(), torch.randn(1, 4, 10), frontend)[1].details
    c1, up, c3 = table["c1"], table["up"], table["c3"]
    assert (c1.kind, c1.reason, c1.macs) == ("conv1d", "Conv1d", 6 * 4 * 3 * 8)
    assert c1.output_positions == 8 and c1.kernel_positions == 3
    assert (up.kind, up.reason) == ("conv_transpose", "transposed conv")
    assert (up.in_channels, up.out_channels, up.output_positions) == (6, 2, 32)
    assert up.macs == 6 * 2 * 4 * 8  # every input position scatters a 2x2 kernel
    assert (c3.kind, c3.reason, c3.macs) == ("conv3d", "Conv3d", 3 * 2 * 9 * 32)
    assert table.eligible() == []


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_linear_on_tokens(frontend):
    model = nn.Sequential(nn.Linear(6, 4), nn.GELU())
    table = analyze_gm(model, torch.randn(2, 5, 6), frontend)[1].details
    layer = table["0"]
    assert layer.in_shape == (2, 5, 6) and layer.out_shape == (2, 5, 4)
    assert layer.output_positions == 5 and layer.kernel_positions == 1
    assert layer.macs == 4 * 6 * 5  # per batch element
    assert layer.hw_macs[4] == 4 * 8 * 5 and layer.hw_macs[1] == 4 * 8 * 5 // 4
    assert layer.params == 28 and layer.eligible and layer.note == LINEAR_NOTE


def test_root_that_is_a_conv():
    (layer,) = list(vbxfx.analyze(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8)))
    assert (layer.name, layer.kind, layer.macs, layer.eligible) == ("", "conv2d", 7776, True)


def test_exclude_names_and_globs():
    x = torch.randn(1, 3, 16, 16)
    table = vbxfx.analyze(Tiny(), x, exclude=["conv*", "fc"])
    assert [layer.reason for layer in table] == ["excluded by user"] * 3
    assert vbxfx.analyze(Tiny(), x, exclude="conv2")["conv2"].reason == "excluded by user"
    assert vbxfx.analyze(Tiny(), x, exclude="conv2")["conv1"].eligible
    with pytest.raises(ConfigError,
                       match=r"'conv3' matches no layer; closest names: \['conv2', 'conv1'\]"):
        vbxfx.analyze(Tiny(), x, exclude=["conv3"])
    with pytest.raises(ConfigError, match="non-empty strings"):
        AnalyzeLayers(exclude=[3])


def test_exclude_keeps_the_structural_reason():
    table = vbxfx.analyze(Grouped(), torch.randn(1, 32, 4, 4), exclude="*")
    assert table["dw"].reason == "depthwise conv (groups=32)"
    assert table["pw"].reason == "excluded by user"


def test_example_inputs_for_a_plain_graph_module():
    gm = torch.fx.symbolic_trace(Tiny())
    with pytest.raises(ConfigError, match="needs example inputs"):
        AnalyzeLayers()(gm)
    table = AnalyzeLayers(example_inputs=torch.randn(1, 3, 16, 16))(gm).details
    assert table.total_macs == 60736


def test_leaf_module_hiding_layers_warns(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

    model = nn.Sequential(Block(), nn.Conv2d(3, 4, 1))
    gm = vbxfx.trace(model, torch.randn(1, 3, 4, 4), leaf_modules=(Block,))
    with caplog.at_level(logging.WARNING, logger="vbxfx.passes.analyze_layers"):
        table = AnalyzeLayers()(gm).details
    assert table.names() == ["1", "0.conv"]
    inside = table["0.conv"]
    assert not inside.eligible and inside.calls == 0 and inside.macs == 0
    assert inside.reason == "runs inside the leaf module '0' (Block), which vbxfx does not trace into"
    assert [(op.name, op.macs) for op in table.ops] == [("0", 3 * 3 * 16)]  # counted, dense
    assert table.total_macs == 3 * 3 * 16 + 4 * 3 * 16
    assert "run inside leaf modules" in caplog.text and "0.conv" in caplog.text


def test_not_a_graph_module():
    with pytest.raises(TypeError, match="trace the model first"):
        AnalyzeLayers()(Tiny())


# --------------------------------------------------------------------------- LayerTable


def test_layer_table_access_serialisation_and_text():
    table = vbxfx.analyze(Grouped(), torch.randn(1, 32, 4, 4))
    assert len(table) == 3 and "gc" in table and [layer.name for layer in table] == table.names()
    with pytest.raises(KeyError, match=r"closest: \['pw'\]"):
        table["pww"]
    with pytest.raises(ConfigError, match="no layer named 'pww'"):
        table.hw_macs({"pww": 1})
    with pytest.raises(FormatError, match="repeat must be one of"):
        table.hw_macs({"pw": 3})
    assert LayerTable.from_json(table.to_json()) == table
    assert LayerTable.from_dict(table.to_dict()) == table
    assert table.to_dict()["total_macs"] == table.total_macs
    with pytest.raises(dataclasses.FrozenInstanceError):
        table["pw"].macs = 0
    with pytest.raises(ConfigError, match="given twice"):
        LayerTable([table["pw"], table["pw"]])
    with pytest.raises(ConfigError, match="kind must be one of"):
        dataclasses.replace(table["pw"], kind="conv4d")
    text = str(table).splitlines()
    assert text[0].split()[:6] == ["layer", "kind", "weight", "out", "calls", "MACs"]
    rows = text[2:5]
    assert [row.split()[0] for row in rows] == ["dw", "gc", "pw"]
    assert len({row.index(" yes") if " yes" in row else row.index(" no:") for row in rows}) == 1
    assert text[-3:] == [
        "3 layers, 1 eligible",
        f"standard MACs: {table.total_macs:,} (Conv/Linear layers {table.total_macs:,}, of which "
        f"eligible {table.eligible_macs:,}; other ops 0)",
        f"dense hardware MACs (R=4, input channels padded to 8): {table.hw_macs():,}"]


def test_layer_info_cost():
    info = LayerInfo("fc", "linear", "fc", (10, 4), (1, 4), (1, 10), 1, 4, 10, 1, 1, 1, 40,
                     {4: 80, 2: 40, 1: 20}, 50, True)
    assert (info.cost(), info.cost(2), info.cost(1)) == (80, 40, 20)
    assert dataclasses.replace(info, eligible=False).cost(1) == 80  # dense, 4 channels pad to 8
    depthwise = dataclasses.replace(info, kind="conv2d", groups=4, eligible=False)
    assert depthwise.cost(1) == 40 and not depthwise.block_layout  # standard MACs
    assert info.node_names == ("fc",)
    assert LayerInfo.from_dict(info.to_dict()) == info


def test_data_dependent_shapes_fall_back_to_a_real_run():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x[x.abs() >= 0].reshape(-1, 4))  # shape known only from values

    gm = vbxfx.trace(Masked(), torch.randn(3, 4))
    assert gm.meta["vbxfx.frontend"] == "symbolic_trace"
    layer = AnalyzeLayers()(gm).details["fc"]
    assert layer.in_shape == (3, 4) and layer.macs == 8


class Sliced(nn.Module):
    """Runs ``self.model[:-1]`` then ``self.model[-1]`` (ultralytics' RT-DETR does this)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 1)),
                                   nn.Conv2d(8, 4, 1))

    def forward(self, x):
        for m in self.model[:-1]:
            x = m(x)
        return self.model[-1](x)


def test_export_module_paths_through_slices_and_negative_indices():
    """torch.export names a module reached through ``self.model[:-1]`` as
    ``model.slice(None, -1, None).0`` on ultralytics' RT-DETR (test_real_models_counted loads
    it); the stack of this small model is respelled that way, and ``self.model[-1]`` as
    ``model.-1``."""
    gm = vbxfx.trace(Sliced(), torch.randn(1, 3, 8, 8), frontend="export")
    spelling = {"model.0": "model.slice(None, -1, None).0",
                "model.1": "model.slice(None, -1, None).1",
                "model.1.0": "model.slice(None, -1, None).1.0", "model.2": "model.-1"}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            n.meta["nn_module_stack"] = {k: (spelling.get(path, path), kind)
                                         for k, (path, kind) in stack.items()}
    table = AnalyzeLayers()(gm).details
    assert table.names() == ["model.0", "model.1.0", "model.2"]
    assert all(layer.kind == "conv2d" and layer.eligible for layer in table)


def test_resolve_module_path():
    from vbxfx.analysis.layer_records import resolve_module_path
    model = Sliced()
    assert resolve_module_path(model, "model.slice(None, -1, None).1.0") == "model.1.0"
    assert resolve_module_path(model, "model.slice(1, None, None).1") == "model.2"
    assert resolve_module_path(model, "model.-1") == "model.2"
    assert resolve_module_path(model, "") == ""
    assert resolve_module_path(model, "model.7") is None
    assert resolve_module_path(model, "model.slice(None, -1, None)") is None
    assert resolve_module_path(model, "nope.0") is None


def test_other_ops_and_batch_independent_positions():
    """Attention products count as other ops; a Linear on a ``[seq, batch, features]`` layout
    (as inside nn.MultiheadAttention) counts its rows per batch element."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):                            # x [2, 5, 8]
            y = self.fc(x.transpose(0, 1))               # [5, 2, 8]
            return torch.matmul(y, y.transpose(1, 2))    # [5, 2, 2]: 5*2*2*8 MACs, batch 2

    for frontend in FRONTENDS:
        table = analyze_gm(SeqFirst(), torch.randn(2, 5, 8), frontend)[1].details
        assert table["fc"].output_positions == 5 and table["fc"].macs == 5 * 8 * 8
        assert [op.macs for op in table.ops] == [5 * 2 * 8 * 2 // 2]
        assert table.total_macs == 5 * 8 * 8 + 80 and table.other_macs == 80, frontend
        assert LayerTable.from_dict(table.to_dict()) == table
