"""ChannelFlow: channel edges through adds, concats, chunks, on both front ends."""

from __future__ import annotations

import os

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vbxfx
from vbxfx.passes import AnalyzeLayers, ChannelFlow

FRONTENDS = ["symbolic_trace", "export"]


def flow_of(model, x, frontend="auto") -> nx.DiGraph:
    gm = vbxfx.trace(model, x, frontend=frontend)
    AnalyzeLayers()(gm)
    result = ChannelFlow()(gm)
    assert result.modified is False and result.module is gm
    return result.details


def edge(graph, u, v):
    assert graph.has_edge(u, v), f"no edge {u} -> {v}; edges from {u}: {list(graph.succ[u])}"
    return graph.edges[u, v]


class AddCatChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(24, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.a(y)                        # residual add
        p, q = y.chunk(2, 1)                     # chunk
        z = torch.cat([self.b(p), q, self.c(q)], 1)  # concat
        return self.fc(self.head(z).mean((2, 3)))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_add_concat_chunk(frontend):
    g = flow_of(AddCatChunk(), torch.randn(1, 3, 8, 8), frontend)
    assert edge(g, "input", "stem") == {"kind": "unchanged", "channels": 3, "offset": 0,
                                       "offsets": (0,), "through": ()}
    assert edge(g, "stem", "a")["kind"] == "unchanged"
    assert edge(g, "stem", "a")["through"] == ("bn",)
    assert edge(g, "stem", "add:add")["kind"] == "add"
    assert edge(g, "a", "add:add")["kind"] == "add"
    assert g.nodes["add:add"]["type"] == "add"
    pieces = sorted(g.succ["add:add"], key=lambda n: g.edges["add:add", n]["offset"])
    assert [(g.edges["add:add", p]["kind"], g.edges["add:add", p]["offset"],
             g.edges["add:add", p]["channels"]) for p in pieces] == [("chunk", 0, 8),
                                                                    ("chunk", 8, 8)]
    first, second = pieces
    assert list(g.succ[first]) == ["b"]
    assert set(g.succ[second]) == {"c", "cat:cat"}
    cat = "cat:cat"
    assert g.nodes[cat]["type"] == "cat" and g.nodes[cat]["channels"] == 24
    assert [(u, g.edges[u, cat]["offset"]) for u in sorted(
        g.pred[cat], key=lambda u: g.edges[u, cat]["offset"])] == [("b", 0), (second, 8),
                                                                   ("c", 16)]
    assert all(g.edges[u, cat]["kind"] == "concat" for u in g.pred[cat])
    assert edge(g, cat, "head")["kind"] == "unchanged"
    assert edge(g, "head", "fc") == {"kind": "unchanged", "channels": 10, "offset": 0,
                                    "offsets": (0,), "through": ()}
    assert edge(g, "fc", "output")["channels"] == 5
    assert g.nodes["fc"] == {"type": "layer", "kind": "linear", "eligible": True,
                             "in_channels": 10, "out_channels": 5}


def test_front_ends_give_the_same_graph():
    x = torch.randn(1, 3, 8, 8)
    graphs = [flow_of(AddCatChunk(), x, fe) for fe in FRONTENDS]
    assert dict(graphs[0].nodes(data=True)) == dict(graphs[1].nodes(data=True))
    assert sorted(graphs[0].edges(data=True)) == sorted(graphs[1].edges(data=True))


class Gated(nn.Module):
    """Squeeze-excitation gate, a depthwise conv, a slice, a cat of one source twice."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(32, 8, 1)
        self.side = nn.Conv2d(6, 8, 1)

    def forward(self, x):
        y = F.silu(self.dw(self.expand(x)))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = y * scale
        out = self.project(torch.cat([y, y], 1))
        return out + self.side(y[:, 2:8])


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_gate_depthwise_slice_and_double_cat(frontend):
    g = flow_of(Gated(), torch.randn(1, 4, 6, 6), frontend)
    assert "dw" not in g  # depthwise: channel c stays channel c
    assert edge(g, "expand", "fc1")["through"] == ("dw",)
    (mul,) = [n for n, d in g.nodes(data=True) if d["type"] == "mul"]
    assert edge(g, "expand", mul)["kind"] == "mul" and edge(g, "fc2", mul)["kind"] == "mul"
    (cat,) = [n for n, d in g.nodes(data=True) if d["type"] == "cat"]
    assert edge(g, mul, cat)["offsets"] == (0, 16)
    assert edge(g, cat, "project")["channels"] == 32
    (piece,) = [n for n, d in g.nodes(data=True) if d["type"] == "split"]
    assert edge(g, mul, piece) == {"kind": "split", "channels": 6, "offset": 2,
                                   "offsets": (2,), "through": ()}
    assert edge(g, piece, "side")["kind"] == "unchanged"
    (add,) = [n for n, d in g.nodes(data=True) if d["type"] == "add"]
    assert set(g.pred[add]) == {"project", "side"}


class Tokens(nn.Module):
    """Conv patches -> tokens -> Linear, and a reshape that mixes channels."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.mix = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)         # [B, 16, 8]
        t = t + self.mlp(self.norm(t))
        mixed = self.mix(t.reshape(1, 16, 2, 4).transpose(1, 2))  # 8 channels -> 2 x 4
        return t[:, 0], mixed


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_tokens_and_reshapes(frontend):
    g = flow_of(Tokens(), torch.randn(1, 3, 8, 8), frontend)
    assert edge(g, "patch", "mlp") == {"kind": "unchanged", "channels": 8, "offset": 0,
                                      "offsets": (0,), "through": ("norm",)}
    (add,) = [n for n, d in g.nodes(data=True) if d["type"] == "add"]
    assert set(g.pred[add]) == {"patch", "mlp"}
    assert edge(g, add, "output")["channels"] == 8  # t[:, 0] keeps the 8 channels
    (reshape,) = [n for n, d in g.nodes(data=True) if d["type"] == "opaque"]
    assert edge(g, add, reshape)["kind"] == "reshape"
    assert set(g.succ[reshape]) == {"mix"}


def test_needs_analyze_layers_first():
    gm = vbxfx.trace(AddCatChunk(), torch.randn(1, 3, 8, 8))
    with pytest.raises(KeyError, match="run vbxfx.passes.AnalyzeLayers first"):
        ChannelFlow()(gm)


@pytest.mark.slow
def test_resnet18_known_edges():
    torchvision = pytest.importorskip("torchvision")
    g = flow_of(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 224, 224))
    layers = [n for n, d in g.nodes(data=True) if d["type"] == "layer"]
    assert len(layers) == 21
    assert sum(1 for _, d in g.nodes(data=True) if d["type"] == "add") == 8
    assert edge(g, "conv1", "layer1.0.conv1")["through"] == ("bn1",)
    previous_join = None
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            inner = edge(g, f"{prefix}.conv1", f"{prefix}.conv2")
            assert inner["kind"] == "unchanged" and inner["through"] == (f"{prefix}.bn1",)
            (join,) = g.succ[f"{prefix}.conv2"]  # each conv2 feeds exactly its residual add
            assert g.nodes[join]["type"] == "add"
            assert g.edges[f"{prefix}.conv2", join]["kind"] == "add"
            shortcut = (f"{prefix}.downsample.0" if stage > 1 and block == 0
                        else previous_join or "conv1")
            assert set(g.pred[join]) == {f"{prefix}.conv2", shortcut}
            if shortcut.endswith("downsample.0"):
                assert edge(g, previous_join, shortcut)["kind"] == "unchanged"
            previous_join = join
            assert g.nodes[join]["channels"] == 64 * 2 ** (stage - 1)
    assert edge(g, previous_join, "fc")["channels"] == 512
    assert list(g.succ["fc"]) == ["output"]


