"""The refit's parts: sampled rows, OBS inside the format, the sequential (side-by-side) run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vbxfx
import vbxfx.inputs.demo
import vbxfx.modules
from vbxfx.errors import ConfigError
from vbxfx.format import encode_weight, project_weight, require_fit
from vbxfx.modules import VBXLinear
from vbxfx.refit.obs import obs_project
from vbxfx.refit.rows import Problem, input_rows, output_rows, sample_positions
from vbxfx.refit.solve import damped, relative_error, solve_dense, solve_in_pattern

from test_reconstruct import _pattern_basis


@pytest.mark.parametrize("conv", [
    nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=6),
    nn.Conv2d(5, 4, 1), nn.Conv2d(3, 4, (3, 2), padding=(2, 1), dilation=2, stride=(1, 2))],
    ids=["strided", "depthwise", "1x1", "dilated"])
def test_sampled_rows_are_the_unfolded_patches(conv):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, conv.in_channels, 11, 9)
    y = conv(x).detach()
    pos = sample_positions(conv, y.shape, 20, gen)
    ho, wo = y.shape[2:]
    assert 0 < len(pos) < 3 * ho                     # whole output lines, a subset of them
    rows = input_rows(conv, x, (ho, wo), pos)
    flat = ((pos // ho)[:, None] * ho * wo + (pos % ho)[:, None] * wo + torch.arange(wo)).reshape(-1)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)
    ref = cols.transpose(1, 2).reshape(-1, cols.shape[1])[flat]
    if conv.groups > 1:
        ref = ref.view(-1, conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1])
        ref = ref.transpose(0, 1)
    torch.testing.assert_close(rows, ref)
    out = output_rows(conv, y, pos)
    torch.testing.assert_close(out, y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])[flat])
    if conv.groups == 1:
        torch.testing.assert_close(out, rows @ conv.weight.detach().reshape(conv.out_channels, -1).T
                                   + conv.bias.detach())


def _problem(o: int, k: int, seed: int, n: int = 6000) -> tuple[Problem, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(n, k, generator=g) @ mix) * (0.2 + 2 * torch.rand(k, generator=g)) + 0.3
    w = torch.randn(o, k, generator=g)
    b = 0.1 * torch.randn(o, generator=g)
    p = Problem(k, o, torch.device("cpu"))
    p.add(x, x @ w.T + b)
    return p, torch.cat([w, b[:, None]], 1).double()


@pytest.mark.parametrize("repeat", [2, 1])
def test_obs_pattern_beats_the_projection_pattern_after_the_refit(repeat):
    p, dense = _problem(24, 64, seed=repeat)
    w = dense[:, :-1].float()
    h, _ = damped(p, 0.0)
    chosen = obs_project(solve_dense(p, dense, 0.0), h, w.shape, repeat)
    require_fit(chosen[:, :-1].float(), repeat, what="obs")
    keep = project_weight(w, repeat)
    start = torch.cat([keep.double(), dense[:, -1:]], 1)
    err_keep = relative_error(solve_in_pattern(encode_weight(keep, repeat), p, dense, start,
                                               300, 0.0), p)
    refit = solve_in_pattern(encode_weight(chosen[:, :-1].float(), repeat), p, dense, chosen,
                             300, 0.0)
    err_obs = relative_error(refit, p)
    assert err_obs < 0.9 * err_keep, (err_obs, err_keep)
    require_fit(refit[:, :-1].float(), repeat, what="obs refit")


def test_obs_leaves_the_free_bias_at_its_optimum():
    # the bias is visited last and never pruned: each compensation keeps the columns not yet
    # visited optimal given the fixed ones, so the final bias is the least-squares bias
    p, dense = _problem(8, 24, seed=5)
    h, _ = damped(p, 0.0)
    out = obs_project(dense, h, torch.Size([8, 24]), 1)
    hh, g = p.h / p.n, p.g / p.n
    w = out[:, :-1]
    best_b = (g[:, -1] - w @ hh[:-1, -1]) / hh[-1, -1]
    torch.testing.assert_close(out[:, -1], best_b, rtol=1e-4, atol=1e-6)


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _chain_at_1_of_4() -> tuple[_Chain, nn.Module]:
    """A dense two-layer chain and a copy with both layers at 1:4."""
    dense = _Chain()
    model = copy.deepcopy(dense)
    model.a = VBXLinear.from_dense(model.a, repeat=1)
    model.b = VBXLinear.from_dense(model.b, repeat=1)
    return dense, model


def _lstsq_in_pattern(layer: VBXLinear, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Reference: least squares over a basis of the layer's pattern, bias free (numpy)."""
    o, k = layer.weight.shape
    u, s, _ = np.linalg.svd(_pattern_basis(layer))
    span = u[:, s > 0.5]
    design = np.zeros((len(x) * o, span.shape[1] + o))
    for r in range(o):
        design[r::o, :span.shape[1]] = x @ span[r * k:(r + 1) * k, :]
        design[r::o, span.shape[1] + r] = 1.0
    coef, *_ = np.linalg.lstsq(design, target.reshape(-1), rcond=None)
    return (span @ coef[:span.shape[1]]).reshape(o, k)


