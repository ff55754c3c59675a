"""check_onnx on outputs after a discrete selection (TopK): the selections' inputs are
compared instead, and the report says so (RT-DETR picks its queries this way)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.export.selections import outputs_after, selections


class _Picks(nn.Module):
    """Scores every position, keeps the 5 best, returns their features and a mean score."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        f = self.conv(x).flatten(2).transpose(1, 2)                 # [B, HW, 16]
        scores = self.head(f).max(-1).values                        # [B, HW]
        idx = torch.topk(scores, 5, dim=1).indices                  # [B, 5]
        picked = torch.gather(f, 1, idx.unsqueeze(-1).expand(-1, -1, f.shape[-1]))
        best = torch.topk(picked.sum(-1), 3, dim=1).values          # a pick among the picks
        return picked, scores.mean(1), best


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _Picks().eval()
    x = torch.randn(2, 8, 8, 8)
    small = vbxfx.compress(model, x, compression=0.5).model.eval()
    path = tmp_path_factory.mktemp("sel") / "picks.onnx"
    vbxfx.export_onnx(small, x, path)
    return small, x, str(path)


def test_outputs_after_topk_are_found_in_the_graph(exported):
    _, _, path = exported
    proto = onnx.load(path)
    found = selections(proto)
    assert [(s.kind, s.after) for s in found] == [("topk", False), ("topk", True)]
    first, second, third = (o.name for o in proto.graph.output)
    assert outputs_after(proto) == [first, third]   # the mean score comes before the pick


def test_check_compares_the_selection_input_and_says_so(exported):
    small, x, path = exported
    report = vbxfx.check_onnx(path, torch_model=small, example_inputs=x, n_random=2)
    assert report.ok, str(report)
    names = {r.output for r in report.outputs}
    proto = onnx.load(path)
    picked, mean, best = (o.name for o in proto.graph.output)
    assert picked not in names and best not in names and mean in names
    rows = [r for r in report.outputs if "(input of" in r.output]
    assert len(rows) == 3 and all(r.ok for r in rows)   # the first pick: example + 2 random
    assert len({r.output for r in rows}) == 1
    assert any("after a discrete selection (topk:" in n for n in report.notes), report.notes


def test_a_changed_score_fails_at_the_selection_input(exported):
    small, x, path = exported
    other = _Picks().eval()
    with torch.no_grad():
        other.conv.weight.copy_(small.conv.compressed_weight())
        other.conv.bias.copy_(small.conv.bias)
        other.head.weight.copy_(small.head.compressed_weight() * 1.01)   # scores move
        other.head.bias.copy_(small.head.bias)
    report = vbxfx.check_onnx(path, torch_model=other, example_inputs=x, n_random=0)
    assert not report.ok
    assert any("(input of" in p for p in report.problems), report.problems


@pytest.mark.slow
def test_rtdetr_checks_at_its_query_selection(tmp_path, capsys):
    """rtdetr-l picks its queries with topk: `vbxfx compress` checks the file it writes and
    passes, comparing the scores the pick is made from (it failed before, dense too)."""
    pytest.importorskip("ultralytics")
    import json
    import os

    from vbxfx.cli.main import main

    os.environ.setdefault("YOLO_OFFLINE", "1")
    out = tmp_path / "rtdetr.onnx"
    rc = main(["compress", "ultralytics:rtdetr-l.yaml", "--input-shape", "1,3,320,320",
               "--compression", "0.66", "-o", str(out), "--json"])
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    check = report["check"]
    assert rc == 0 and check["ok"], check["problems"]
    assert any("after a discrete selection (topk" in n for n in check["notes"])
    assert check["outputs"] and all("(input of" in o["output"] for o in check["outputs"])


def test_unmatched_selections_are_compared_element_by_element(exported, monkeypatch):
    """When torch's calls cannot be paired with the file's nodes (here: torch records none),
    every output is compared as it would be without selections, and a note says so."""
    import vbxfx.export.selections as sel

    small, x, path = exported
    monkeypatch.setattr(sel, "_TORCH_KINDS", {})
    report = vbxfx.check_onnx(path, torch_model=small, example_inputs=x, n_random=0)
    proto = onnx.load(path)
    assert {r.output for r in report.outputs} == {o.name for o in proto.graph.output}
    assert any("could not be matched" in n for n in report.notes), report.notes
    assert report.ok, str(report)        # no near-tie in these scores: the picks agree


class _PicksFromInput(nn.Module):
    """A TopK straight on the graph input: its input is no intermediate value to read out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        idx = torch.topk(x, 4, dim=1).indices
        return self.fc(x), torch.gather(x, 1, idx)


def test_a_selection_on_the_graph_input_still_checks(tmp_path):
    model = _PicksFromInput().eval()
    x = torch.randn(2, 16)
    small = vbxfx.compress(model, x, compression=0.5).model.eval()
    path = tmp_path / "input_pick.onnx"
    vbxfx.export_onnx(small, x, path)
    report = vbxfx.check_onnx(str(path), torch_model=small, example_inputs=x, n_random=1)
    assert report.ok, str(report)
    assert any("(input of" in r.output for r in report.outputs)   # the input itself, read out
    assert any("after a discrete selection" in n for n in report.notes)
