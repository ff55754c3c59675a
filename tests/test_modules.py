"""VBXConv2d / VBXLinear: forward, gradient, format fit, AMP, state, refresh, freeze, to_dense."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vbxfx.errors import ConfigError, FormatError
from vbxfx.format import (apply_encoding, encode_weight, project_unstructured, project_weight,
                          unstructured_macs, weight_repeat)
from vbxfx.modules import (VBXConv2d, VBXLinear, freeze_patterns, is_compressed,
                           refresh_patterns)


def _conv(seed=0, cin=16, cout=8, k=3, bias=True):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, padding=1, bias=bias)


def _fits(m) -> bool:
    w = m.compressed_weight().detach()
    if m.fmt == "comp":
        return weight_repeat(w) <= m.repeat
    return unstructured_macs(w) <= round((1 - m.compression) * w.numel())


@pytest.mark.parametrize("repeat", [1, 2])
def test_conv_forward_is_conv_with_compressed_weight(repeat):
    conv = _conv()
    m = VBXConv2d.from_dense(conv, repeat=repeat)
    x = torch.randn(2, 16, 6, 6)
    w = m.compressed_weight().detach()
    torch.testing.assert_close(m(x), F.conv2d(x, w, m.bias, padding=1))
    # the first pattern is the kernel's exact projection of the dense weight
    torch.testing.assert_close(w, project_weight(conv.weight.detach(), repeat))
    assert weight_repeat(w) <= repeat and _fits(m)
    assert isinstance(m, nn.Conv2d) and is_compressed(m) and not is_compressed(conv)
    assert m.fmt == "comp" and m.repeat == repeat and int(m.vbx_repeat) == repeat


def test_linear_forward_and_ucomp():
    torch.manual_seed(1)
    fc = nn.Linear(40, 12)
    x = torch.randn(5, 40)
    m = VBXLinear.from_dense(fc, repeat=1)
    torch.testing.assert_close(m(x), F.linear(x, m.compressed_weight().detach(), m.bias))
    assert weight_repeat(m.compressed_weight()) == 1
    u = VBXLinear.from_dense(nn.Linear(40, 12), fmt="ucomp", compression=0.7)
    assert u.fmt == "ucomp" and u.repeat == 0 and int(u.vbx_repeat) == 0
    assert u.encoding().format == "ucomp" and _fits(u)
    torch.testing.assert_close(u.compressed_weight().detach(),
                               project_unstructured(u.weight.detach(), 0.7))
    torch.testing.assert_close(u(x), F.linear(x, u.compressed_weight().detach(), u.bias))


def test_buffers_and_encoding():
    m = VBXConv2d.from_dense(_conv(), repeat=2)
    enc = m.encoding()
    assert m.mask.dtype == torch.bool and m.pair_index.dtype == torch.int64
    assert m.pair_sign.dtype == torch.int8 and m.vbx_repeat.dtype == torch.int64
    assert m.vbx_repeat.dim() == 0
    assert torch.equal(enc.mask, m.compressed_weight().detach() != 0)
    expected = encode_weight(m.compressed_weight().detach(), 2)
    assert torch.equal(enc.pair_index, expected.pair_index)
    assert torch.equal(enc.pair_sign, expected.pair_sign)
    assert 0.0 < enc.paired_fraction <= 1.0
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "vbx_repeat", "vbx_pattern", "vbx_state"}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["vbx_pattern"].dtype == torch.uint8 and sd["vbx_pattern"].numel() * 2 >= m.weight.numel()


def test_gradient_reaches_dense_weight_exactly():
    m = VBXConv2d.from_dense(_conv(), repeat=2)
    x = torch.randn(2, 16, 6, 6)
    g = torch.randn(2, 8, 6, 6)
    m(x).backward(g)
    cw = m.compressed_weight().detach().requires_grad_()
    F.conv2d(x, cw, m.bias, padding=1).backward(g)
    # the exact gradient through the (linear, self-adjoint) projection: P(dL/dW_c)
    torch.testing.assert_close(m.weight.grad, apply_encoding(cw.grad, m.encoding()))
    assert bool((m.weight.grad[~m.mask] == 0).all()) and m.weight.grad.abs().sum() > 0
    assert m.bias.grad is not None


def test_projection_gradcheck():
    from vbxfx.modules.mixin import _PatternProjection

    m = VBXLinear.from_dense(nn.Linear(16, 4), repeat=2)
    a, b, idx = m.vbx_coef_a.double(), m.vbx_coef_b.double(), m.vbx_gather_index
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    fn = lambda w: _PatternProjection.apply(w, a, b, idx)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,))
    assert torch.autograd.gradgradcheck(fn, (w,))


def test_fits_at_every_step_with_refresh():
    m = VBXConv2d.from_dense(_conv(), repeat=1, refresh_every=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4, 16, 6, 6)
    masks = []
    for _ in range(7):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        masks.append(m.mask.clone())
        assert _fits(m)
    assert any(not torch.equal(masks[0], mk) for mk in masks[1:])  # it did refresh


def test_refresh_counter_and_policy():
    m = VBXLinear.from_dense(nn.Linear(16, 8), repeat=2, refresh_every=3)
    x = torch.randn(2, 16)
    with torch.no_grad():
        for _ in range(5):
            m(x)  # no grad: not counted
    m.eval()
    m(x)      # eval: not counted
    m.train()
    assert m._vbx_steps == 0
    for step in range(1, 4):
        m(x)
        assert m._vbx_steps == step
    with torch.no_grad():
        m.weight.mul_(-1).add_(torch.randn_like(m.weight))
    m(x)      # the 4th counted forward sees a refreshed pattern
    assert m._vbx_steps == 1
    expected = project_weight(m.weight.detach(), 2)
    torch.testing.assert_close(m.compressed_weight().detach(), expected)


def test_refresh_pattern_and_fixed_pattern():
    m = VBXConv2d.from_dense(_conv(), repeat=2, refresh_every=None)
    before = m.mask.clone()
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))
    for _ in range(3):
        m(torch.randn(1, 16, 4, 4)).sum().backward()
    assert torch.equal(m.mask, before)        # fixed: never refreshed
    m.refresh_pattern()
    torch.testing.assert_close(m.compressed_weight().detach(), project_weight(m.weight.detach(), 2))
    assert not torch.equal(m.mask, before)


def test_freeze():
    m = VBXLinear.from_dense(nn.Linear(16, 8), repeat=2, refresh_every=1)
    m.freeze()
    assert m.frozen and m.refresh_every is None
    before = m.mask.clone()
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))
    m(torch.randn(2, 16)).sum().backward()
    m(torch.randn(2, 16)).sum().backward()
    assert torch.equal(m.mask, before)
    with pytest.raises(ConfigError, match="frozen"):
        m.refresh_pattern()
    other = VBXLinear.from_dense(nn.Linear(16, 8), repeat=2, refresh_every=1)
    other.load_state_dict(m.state_dict())
    assert other.frozen  # frozen travels with the state_dict
    model = nn.Sequential(VBXLinear.from_dense(nn.Linear(16, 8)), nn.ReLU(),
                          VBXLinear.from_dense(nn.Linear(8, 8)))
    assert refresh_patterns(model) == 2 and freeze_patterns(model) == 2
    assert refresh_patterns(model) == 0


def test_amp_autocast_bfloat16():
    m = VBXConv2d.from_dense(_conv(), repeat=2)
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.dtype == torch.float32
    assert bool((m.weight.grad[~m.mask] == 0).all())
    torch.testing.assert_close(y.float(), m(x).detach(), atol=0.1, rtol=0.05)
    assert _fits(m)


def test_state_dict_roundtrip():
    m = VBXConv2d.from_dense(_conv(0), repeat=1, refresh_every=7)
    m._vbx_steps = 5
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = VBXConv2d.from_dense(_conv(1), repeat=2, refresh_every=None)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.repeat == 1 and other.refresh_every == 7 and other._vbx_steps == 5
    for name in ("weight", "bias", "mask", "pair_index", "pair_sign", "vbx_repeat"):
        assert torch.equal(getattr(other, name), getattr(m, name)), name
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(other(x), m(x))


def test_load_rejects_asymmetric_pairs():
    m = VBXLinear.from_dense(nn.Linear(16, 8), repeat=2)
    sd = m.state_dict()
    first = int((m.pair_index.reshape(-1) >= 0).nonzero()[0, 0])
    code = sd["vbx_pattern"]
    keep = code[first // 2] & (0xF0 if first % 2 == 0 else 0x0F)
    code[first // 2] = keep | (1 << (4 * (first % 2)))   # "kept, unpaired"; its partner still points at it
    with pytest.raises(RuntimeError, match="not symmetric"):
        VBXLinear.from_dense(nn.Linear(16, 8), repeat=2).load_state_dict(sd)


def _net(seed, refresh_every):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 16, 10))
    net[0] = VBXConv2d.from_dense(net[0], repeat=1, refresh_every=refresh_every)
    net[3] = VBXLinear.from_dense(net[3], repeat=2, refresh_every=refresh_every)
    return net


def test_resume_is_bit_identical():
    torch.manual_seed(0)
    data = [(torch.randn(4, 8, 4, 4), torch.randint(0, 10, (4,))) for _ in range(9)]

    def train(net, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

    net = _net(0, refresh_every=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    train(net, opt, data[:4])                       # 4 steps: one refresh behind us
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    assert net[0]._vbx_steps == 1
    train(net, opt, data[4:])                       # crosses two more refreshes
    probe = torch.randn(3, 8, 4, 4)
    expected = net(probe)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = _net(1, refresh_every=3)              # other weights and patterns at first
    resumed.load_state_dict(ckpt["model"])
    assert resumed[0]._vbx_steps == 1
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[4:])
    assert torch.equal(resumed(probe), expected)
    assert torch.equal(resumed[0].mask, net[0].mask)


def test_to_dense():
    m = VBXConv2d.from_dense(_conv(), repeat=2).double().eval()
    m.weight.requires_grad_(False)
    plain = m.to_dense()
    assert type(plain) is nn.Conv2d and not plain.training
    assert plain.weight.dtype == torch.float64 and not plain.weight.requires_grad
    assert torch.equal(plain.weight, m.compressed_weight())
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(plain(x), m(x))
    fc = VBXLinear.from_dense(nn.Linear(16, 4, bias=False), fmt="ucomp", compression=0.6)
    plain_fc = fc.to_dense()
    assert type(plain_fc) is nn.Linear and plain_fc.bias is None
    assert torch.equal(plain_fc.weight, fc.compressed_weight().detach())


def test_from_dense_shares_parameters_and_keeps_hooks():
    conv = _conv()
    conv.eval()
    conv.custom_flag = "kept"
    calls = []
    conv.register_forward_hook(lambda mod, i, o: calls.append("fwd"))
    conv.register_forward_pre_hook(lambda mod, i: calls.append("pre"))
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)   # built before the swap
    m = VBXConv2d.from_dense(conv, repeat=2)
    assert m.weight is conv.weight and m.bias is conv.bias
    assert not m.training and m.custom_flag == "kept"
    m.train()
    m(torch.randn(1, 16, 4, 4)).sum().backward()
    assert calls == ["pre", "fwd"]
    before = conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(conv.weight, before)
    again = VBXConv2d.from_dense(m, repeat=1)          # re-compression from the dense weight
    assert type(again) is VBXConv2d and again.weight is m.weight and again.repeat == 1
    torch.testing.assert_close(again.compressed_weight().detach(),
                               project_weight(m.weight.detach(), 1))


def test_pairing_false_is_plain_magnitude_mask():
    m = VBXConv2d.from_dense(_conv(), repeat=2, pairing=False, refresh_every=None)
    assert int((m.pair_index >= 0).sum()) == 0 and not m._vbx_paired
    torch.testing.assert_close(m.compressed_weight().detach(),
                               project_weight(m.weight.detach(), 2, pairing=False))
    assert _fits(m)


def test_direct_construction_and_copy():
    m = VBXConv2d(16, 8, 3, repeat=1, refresh_every=None)
    assert m.repeat == 1 and _fits(m)
    dup = copy.deepcopy(m)
    x = torch.randn(1, 16, 5, 5)
    assert torch.equal(dup(x), m(x))


def test_bad_input():
    with pytest.raises(ConfigError, match="depthwise"):
        VBXConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ConfigError, match="repeat must be 2"):
        VBXConv2d.from_dense(_conv(), repeat=4)
    with pytest.raises(ConfigError, match="needs compression"):
        VBXLinear.from_dense(nn.Linear(8, 8), fmt="ucomp")
    with pytest.raises(ConfigError, match="does not apply"):
        VBXLinear.from_dense(nn.Linear(8, 8), repeat=2, fmt="ucomp", compression=0.5)
    with pytest.raises(ConfigError, match="fmt must be"):
        VBXLinear.from_dense(nn.Linear(8, 8), fmt="dense")
    with pytest.raises(ConfigError, match="refresh_every"):
        VBXLinear.from_dense(nn.Linear(8, 8), refresh_every=0)
    with pytest.raises(ConfigError, match="takes an nn.Linear"):
        VBXLinear.from_dense(nn.Conv2d(8, 8, 1))
    with pytest.raises(ConfigError, match="fits only repeat 4"):
        VBXLinear.from_dense(nn.Linear(8, 8), repeat=None)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ConfigError, match="overrides"):
        VBXLinear.from_dense(Scaled(8, 8))
    fc = nn.Linear(8, 8)
    with torch.no_grad():
        fc.weight[0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        VBXLinear.from_dense(fc)


def test_repeat_none_takes_the_fitting_repeat():
    fc = nn.Linear(16, 4)
    with torch.no_grad():
        fc.weight.copy_(project_weight(fc.weight, 1))
    assert VBXLinear.from_dense(fc, repeat=None).repeat == 1
