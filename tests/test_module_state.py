"""A compressed model survives what other tools do to it: EMA code iterating ``state_dict``,
``torch.jit.trace``, the TorchScript ONNX exporter, ``copy.deepcopy``, pickling, float16
checkpoints, and checkpoints written by vbxfx 0.1.0 (tests/data, made with that release)."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vbxfx
from vbxfx.format import encode_weight, weight_repeat
from vbxfx.modules import VBXConv2d, compressed_modules
from vbxfx.modules.pattern_code import pack_pattern, unpack_pattern

DATA = Path(__file__).parent / "data"


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    vbxfx.compress_vbx3(m, 0.66)
    return m


def _x() -> torch.Tensor:
    return torch.randn(4, 12, 4, 4, generator=torch.Generator().manual_seed(1))


def test_state_dict_holds_tensors_only():
    sd = _model().state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert not any(k.endswith("_extra_state") for k in sd)


def test_ultralytics_model_ema_updates_a_compressed_model():
    from ultralytics.utils.torch_utils import ModelEMA

    m = _model()
    ema = ModelEMA(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    for _ in range(3):
        F.mse_loss(m(_x()), torch.zeros(4, 10)).backward()
        opt.step()
        opt.zero_grad()
        ema.update(m)
    # the dense weights were averaged, the pattern buffers left alone
    for (name, live), (_, avg) in zip(compressed_modules(m), compressed_modules(ema.ema)):
        assert not torch.equal(live.weight, avg.weight), name
        assert torch.equal(live.mask, avg.mask)
        assert weight_repeat(avg.compressed_weight().detach()) <= avg.repeat


def test_state_counters_resume_through_state_dict():
    m = _model()
    m[0].train()
    for _ in range(5):
        m[0](torch.randn(1, 12, 4, 4))
    m[3].freeze()
    fresh = _model(seed=3)
    fresh.load_state_dict(m.state_dict())
    assert fresh[0]._vbx_steps == 5 and fresh[3].frozen and not fresh[0].frozen
    assert fresh[0].refresh_every == m[0].refresh_every and fresh[0].pairing
    for (_, a), (_, b) in zip(compressed_modules(m), compressed_modules(fresh)):
        assert torch.equal(a.pair_index, b.pair_index) and torch.equal(a.pair_sign, b.pair_sign)


def test_unstructured_state_roundtrip_keeps_compression():
    u = nn.Sequential(nn.Linear(300, 8))
    vbxfx.compress_vbx3_unstructured(u, 0.8)
    other = nn.Sequential(nn.Linear(300, 8))
    vbxfx.compress_vbx3_unstructured(other, 0.6)
    other.load_state_dict(u.state_dict())
    assert other[0].compression == pytest.approx(0.8)
    assert u[0].vbx_pattern.dtype == torch.int16          # 2*(300-1)+1 does not fit int8
    torch.testing.assert_close(other(torch.ones(2, 300)), u(torch.ones(2, 300)))


def test_loading_the_other_format_is_refused_with_a_reason():
    u = nn.Sequential(nn.Linear(64, 8))
    vbxfx.compress_vbx3_unstructured(u, 0.8)
    c = nn.Sequential(nn.Linear(64, 8))
    vbxfx.compress_vbx3(c, 0.5)
    with pytest.raises(RuntimeError, match="ucomp"):
        c.load_state_dict(u.state_dict())


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "torch.save", "half"])
def test_copies_compute_the_same(copier):
    m = _model().eval()
    x = _x()
    y = m(x)
    if copier == "deepcopy":
        c = copy.deepcopy(m)
    elif copier == "pickle":
        c = pickle.loads(pickle.dumps(m))
    else:
        buf = io.BytesIO()
        torch.save(m.half() if copier == "half" else m, buf)
        buf.seek(0)
        c = torch.load(buf, weights_only=False).float()
        m.float()
    out = c(x)
    if copier == "half":      # float16 weights: the format still holds, outputs close
        torch.testing.assert_close(out, y, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(out, y, rtol=0, atol=0)
    for (_, a), (_, b) in zip(compressed_modules(m), compressed_modules(c)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pair_index, b.pair_index)
        assert b.vbx_coef_a.dtype == b.weight.dtype
        assert weight_repeat(b.compressed_weight().detach()) <= b.repeat


def test_pickle_leaves_out_the_derived_buffers():
    conv = VBXConv2d.from_dense(nn.Conv2d(64, 64, 3), repeat=2)
    dense = nn.Conv2d(64, 64, 3)
    size = len(pickle.dumps(conv))
    assert size <= 1.2 * len(pickle.dumps(dense)), size       # half a byte per 4-byte weight
    state = conv.__getstate__()
    assert "mask" not in state["_buffers"] and "vbx_coef_a" not in state["_buffers"]
    assert "mask" in conv._buffers                            # the live layer is untouched


def test_torch_jit_trace_matches():
    m = _model().eval()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, x)
    torch.testing.assert_close(traced(x), m(x))
    m.train()                               # gradients on: the same graph is traced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(m, x, check_trace=True)


def test_torchscript_onnx_export_runs_in_onnxruntime(tmp_path):
    m = _model().eval()
    x = _x()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, m(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,fmt", [((8, 16, 3, 3), "comp"), ((5, 24), "comp"),
                                       ((3, 300), "ucomp"), ((4, 9, 1, 1), "ucomp")])
def test_pattern_code_roundtrip(shape, fmt):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fmt == "comp":
        w = vbxfx.project_weight(w, 2)
        enc = encode_weight(w, 2)
    else:
        enc = vbxfx.format.encode_unstructured(vbxfx.project_unstructured(w, 0.7))
    code = pack_pattern(enc.mask, enc.pair_index, enc.pair_sign, fmt)
    mask, index, sign = unpack_pattern(code, shape, fmt)
    assert torch.equal(mask, enc.mask) and torch.equal(index, enc.pair_index)
    assert torch.equal(sign, enc.pair_sign)


def test_pattern_code_rejects_a_bad_buffer():
    with pytest.raises(vbxfx.FormatError, match="does not fit"):
        unpack_pattern(torch.zeros(3, dtype=torch.uint8), (2, 8), "comp")


# ------------------------------------------------------------------ vbxfx 0.1.0 checkpoints
def _fresh_like_saved() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    vbxfx.compress_vbx3(m, 0.5)
    u = nn.Sequential(nn.Linear(40, 6))
    vbxfx.compress_vbx3_unstructured(u, 0.6)
    return m, u


def test_a_0_1_0_state_dict_still_loads():
    saved = torch.load(DATA / "vbxfx_0.1.0_state_dict.pt", weights_only=False)
    assert "0._extra_state" in saved["state_dict"]          # really the old layout
    m, u = _fresh_like_saved()
    m.load_state_dict(saved["state_dict"])
    u.load_state_dict(saved["u_state_dict"])
    m.eval()
    torch.testing.assert_close(m(saved["x"]), saved["y"])
    torch.testing.assert_close(u(saved["xu"]), saved["yu"])
    assert m[0]._vbx_steps == 3 and m[2].frozen and u[0].compression == pytest.approx(0.8)
    assert "0.vbx_pattern" in m.state_dict() and "0.mask" not in m.state_dict()


def test_a_0_1_0_pickled_model_still_loads():
    saved = torch.load(DATA / "vbxfx_0.1.0_modules.pt", weights_only=False)
    m, u = saved["model"], saved["u"]
    torch.testing.assert_close(m(saved["x"]), saved["y"])
    torch.testing.assert_close(u(saved["xu"]), saved["yu"])
    assert m[0]._vbx_steps == 3 and m[2].frozen
    assert set(m[0].state_dict()) == {"weight", "bias", "vbx_repeat", "vbx_pattern", "vbx_state"}
    again = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(again(saved["x"]), saved["y"])


def test_a_broken_0_1_0_state_names_the_layer():
    saved = torch.load(DATA / "vbxfx_0.1.0_state_dict.pt", weights_only=False)
    sd = dict(saved["state_dict"])
    sd["2._extra_state"] = {"version": 1}
    m, _ = _fresh_like_saved()
    with pytest.raises(RuntimeError, match=r"2: unreadable vbxfx 0.1.0 layer state"):
        m.load_state_dict(sd)


def test_copies_are_ready_to_trace():
    """A copy's derived buffers exist before any forward: an exporter tracing the copy right
    away sees constants, not the decoding ops."""
    m = _model().eval()
    x = _x()
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert "mask" in c[0]._buffers and "vbx_coef_a" in c[3]._buffers
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(c, (x,), buf, dynamo=False)
        import onnx

        proto = onnx.load_from_string(buf.getvalue())
        convs = [n for n in proto.graph.node if n.op_type == "Conv"]
        inits = {i.name for i in proto.graph.initializer}
        assert convs and all(n.input[1] in inits for n in convs)
        assert not any(n.op_type in ("NonZero", "ScatterND") for n in proto.graph.node)
