"""vbxfx.allocate / the Allocate pass on small models whose best allocation is known by hand."""

import json
import logging

import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.errors import ConfigError
from vbxfx.format import fits, project_weight
from vbxfx.meta import REPEAT_KEY, SENSITIVITY_KEY
from vbxfx.passes import Allocate, AnalyzeLayers
from vbxfx.allocation.sensitivity import layer_statistics


class TwoLayers(nn.Module):
    """Two 1x1 convolutions of equal cost; ``b`` already fits the 1:4 level exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(16, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # ineligible, stays dense
        self.b = nn.Conv2d(16, 16, 1)
        with torch.no_grad():
            self.b.weight.copy_(project_weight(self.b.weight, 1))

    def forward(self, x):
        return self.b(torch.relu(self.dw(self.a(x)))).mean((2, 3))


def _traced(model=None):
    model = model or TwoLayers()
    gm = vbxfx.trace(model, torch.randn(1, 16, 8, 8))
    AnalyzeLayers()(gm)
    return model, gm


def test_sensitive_layer_gets_the_mild_level():
    # equal MACs, target 0.625 = one layer at 1:4 and one at 2:4
    _, gm = _traced()
    given = {"a": {2: 1.0, 1: 50.0}, "b": {2: 1.0, 1: 2.0}}
    alloc = vbxfx.allocate(gm, 0.625, sensitivity=given)
    assert alloc.repeats == {"a": 2, "b": 1}
    assert alloc.achieved == 0.625 and alloc.exact and alloc.gap == 0
    assert alloc.total_sensitivity == 3.0
    given = {"a": {2: 1.0, 1: 2.0}, "b": {2: 1.0, 1: 50.0}}
    assert vbxfx.allocate(gm, 0.625, sensitivity=given).repeats == {"a": 1, "b": 2}


def test_weight_sensitivity_finds_the_layer_that_fits():
    _, gm = _traced()
    alloc = vbxfx.allocate(gm, 0.6)
    sens = {r.name: r.sensitivity for r in alloc.per_layer}
    assert sens["b"][1] == pytest.approx(0.0, abs=1e-12) and sens["a"][1] > sens["a"][2] > 0
    assert alloc.repeats == {"a": 2, "b": 1}


def test_output_and_eval_fn_sensitivity_restore_the_model_exactly():
    model, gm = _traced()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = torch.randn(4, 16, 8, 8)
    for kw in ({"sensitivity": "output", "calib_data": [x, (x, None)]},
               {"eval_fn": lambda m: -float(m(x).detach().square().mean())}):
        alloc = vbxfx.allocate(gm, 0.6, model=model, **kw)
        assert alloc.repeats == {"a": 2, "b": 1}
        assert alloc.per_layer[1].sensitivity[1] == pytest.approx(0.0, abs=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.a.training

    def broken(m):
        if not torch.equal(m.a.weight, before["a.weight"]):
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        vbxfx.allocate(gm, 0.6, model=model, eval_fn=broken)
    assert torch.equal(model.a.weight, before["a.weight"])


def test_budgets_and_range(caplog):
    _, gm = _traced()
    table = gm.meta["vbxfx.layer_table"]
    alloc = vbxfx.allocate(gm, 0.66)
    hw = {r.name: r.after for r in alloc.per_layer}
    assert sum(hw.values()) == table.hw_macs(alloc.repeats) - sum(
        l.macs for l in table if not l.eligible)
    assert alloc.achieved >= 0.66
    p = vbxfx.allocate(gm, 0.5, budget="params")
    assert p.repeats == {"a": 2, "b": 2} and p.achieved == 0.5
    assert vbxfx.allocate(gm, 0.75, budget="params").repeats == {"a": 1, "b": 1}
    with caplog.at_level(logging.WARNING):
        low = vbxfx.allocate(gm, 0.3)
    assert low.repeats == {"a": 2, "b": 2} and low.achieved == 0.5
    assert "achievable range is 0.5000 .. 0.7500" in caplog.text and "allow_dense" in caplog.text
    with pytest.raises(ConfigError, match=r"achievable range is 0\.5000 \.\. 0\.7500"):
        vbxfx.allocate(gm, 0.8)
    dense_ok = vbxfx.allocate(gm, 0.3, allow_dense=True)
    assert dense_ok.repeats == {"a": 4, "b": 1} and dense_ok.achieved == 0.375


def test_overrides_are_honoured_and_others_make_up(tmp_path, caplog):
    _, gm = _traced()
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"b": "dense"}))
    with pytest.raises(ConfigError,
                       match=r"and the overrides: the achievable range is 0\.2500 \.\. 0\.3750"):
        vbxfx.allocate(gm, 0.6, json_file=path)
    with pytest.raises(ConfigError, match=r"target"):
        vbxfx.allocate(gm, 1.0, json_file=path)
    alloc = vbxfx.allocate(gm, 0.3, json_file=path)
    assert alloc.repeats == {"a": 1, "b": 4}
    assert [r.overridden for r in alloc.per_layer] == [False, True]
    with caplog.at_level(logging.WARNING):
        alloc = vbxfx.allocate(gm, 0.6, overrides={"b": 0.66})
    assert alloc.repeats == {"a": 2, "b": 1} and "nearest level 0.75" in caplog.text
    assert alloc.achieved == 0.625  # above the target: the override alone goes past it
    assert vbxfx.allocate(gm, 0.6, overrides={"a": 0.75}).repeats == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match=r"'aa' \(closest: \['a'\]\)"):
        vbxfx.allocate(gm, 0.6, overrides={"aa": 0.5})
    with pytest.raises(ConfigError, match="nope.json"):
        vbxfx.allocate(gm, 0.6, json_file=tmp_path / "nope.json")


def test_pass_writes_meta():
    _, gm = _traced()
    result = Allocate(0.6)(gm)
    assert result.modified is False and isinstance(result.details, vbxfx.Allocation)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert nodes["a"].meta[REPEAT_KEY] == 2 and nodes["b"].meta[REPEAT_KEY] == 1
    assert nodes["dw"].meta[REPEAT_KEY] == 4 and SENSITIVITY_KEY not in nodes["dw"].meta
    assert set(nodes["a"].meta[SENSITIVITY_KEY]) == {1, 2}
    gm.graph.lint()
    with pytest.raises(ConfigError, match="target"):
        Allocate(1.5)
    with pytest.raises(ConfigError, match="unknown option"):
        Allocate(0.6, budjet="macs")
    fresh = vbxfx.trace(TwoLayers(), torch.randn(1, 16, 8, 8))
    with pytest.raises(ConfigError, match="run vbxfx.passes.AnalyzeLayers"):
        Allocate(0.6)(fresh)


def test_ucomp_mode():
    _, gm = _traced()
    alloc = vbxfx.allocate(gm, 0.7, fmt="ucomp")
    assert alloc.repeats == {} and set(alloc.compressions) == {"a", "b"}
    assert alloc.achieved >= 0.7 and alloc.exact
    assert all(c in vbxfx.passes.allocate.UCOMP_GRID for c in alloc.compressions.values())
    fixed = vbxfx.allocate(gm, 0.7, fmt="ucomp", overrides={"a": 0.55})
    assert fixed.compressions["a"] == 0.55 and fixed.compressions["b"] >= 0.85


def test_option_errors():
    model, gm = _traced()
    table = gm.meta["vbxfx.layer_table"]
    with pytest.raises(ConfigError, match="budget"):
        vbxfx.allocate(gm, 0.6, budget="flops")
    with pytest.raises(ConfigError, match="calib_data"):
        vbxfx.allocate(gm, 0.6, sensitivity="output")
    with pytest.raises(ConfigError, match="weights"):
        vbxfx.allocate(table, 0.6)
    with pytest.raises(ConfigError, match="layer 'b'"):
        vbxfx.allocate(gm, 0.6, sensitivity={"a": {1: 1.0, 2: 0.5}})
    with pytest.raises(ConfigError, match="GraphModule or a LayerTable"):
        vbxfx.allocate(model, 0.6)
    assert vbxfx.allocate(table, 0.6, model=model).repeats == {"a": 2, "b": 1}


def test_report_and_serialisation():
    _, gm = _traced()
    alloc = vbxfx.allocate(gm, 0.6)
    text = str(alloc)
    assert "sens@R1" in text and "achieved 0.6250" in text and "(exact)" in text
    d = json.loads(json.dumps(alloc.to_dict()))
    assert d["repeats"] == {"a": 2, "b": 1} and d["gap"] == 0
    assert alloc.as_overrides() == {"a": 0.5, "b": 0.75}
    assert vbxfx.allocate(gm, 0.6, overrides=alloc.as_overrides()).repeats == alloc.repeats


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.branch = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        with torch.no_grad():
            for bn in (self.stem[1], self.branch[1], self.branch[4]):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.stem(x)
        return x + self.branch(x)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_batchnorm_statistics(frontend):
    model = Residual().eval()
    gm = vbxfx.trace(model, torch.randn(1, 8, 4, 4), frontend=frontend)
    AnalyzeLayers()(gm)
    stats = layer_statistics(gm)
    bn = model.branch[4]
    e_branch = float((bn.weight ** 2 + bn.bias ** 2).sum().detach())
    assert stats["branch.3"].out_energy == pytest.approx(e_branch)
    assert stats["branch.3"].out_gain == pytest.approx(
        bn.weight.detach() ** 2 / (bn.running_var + bn.eps))
    assert 0 < stats["branch.0"].share == stats["branch.3"].share < 1
    assert stats["stem.0"].share == 1.0 and stats["stem.0"].in_var is None
    # input of branch.0 = ReLU6(BN(stem)): mean between 0 and 6, variance below gamma²
    assert (stats["branch.0"].in_mean >= 0).all()
    assert (stats["branch.0"].in_var <= model.stem[1].weight.detach() ** 2 + 1e-6).all()
    # the skip's energy is the stem output's (after ReLU6), the branch's its last BN
    e_skip = float((stats["branch.0"].in_var + stats["branch.0"].in_mean ** 2).sum())
    assert stats["branch.3"].share == pytest.approx(e_branch / (e_branch + e_skip), rel=1e-5)
