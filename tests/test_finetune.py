"""Fine-tuning compressed models on a real task: scikit-learn's digits (8x8 images).

A small CNN is trained dense to >= 95 %, compressed at 0.66 of its hardware MACs with
vbxfx.compress and fine-tuned two epochs; every compressed weight is checked against the
format kernel after every optimizer step. The same schedule with plain magnitude masks
(pairing=False, fixed mask, the same per-layer repeats) is the baseline; ``pytest -s``
prints both accuracies. Also: the seed two-line workflow with an optimizer built before
compressing, nn.DataParallel, torch.compile.
"""

import copy
import os
import sys
import time

import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.format import require_fit, unstructured_macs
from vbxfx.modules import compressed_modules

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools"))
import digits_task  # noqa: E402  (tools/digits_task.py: the task bench_quality measures too)

EPOCHS_DENSE = 8
BATCH = digits_task.BATCH


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convolutions: thread start-up costs more than it saves on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn.datasets")
    return digits_task.load_digits()


_net = digits_task.digits_net


def _check_fit(model):
    for name, layer in compressed_modules(model):
        w = layer.compressed_weight().detach()
        if layer.fmt == "comp":
            require_fit(w, layer.repeat, what=f"layer {name!r}")   # after int8 quantization
        else:
            assert unstructured_macs(w) <= round((1 - layer.compression) * w.numel()), name


def _train(model, data, epochs, lr, seed, opt=None, check=False):
    return digits_task.train(model, data, epochs, lr, seed, opt=opt,
                             after_step=(lambda: _check_fit(model)) if check else None)


def _accuracy(model, data):
    return 100.0 * digits_task.accuracy(model, data)


@pytest.fixture(scope="module")
def dense(digits):
    torch.manual_seed(0)
    model = _train(_net(), digits, EPOCHS_DENSE, 0.05, seed=0)
    return model, _accuracy(model, digits)


def test_digits_finetune_vbxfx_vs_plain_masks(digits, dense):
    model, dense_acc = dense
    assert dense_acc >= 95.0
    start = time.perf_counter()
    example = digits[0][:1]
    results = {}
    for label, options in (("vbxfx", {}),
                           ("plain N:4", {"pairing": False, "refresh_every": None})):
        compressed, report = vbxfx.compress(model, example, compression=0.66, **options)
        _check_fit(compressed)
        before = _accuracy(compressed, digits)
        torch.manual_seed(1)
        _train(compressed, digits, 2, 0.01, seed=1, check=True)
        results[label] = (before, _accuracy(compressed, digits), report)
    vbx, plain = results["vbxfx"], results["plain N:4"]
    # same per-layer levels, so the same multiplies: only pairing / refresh differ
    assert [r["repeat"] for r in vbx[2]["layers"]] == [r["repeat"] for r in plain[2]["layers"]]
    assert vbx[2]["achieved"] >= 0.66
    errors = [sum(r["projection_error"] for r in res[2]["layers"]) for res in (vbx, plain)]
    assert errors[0] < errors[1]   # pairing never loses to magnitude masks at equal repeats
    print(f"\ndigits, 0.66 of hardware MACs removed, 2 epochs of fine-tuning "
          f"(levels {[r['repeat'] for r in vbx[2]['layers']]}):\n"
          f"  dense            {dense_acc:6.2f} %\n"
          f"  vbxfx            {vbx[0]:6.2f} % after compression -> {vbx[1]:6.2f} % fine-tuned\n"
          f"  plain N:4 masks  {plain[0]:6.2f} % after compression -> {plain[1]:6.2f} % "
          f"fine-tuned\n  ({time.perf_counter() - start:.1f} s)")
    assert vbx[1] >= dense_acc - 1.0


def test_seed_workflow_with_optimizer_built_before(digits, dense):
    model = copy.deepcopy(dense[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    vbxfx.compress_vbx3(model, compression=0.66)                   # the two lines
    torch.manual_seed(2)
    _train(model, digits, 2, 0.01, seed=2, opt=opt, check=True)    # same loop, same optimizer
    acc = _accuracy(model, digits)
    print(f"\ndigits, compress_vbx3(0.66) then the same loop and optimizer: {acc:.2f} %")
    assert acc >= dense[1] - 1.0


def test_data_parallel_matches_plain_training(digits, dense):
    a, _ = vbxfx.compress(dense[0], digits[0][:1], compression=0.66, refresh_every=2)
    b = copy.deepcopy(a)
    small = (digits[0][:256], digits[1][:256])
    _train(a, small, 1, 0.01, seed=3)
    wrapped = nn.DataParallel(b)
    _train(wrapped, small, 1, 0.01, seed=3, check=True)
    for (_, la), (_, lb) in zip(compressed_modules(a), compressed_modules(b), strict=True):
        assert la._vbx_steps == lb._vbx_steps
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.weight, lb.weight)
    x = digits[2][:64]
    a.eval(), wrapped.eval()
    torch.testing.assert_close(wrapped(x), a(x))


@pytest.mark.parametrize("backend", [
    "aot_eager",                                             # dynamo + AOTAutograd, no C++ build
    pytest.param("inductor", marks=pytest.mark.slow),        # 35-75 s on one busy CPU core
])
def test_torch_compile(digits, dense, backend):
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    eager, _ = vbxfx.compress(dense[0], digits[0][:1], compression=0.66, refresh_every=2)
    twin = copy.deepcopy(eager)
    try:
        compiled = torch.compile(twin, backend=backend)
        compiled(digits[0][:BATCH]).sum()
    except Exception as e:  # no compiler toolchain, unsupported platform, ...
        pytest.skip(f"torch.compile does not run here: {type(e).__name__}: {e}")
    small = (digits[0][:160], digits[1][:160])
    _train(eager, small, 1, 0.01, seed=4)
    _train(compiled, small, 1, 0.01, seed=4, check=True)
    for (_, le), (_, lc) in zip(compressed_modules(eager), compressed_modules(twin), strict=True):
        assert le._vbx_steps == lc._vbx_steps == 1        # 5 steps: refreshed twice
        assert torch.equal(le.mask, lc.mask)
        torch.testing.assert_close(lc.weight, le.weight)
    x = digits[2][:64]
    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x))
