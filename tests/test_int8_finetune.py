"""Int8-aware fine-tuning (vbxfx.quant.qat): the fake-quantized model computes on the grids
the converter will use, keeps every pattern, and fine-tuning under it lowers the int8 error
without touching the caller's model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.errors import ConfigError, TraceError
from vbxfx.format import weight_repeat
from vbxfx.inputs.demo import DemoNet
from vbxfx.modules.compressed import is_compressed
from vbxfx.quant.qat import FakeQuantActivation, FakeQuantLayer, fake_quant_model, finetune_int8
from vbxfx.refit.distill import distillation_loss

X = torch.randn(1, 3, 64, 64)


def _data(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    return vbxfx.compress(DemoNet(), X, compression=0.6).model.eval()


def _points(gm) -> list[FakeQuantActivation]:
    return [m for m in gm.modules() if isinstance(m, FakeQuantActivation)]


def test_activation_grids_sit_where_tflite_stores_int8():
    # conv -> bn -> relu is one TFLite op (one int8 output); add -> relu too; the flatten
    # shares its input's grid; input, conv+bn+relu, second conv+bn (feeds the add),
    # add+relu, pooled mean, logits: 6 grids.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)) + y)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    gm = fake_quant_model(Net().eval(), X, _data(4))
    assert gm.meta["vbxfx.int8_points"] == len(_points(gm)) == 6
    for q in _points(gm):
        assert not q.observing and float(q.scale) > 0 and -128 <= int(q.zero_point) <= 127


def test_outputs_lie_on_the_int8_grid(compressed):
    gm = fake_quant_model(compressed, X, _data())
    with torch.no_grad():
        y = gm(_data(8, seed=1))
    q = _points(gm)[-1]                      # the logits' grid
    steps = y / q.scale + q.zero_point
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    assert int(steps.min()) >= -128 and int(steps.max()) <= 127
    with torch.no_grad():
        ref = compressed(_data(8, seed=1))
    assert not torch.equal(y, ref)           # int8 changes the result ...
    torch.testing.assert_close(y, ref, atol=0.5, rtol=0.2)   # ... a little


def test_weights_on_the_grid_keep_every_pattern(compressed):
    gm = fake_quant_model(compressed, X, _data())
    layers = [m for m in gm.modules() if isinstance(m, FakeQuantLayer)]
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in compressed.modules())
    checked = 0
    for fq in layers:
        w = fq.quantized_weight().detach()
        if fq.per_channel:
            scale = w.abs().reshape(w.shape[0], -1).amax(1) / 127
            steps = w / scale.clamp_min(1e-12).view(-1, *[1] * (w.dim() - 1))
        else:
            steps = w / (w.abs().max() / 127)
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
        if is_compressed(fq.layer) and fq.layer.fmt == "comp":
            assert weight_repeat(w, quantize=False) <= fq.layer.repeat, fq.layer
            checked += 1
    assert checked >= 3


def test_the_callers_model_is_untouched_and_the_trained_one_keeps_its_layers(compressed):
    before = copy.deepcopy(compressed.state_dict())
    data = _data(32)
    result = finetune_int8(compressed, X, data, steps=6, batch_size=8, lr=1e-3)
    for k, v in compressed.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    tuned = result.model
    assert type(tuned) is type(compressed) and not tuned.training
    assert result.int8_points > 0 and len(result.losses) == 6
    changed = [k for k, v in tuned.state_dict().items() if k.endswith("weight")
               and not torch.equal(v, before[k])]
    assert changed
    for name, m in tuned.named_modules():
        ref = compressed.get_submodule(name)
        if is_compressed(ref):
            assert is_compressed(m) and m.repeat == ref.repeat, name
            assert weight_repeat(m.compressed_weight().detach()) <= m.repeat, name
    pickle.loads(pickle.dumps(tuned))


def test_finetuning_lowers_the_int8_error():
    # a feature extractor: the loss is the energy-normalised error of its feature map; one
    # full batch, so the loss measured is the one trained (the int8 error of this random
    # network is close to its rounding floor: a small but certain gain; with the gradient
    # stopped at the rounding the weights would not move at all)
    net = DemoNet()
    features = nn.Sequential(net.stem, net.layer1, net.layer2, net.dw, net.layer3).eval()
    torch.manual_seed(0)
    model = vbxfx.compress(features, X, compression=0.6).model.eval()
    data = _data(16)

    def int8_loss(m):
        gm = fake_quant_model(m, X, data)
        with torch.no_grad():
            return float(distillation_loss(gm(data), model(data)))

    before = int8_loss(model)
    tuned = finetune_int8(model, X, data, steps=40, batch_size=16, lr=3e-5).model
    assert int8_loss(tuned) < 0.98 * before


def test_bad_input_is_refused_before_any_work(compressed):
    with pytest.raises(ConfigError, match="tensor"):
        finetune_int8(compressed, X, [torch.randn(2, 3, 64, 64)])
    with pytest.raises(ConfigError, match="steps"):
        finetune_int8(compressed, X, _data(4), steps=-1)

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x) if float(x.sum()) > 0 else -self.c(x)

    with pytest.raises(TraceError, match="symbolic"):
        finetune_int8(Dynamic(), X, _data(4), steps=1)
