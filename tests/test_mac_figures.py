"""One definition of the MAC figures everywhere (issue 16 item 1, issue 17 items 2, 9, 10):
standard MACs, dense hardware MACs (R=4, channels padded to 8), hardware MACs after, removed of
the dense hardware MACs; the same numbers in analyze, compress, check and the report JSON;
every multiply-heavy op counted; a declared repeat above what the weights need is a warning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import vbxfx
from independent_macs import count_multiplies
from test_export import compress_by_hand, fast_encoding, fit_fast
from vbxfx.export.annotations import LayerAnnotation
from vbxfx.format import PairEncoding
from vbxfx.cli.report import format_report


class Stem(nn.Module):
    """A 3-channel stem (costs 8 channels on the hardware), a depthwise conv (dense), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.pw(self.dw(torch.relu(self.stem(x)))).mean((2, 3)))


STEM_STANDARD = 16 * 3 * 9 * 64 + 16 * 9 * 64 + 32 * 16 * 64 + 32 * 10
STEM_DENSE_HW = 16 * 8 * 9 * 64 + 16 * 9 * 64 + 32 * 16 * 64 + 32 * 10


def _compressed_stem(compression=0.6):
    torch.manual_seed(0)
    model = Stem().eval()
    x = torch.randn(1, 3, 8, 8)
    return model, x, vbxfx.compress(model, x, compression)


def test_compress_check_and_analyze_agree(tmp_path):
    model, x, result = _compressed_stem()
    totals = result.report["totals"]
    assert totals["macs"] == STEM_STANDARD
    assert totals["hw_macs_dense"] == totals["macs_before"] == STEM_DENSE_HW
    table = vbxfx.analyze(model, x)
    assert (table.total_macs, table.hw_macs()) == (STEM_STANDARD, STEM_DENSE_HW)
    path = tmp_path / "stem.onnx"
    vbxfx.export_onnx(result.model, x, path)
    check = vbxfx.check_onnx(path, torch_model=result.model, example_inputs=x, n_random=0)
    t = check.totals()
    assert check.ok, str(check)
    assert (t["macs"], t["hw_macs_dense"], t["hw_macs"]) == (
        totals["macs"], totals["hw_macs_dense"], totals["hw_macs"])
    assert t["macs_removed"] == pytest.approx(totals["macs_removed"])
    # the achieved figure is of the whole model (the depthwise conv stays dense)
    assert result.report["achieved"] == pytest.approx(totals["macs_removed"])
    assert result.report["achieved_of_eligible"] > totals["macs_removed"]
    # each text names the figures the same way and prints the same share
    share = f"{100 * totals['macs_removed']:.1f}% of the dense hardware MACs removed"
    assert share in format_report(result.report)
    assert f"{t['macs_removed']:.1%} of the dense hardware MACs removed" in str(check)
    assert "standard MACs" in str(check) and "standard MACs" in str(table)
    json.dumps(result.report)


def test_cli_analyze_and_compress_print_the_same_figures(tmp_path):
    source = tmp_path / "stem_model.py"
    source.write_text("import torch, sys\nsys.path.insert(0, %r)\nfrom test_mac_figures import "
                      "Stem\n\ndef build():\n    torch.manual_seed(0)\n    return Stem()\n"
                      % str(__import__("pathlib").Path(__file__).parent))
    spec = f"{source}:build"
    run = lambda *a: subprocess.run([sys.executable, "-m", "vbxfx", *a], capture_output=True,  # noqa
                                    text=True, timeout=300, cwd=tmp_path)
    analyze = run("analyze", spec, "--input-shape", "1,3,8,8")
    assert analyze.returncode == 0, analyze.stderr
    assert f"standard MACs: {STEM_STANDARD:,}" in analyze.stdout
    assert f"dense hardware MACs (R=4, input channels padded to 8): {STEM_DENSE_HW:,}" in \
        analyze.stdout
    data = json.loads(run("analyze", spec, "--input-shape", "1,3,8,8", "--json").stdout)
    assert (data["total_macs"], data["hw_macs_dense"]) == (STEM_STANDARD, STEM_DENSE_HW)
    out = tmp_path / "m.onnx"
    compress = run("compress", spec, "--input-shape", "1,3,8,8", "-o", str(out), "--json")
    assert compress.returncode == 0, compress.stderr
    data = json.loads(compress.stdout)
    r, c = data["report"]["totals"], data["check"]["totals"]
    assert (r["macs"], r["hw_macs_dense"], r["hw_macs"]) == (c["macs"], c["hw_macs_dense"],
                                                              c["hw_macs"])
    assert r["hw_macs_dense"] == STEM_DENSE_HW