def test_sequential_refit_fits_each_layer_to_the_compressed_inputs():
    dense, model = _chain_at_1_of_4()
    x = torch.randn(600, 16)
    res = vbxfx.reconstruct(model, dense, x, pattern="keep", iters=300, damp=0.0,
                            max_rows=10_000)
    assert res.method == "sequential" and [r.name for r in res.layers] == ["a", "b"]
    with torch.no_grad():
        h_c = torch.relu(model.a(x)).double().numpy()        # what b sees once a is refit
        target = dense(x).double().numpy()
    np.testing.assert_allclose(model.b.compressed_weight().detach().double().numpy(),
                               _lstsq_in_pattern(model.b, h_c, target), rtol=1e-3, atol=1e-4)
    local = copy.deepcopy(dense)
    local.a = VBXLinear.from_dense(local.a, repeat=1)
    local.b = VBXLinear.from_dense(local.b, repeat=1)
    vbxfx.reconstruct(local, dense, x, method="local", pattern="keep", iters=300, damp=0.0)
    with torch.no_grad():
        err_seq = float((model(x) - dense(x)).square().mean())
        err_local = float((local(x) - dense(x)).square().mean())
    assert err_seq < err_local


class _Flat(nn.Module):
    """``view`` on a convolution's output: fails on channels-last tensors (retried)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 8 * 8, 5)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(y.view(y.shape[0], -1))


def test_sequential_run_handles_views_reports_progress_and_refits_depthwise():
    dense = _Flat().eval()
    x = torch.randn(32, 3, 8, 8)
    result = vbxfx.compress(dense, x[:1], compression=0.5, reconstruct=False)
    calls = []
    res = vbxfx.reconstruct(result.model, dense, x.split(16), dense_layers=True,
                            progress=lambda *a: calls.append(a))
    assert res.method == "sequential"
    assert [c[2] for c in calls] == ["conv", "dw", "fc"]
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert [r.dense for r in res.layers] == [False, True, False]
    for name in ("conv", "fc"):
        layer = result.model.get_submodule(name)
        require_fit(layer.compressed_weight().detach(), layer.repeat, what=name)
    with torch.no_grad():
        assert float((result.model(x) - dense(x)).square().mean()) < \
            float((vbxfx.compress(dense, x[:1], compression=0.5).model(x)
                   - dense(x)).square().mean())


class _BranchyChain(_Chain):
    """The chain behind data-dependent control flow: does not trace symbolically."""

    def forward(self, x):
        if x.sum() > 1e9:
            return x[:, :8]
        return super().forward(x)


def test_untraceable_model_gets_the_sequential_refit_by_hooks():
    """The hooks give each layer the problem the graph walk gives it: same refit weights."""
    dense, graph_model = _chain_at_1_of_4()
    branchy = _BranchyChain()
    branchy.load_state_dict(dense.state_dict())
    hooked = copy.deepcopy(branchy)
    hooked.a, hooked.b = copy.deepcopy(graph_model.a), copy.deepcopy(graph_model.b)
    x = torch.randn(600, 16)
    batches = list(x.split(200))
    calls = []
    by_graph = vbxfx.reconstruct(graph_model, dense, batches, pattern="keep", iters=300,
                                 damp=0.0)
    by_hooks = vbxfx.reconstruct(hooked, branchy, batches, pattern="keep", iters=300, damp=0.0,
                                 progress=lambda *a: calls.append(a))
    small = copy.deepcopy(branchy)       # targets kept for one layer at a time: same weights
    small.a, small.b = copy.deepcopy(graph_model.a), copy.deepcopy(graph_model.b)
    vbxfx.reconstruct(small, branchy, batches, pattern="keep", iters=300, damp=0.0,
                      max_stats_bytes=1)
    assert by_graph.method == by_hooks.method == "sequential"
    assert [r.name for r in by_hooks.layers] == ["a", "b"] and calls == [(1, 2, "a"),
                                                                        (2, 2, "b")]
    # the order, one dense forward per batch for both targets, a partial one per layer
    assert by_hooks.forwards == 1 + len(batches) + 2 * len(batches)
    for name in ("a", "b"):
        torch.testing.assert_close(hooked.get_submodule(name).compressed_weight(),
                                   graph_model.get_submodule(name).compressed_weight(),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(small.get_submodule(name).compressed_weight(),
                                   hooked.get_submodule(name).compressed_weight())
        assert by_hooks.layers[0].error_after < by_hooks.layers[0].error_before
    with torch.no_grad():   # b fit to what the refit a gives it, not to the dense a's output
        h_c = torch.relu(hooked.a(x)).double().numpy()
        target = dense(x).double().numpy()
    np.testing.assert_allclose(hooked.b.compressed_weight().detach().double().numpy(),
                               _lstsq_in_pattern(hooked.b, h_c, target), rtol=1e-3, atol=1e-4)


class _FailsAfterA(_BranchyChain):
    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] == 7:
            raise ValueError("this model takes no batch of 7")
        return self.b(h)


def test_refit_by_hooks_failing_midway_leaves_the_model_unchanged():
    dense = _FailsAfterA()
    model = copy.deepcopy(dense)
    model.a = VBXLinear.from_dense(model.a, repeat=1)
    model.b = VBXLinear.from_dense(model.b, repeat=1)
    state = copy.deepcopy(model.state_dict())
    # the second batch runs through a (refit already), then fails before b
    with pytest.raises(ConfigError, match="calibration batch 1 failed.*batch of 7"):
        vbxfx.reconstruct(model, dense, [torch.randn(8, 16), torch.randn(7, 16)])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_a_batch_failing_midway_leaves_the_model_unchanged():
    dense = _Flat().eval()
    model = vbxfx.compress(dense, torch.randn(1, 3, 8, 8), compression=0.5).model
    state = copy.deepcopy(model.state_dict())
    # the second batch runs through the convolutions, then fails at the Linear
    with pytest.raises(ConfigError, match="calibration batch 1 failed.*fc"):
        vbxfx.reconstruct(model, dense, [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 9, 9)])
    assert model.conv.bias is not None and model.fc.bias is not None   # they had biases
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    with pytest.raises(ConfigError, match="pattern must be one of"):
        vbxfx.reconstruct(model, dense, torch.randn(4, 3, 8, 8), pattern="magic")
    with pytest.raises(ConfigError, match="method must be one of"):
        vbxfx.reconstruct(model, dense, torch.randn(4, 3, 8, 8), method="global")
    with pytest.raises(ConfigError, match="progress must be"):
        vbxfx.reconstruct(model, dense, torch.randn(4, 3, 8, 8), progress=3)


def test_refit_sensitivity_is_the_error_left_after_the_refit():
    from vbxfx.refit.layer import weight_and_bias
    from vbxfx.refit.local import local_problems
    from vbxfx.refit.sensitivity import channel_errors, refit_sensitivity

    dense = _Chain().eval()
    x = torch.randn(400, 16) * torch.linspace(0.2, 3.0, 16)
    targets = {n: weight_and_bias(dense.get_submodule(n)) for n in ("a", "b")}
    problems, forwards = local_problems(dense, targets, [(x[:200],), (x[200:],)])
    assert forwards == 1 and problems["a"].n == 400
    layers = {n: dense.get_submodule(n) for n in targets}
    sens = refit_sensitivity(layers, problems, {"a": (4, 2, 1), "b": (2, 1)}, {},
                             pattern="keep", damp=0.0)
    assert sens["a"][4] == 0.0
    for n in ("a", "b"):
        assert 0 < sens[n][2] < sens[n][1] < 1
        # no stats: the ratio is relative to the output energy; the refit leaves less error
        # than the projection with the dense bias (a point of the same pattern)
        p = problems[n]
        w = layers[n].weight.detach()
        proj = torch.cat([project_weight(w, 1).double(), targets[n][:, -1:]], 1)
        h = p.h / p.n
        projected = float(channel_errors(proj, targets[n], h).sum())
        signal = float(channel_errors(targets[n], torch.zeros_like(targets[n]), h).sum())
        assert sens[n][1] < projected / signal


def test_plain_masks_stay_plain_after_the_obs_refit():
    dense = vbxfx.inputs.demo.DemoNet()
    x = torch.randn(16, 3, 64, 64)
    result = vbxfx.compress(dense, x[:1], compression=0.66, calib_data=x.split(8),
                            pairing=False)
    for name, layer in vbxfx.modules.compressed_modules(result.model):
        assert not bool((layer.pair_index >= 0).any()), name
        w = layer.compressed_weight().detach()
        require_fit(w, layer.repeat, what=name)
        nz = (w != 0).reshape(w.shape[0], w.shape[1], -1).float()
        # plain N:4: at most `repeat` nonzeros in every 4 consecutive input channels
        if w.shape[1] % 4 == 0:
            groups = nz.transpose(1, 2).reshape(-1, 4).sum(1)
            assert int(groups.max()) <= layer.repeat, name


def test_variance_match_restores_each_channels_spread():
    dense, model = _chain_at_1_of_4()
    x = torch.randn(800, 16)
    vbxfx.reconstruct(model, dense, x, variance_match=True, max_rows=10_000)
    with torch.no_grad():
        y, t = model(x), dense(x)
    torch.testing.assert_close(y.var(0), t.var(0), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(y.mean(0), t.mean(0), rtol=1e-3, atol=1e-4)
    for layer in (model.a, model.b):
        require_fit(layer.compressed_weight().detach(), 1, what="scaled")


@pytest.mark.parametrize("zero_pruned", [True, False])
def test_pruned_weights_zeroed_or_kept_and_what_a_refresh_does(zero_pruned):
    dense = vbxfx.inputs.demo.DemoNet()
    x = torch.randn(16, 3, 64, 64)
    model = vbxfx.compress(dense, x[:1], compression=0.66, reconstruct=False).model
    vbxfx.reconstruct(model, dense, x.split(8), zero_pruned=zero_pruned)
    changed = 0
    for name, layer in vbxfx.modules.compressed_modules(model):
        w = layer.weight.detach().clone()
        before = layer.compressed_weight().detach().clone()
        pruned = ~layer.mask
        if zero_pruned:
            assert bool((w[pruned] == 0).all()), name
        else:
            torch.testing.assert_close(w[pruned], dense.get_submodule(name).weight.detach()[pruned])
        layer.refresh_pattern()
        after = layer.compressed_weight().detach()
        if zero_pruned:            # the refit pattern and values survive a refresh
            torch.testing.assert_close(after, before, rtol=0, atol=0)
        changed += int(not torch.equal(after, before))
    if not zero_pruned:            # the dense values come back and the OBS patterns go
        assert changed > 0


class _DeadInput(nn.Module):
    """``b`` sees only zeros on any data (its input is multiplied by 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * 0.0) + self.a(x)


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_a_layer_whose_inputs_are_all_zero_does_not_stop_the_refit(damp):
    dense = _DeadInput().eval()
    x = torch.randn(8, 16, 16, 16)
    result = vbxfx.compress(dense, x[:1], compression=0.5, calib_data=x,
                            reconstruct={"damp": damp})
    refit = result.report["reconstruct"]
    assert refit["layers"] == 2
    err_a = refit["output_error"]["a"]
    assert err_a[1] < err_a[0]
    for name in ("a", "b"):
        require_fit(result.model.get_submodule(name).compressed_weight().detach(), 2)


def test_calibration_data_with_nan_is_refused_before_any_work():
    dense = vbxfx.inputs.demo.DemoNet().eval()
    x = torch.randn(8, 3, 64, 64)
    x[3, 1, 2, 2] = float("inf")
    with pytest.raises(ConfigError, match=r"calib_data batch 1 holds 1 NaN or infinite"):
        vbxfx.compress(dense, x[:1], compression=0.5, calib_data=x.split(2))