@pytest.mark.slow
def test_yolov8n_c2f_chunk_and_concat():
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.nn.tasks import DetectionModel

    g = flow_of(DetectionModel("yolov8n.yaml", verbose=False), torch.randn(1, 3, 320, 320))
    # C2f model.2: cv1 (32 ch) is chunked in two, both halves and the bottleneck output are
    # concatenated into cv2; the bottleneck adds its input half back.
    cv1 = "model.2.cv1.conv"
    pieces = sorted(g.succ[cv1], key=lambda p: g.edges[cv1, p]["offset"])
    assert [(g.edges[cv1, p]["kind"], g.edges[cv1, p]["offset"]) for p in pieces] == [
        ("chunk", 0), ("chunk", 16)]
    (cat,) = g.pred["model.2.cv2.conv"]
    assert g.nodes[cat]["type"] == "cat" and g.nodes[cat]["channels"] == 48
    by_offset = {g.edges[u, cat]["offset"]: u for u in g.pred[cat]}
    assert by_offset[0] == pieces[0] and by_offset[16] == pieces[1]
    add = by_offset[32]
    assert g.nodes[add]["type"] == "add"
    assert set(g.pred[add]) == {pieces[1], "model.2.m.0.cv2.conv"}
    assert "model.2.m.0.cv1.conv" in g.succ[pieces[1]]
    # SPPF: three max-pools of the same source concatenated with it
    sppf_cat = next(iter(g.pred["model.9.cv2.conv"]))
    assert g.edges["model.9.cv1.conv", sppf_cat]["offsets"] == (0, 128, 256, 384)