def test_other_multiply_heavy_ops_are_counted_and_warned(caplog):
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):                     # x: [1, 64, 16]
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
            return torch.bmm(a, x)

    x = torch.randn(1, 64, 16)
    result = vbxfx.compress(Attend(), x, 0.5)
    t = result.report["totals"]
    attention = 64 * 16 * 64 + 64 * 64 * 16
    assert t["other_macs"] == attention and [o["macs"] for o in result.report["other_ops"]] == [
        64 * 16 * 64, 64 * 64 * 16]
    assert t["macs"] == 2 * 64 * 16 * 16 + attention
    assert t["macs_before"] - t["macs_after"] == 2 * 64 * 16 * 16 // 2   # the layers at 2:4
    assert t["macs_removed"] == pytest.approx(0.5 * 2 * 64 * 16 * 16 / t["macs_before"])
    assert result.report["achieved"] < 0.2 < 0.5 == result.report["achieved_of_eligible"]
    assert any("stay dense" in w for w in result.report["warnings"])
    assert "other multiply-heavy ops" in format_report(result.report)


def test_docstring_claim_holds_for_depthwise_models():
    """pipeline's docstring: removed of the whole model <= of the eligible layers, equal when
    every layer is eligible."""
    _, _, result = _compressed_stem(0.6)
    report = result.report
    assert report["achieved_of_eligible"] >= 0.6
    assert report["achieved_of_eligible"] > report["totals"]["macs_removed"]
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    r = vbxfx.compress(plain, torch.randn(1, 8, 10, 10), 0.6).report
    assert r["achieved_of_eligible"] == pytest.approx(r["totals"]["macs_removed"])
    assert r["totals"]["macs_removed"] >= 0.6


def _declared(model, layer, declared, fits):
    """Annotate ``layer`` with repeat ``declared`` while its weight fits ``fits``."""
    with torch.no_grad():
        model.get_submodule(layer).weight.copy_(fit_fast(model.get_submodule(layer).weight, fits))
    enc = fast_encoding(model.get_submodule(layer).weight, fits)
    return LayerAnnotation(layer, "comp", declared,
                           PairEncoding(declared, enc.mask, enc.pair_index, enc.pair_sign))


@pytest.mark.parametrize("declared", [2, 4])
def test_a_declared_repeat_above_the_weights_is_a_warning(tmp_path, declared, caplog):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    notes = compress_by_hand(model, {"2": 2})
    notes["0"] = _declared(model, "0", declared, 1)
    x = torch.randn(1, 8, 6, 6)
    path = tmp_path / "over.onnx"
    with caplog.at_level("WARNING"):
        vbxfx.export_onnx(model, x, path, annotations=notes)
    assert f"declares repeat {declared}, but its int8 weights fit repeat 1" in caplog.text
    check = vbxfx.check_onnx(path, torch_model=model, example_inputs=x, n_random=0)
    assert check.ok, str(check)                       # not wrong, but the MACs are the R=1 ones
    rows = {r.name: r for r in check.layers}
    assert (rows["0"].repeat, rows["0"].compiler_repeat) == (declared, 1)
    assert rows["0"].hw_macs == 16 * 8 * 9 * 16 * 2 // 8 and rows["0"].warnings
    assert len(check.warnings) == 1 and "the compiler will use R=1" in check.warnings[0]
    assert "warning: layer '0'" in str(check)
    assert check.to_dict()["warnings"] == check.warnings
    assert check.totals()["hw_macs"] == rows["0"].hw_macs + rows["2"].hw_macs


@pytest.mark.slow
@pytest.mark.parametrize("name, eligible_share, whole", [("resnet18", 0.66, 0.6613),
                                                         ("mobilenet_v2", 0.5, 0.468)])
def test_torchvision_figures_agree_and_match_an_independent_count(tmp_path, name, eligible_share,
                                                                   whole):
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    result = vbxfx.compress(model, x, eligible_share)
    report, totals = result.report, result.report["totals"]
    assert report["achieved_of_eligible"] >= eligible_share
    assert report["achieved"] == totals["macs_removed"] == pytest.approx(whole, abs=5e-4)
    plain, notes = vbxfx.finalize(result.model)
    counted = count_multiplies(plain, x, {n: a.repeat for n, a in notes.items()})
    assert (totals["macs"], totals["hw_macs_dense"], totals["hw_macs"]) == (
        counted.standard, counted.dense, counted.after)
    if name == "resnet18":
        assert (totals["macs"], totals["hw_macs_dense"]) == (1_814_073_344, 2_010_763_264)
    path = tmp_path / f"{name}.onnx"
    vbxfx.export_onnx(result.model, x, path)
    check = vbxfx.check_onnx(path, n_random=0).totals()
    assert (check["macs"], check["hw_macs_dense"], check["hw_macs"]) == (
        totals["macs"], totals["hw_macs_dense"], totals["hw_macs"])
