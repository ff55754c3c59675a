"""Int8-aware fine-tuning: train the float model under the int8 grid the converter will use.

:func:`fake_quant_model` traces a copy of the model and inserts the int8 arithmetic of the
TFLite file it will become:

- every Conv2d / Linear (dense or compressed) computes with its effective weight put on the
  converter's grid: symmetric, ``[-127, 127]``, one scale per output channel for
  convolutions (``max|w| / 127``), one per tensor for Linear layers (the SDK's onnx2tf
  quantizes FULLY_CONNECTED per tensor). The grid is symmetric and BatchNorm scales whole
  output channels, so the grid of the folded weight is the grid of the weight itself, and
  rounding keeps what the format needs: a zero stays zero and the two weights of a pair keep
  one magnitude, so every repeat and pair survives;
- every activation TFLite stores in int8 (the input, each layer's output after the BatchNorm
  and ReLU / ReLU6 the converter fuses into it, adds, pooled means, logits) is rounded to a
  per-tensor asymmetric int8 grid, its range chosen on calibration data for the least mean
  squared error, as :mod:`vbxfx.quant.ranges` chooses it in the file;
- gradients pass the rounding straight through (``torch.fake_quantize_*``).

:func:`finetune_int8` trains that model towards a float teacher (by default the model
itself, before fine-tuning) on unlabeled inputs with :func:`vbxfx.refit.distill.distill` and
returns the float model, its weights now at a point where the int8 grid costs less. Export
it and calibrate the file as usual. Users with labels train the ``fake_quant_model`` in their
own loop instead: its parameters are the float model's (``gm.meta["vbxfx.root"]``).
"""

from __future__ import annotations

import copy
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vbxfx.analysis.trace import ROOT_KEY, trace
from vbxfx.errors import ConfigError, TraceError
from vbxfx.modules.compressed import is_compressed
from vbxfx.quant.ranges import SAMPLES_PER_TENSOR, _best_range

__all__ = ["fake_quant_model", "finetune_int8", "Int8FinetuneResult", "FakeQuantActivation",
           "FakeQuantLayer"]

logger = logging.getLogger(__name__)

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.hardtanh, torch.clamp}
_ADDS = {operator.add, operator.iadd, torch.add}
#: Operators whose int8 output shares its input's grid in TFLite: no grid of their own.
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem, torch.cat, torch.concat,
                   F.dropout, F.max_pool2d, F.pad, torch.squeeze, torch.unsqueeze,
                   torch.permute, torch.transpose, torch.chunk, torch.split}
_PASS_METHODS = {"flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze",
                 "unsqueeze", "chunk", "split", "size", "dim"}
_PASS_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.Unflatten)


class FakeQuantActivation(nn.Module):
    """A per-tensor asymmetric int8 grid; observes samples until :meth:`fix` sets it."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observing = True
        self._samples: list[np.ndarray] = []
        self._gen = np.random.default_rng(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.observing:
            flat = x.detach().float().reshape(-1).cpu().numpy()
            if flat.size > SAMPLES_PER_TENSOR:
                keep = self._gen.choice(flat.size, SAMPLES_PER_TENSOR - 2, replace=False)
                flat = np.concatenate([flat[keep], [flat.min(), flat.max()]])
            self._samples.append(flat)
            return x
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point),
                                                     -128, 127)

    def fix(self) -> None:
        """Choose the grid with the least squared error over the observed values."""
        if not self._samples:
            raise ConfigError(f"activation {self.name!r} saw no data during calibration")
        scale, zero = _best_range(np.concatenate(self._samples))
        self.scale.fill_(scale)
        self.zero_point.fill_(zero)
        self._samples = []
        self.observing = False

    def extra_repr(self) -> str:
        return f"{self.name}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


class FakeQuantLayer(nn.Module):
    """A Conv2d / Linear (dense or compressed) computing with its weight on the int8 grid."""

    def __init__(self, layer: nn.Module, per_channel: bool) -> None:
        super().__init__()
        self.layer = layer
        self.per_channel = per_channel

    def quantized_weight(self) -> torch.Tensor:
        layer = self.layer
        if is_compressed(layer):
            if layer.training:
                layer._vbx_maybe_tick()
            w = layer.compressed_weight()
        else:
            w = layer.weight
        mag = w.detach().abs().float()
        if self.per_channel:
            scale = mag.reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / 127.0
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)
        scale = float(mag.max().clamp_min(1e-12)) / 127.0
        return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, self.quantized_weight(), layer.bias)
        return F.linear(x, self.quantized_weight(), layer.bias)


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_activation(gm, node) -> bool:
    m = _module(gm, node)
    if m is not None:
        return isinstance(m, _ACTIVATION_MODULES)
    return node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS or (
        node.op == "call_method" and node.target in ("relu", "relu_", "clamp"))


def _fused_into_user(gm, node) -> bool:
    """True where TFLite computes ``node`` inside its single user (BatchNorm, ReLU/ReLU6)."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    m, um = _module(gm, node), _module(gm, user)
    if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(um, nn.BatchNorm2d):
        return True
    fusible = isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or (
        node.op == "call_function" and node.target in _ADDS)
    return fusible and _is_activation(gm, user)


def _passes_through(gm, node) -> bool:
    m = _module(gm, node)
    if m is not None:
        return isinstance(m, _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    return node.op in ("get_attr", "output")


def fake_quant_model(model: nn.Module, example_input: torch.Tensor, calib_data: Any, *,
                     batch_size: int = 16) -> torch.fx.GraphModule:
    """A traced copy of ``model`` that computes as its int8 TFLite file will (see the module doc).

    Args:
        model: the float model (dense or compressed); it is not modified.
        example_input: one input of the shape the model is deployed at.
        calib_data: a tensor ``[N, ...]`` of representative inputs; the activation ranges
            are chosen on it.

    Returns:
        A GraphModule in eval mode; ``gm.meta["vbxfx.root"]`` is the float model whose
        parameters it trains; ``gm.meta["vbxfx.int8_points"]`` counts the int8 activations.

    Raises:
        ConfigError: ``calib_data`` is not a non-empty tensor.
        TraceError: the model does not trace with ``torch.fx.symbolic_trace``.
    """
    data = _check_data(calib_data)
    gm = trace(model, example_input, frontend="symbolic_trace")
    graph = gm.graph
    quantized = [n for n in graph.nodes
                 if n.op not in ("output", "get_attr") and not _passes_through(gm, n)
                 and not _fused_into_user(gm, n)]
    for node in list(graph.nodes):
        m = _module(gm, node)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            name = "vbxfx_int8_layer_" + node.target.replace(".", "_")
            gm.add_submodule(name, FakeQuantLayer(m, per_channel=isinstance(m, nn.Conv2d)))
            node.target = name
    for points, node in enumerate(quantized):
        name = f"vbxfx_int8_act_{points}"
        label = node.name if node.op == "placeholder" else str(node.target)
        gm.add_submodule(name, FakeQuantActivation(label))
        with graph.inserting_after(node):
            q = graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
    points = len(quantized)
    graph.lint()
    gm.recompile()
    gm.eval()
    with torch.no_grad():
        for batch in data.split(batch_size):
            gm(batch.to(_device(gm)))
    for m in gm.modules():
        if isinstance(m, FakeQuantActivation):
            m.fix()
    gm.meta["vbxfx.int8_points"] = points
    logger.info("fake_quant_model: %d int8 activations, %d layers on the int8 weight grid", points,
                sum(isinstance(m, FakeQuantLayer) for m in gm.modules()))
    return gm


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_data(data: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ConfigError("int8 fine-tuning needs inputs as one tensor [N, ...] with N > 0, got "
                          f"{type(data).__name__}")
    return data


@dataclass
class Int8FinetuneResult:
    """What :func:`finetune_int8` did; ``model`` is the fine-tuned float model."""

    model: nn.Module
    steps: int
    int8_points: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def finetune_int8(model: nn.Module, example_input: torch.Tensor, data: Any, *,
                  teacher: nn.Module | None = None, steps: int = 200, batch_size: int = 16,
                  lr: float = 1e-5, calib_samples: int = 64, seed: int = 0,
                  progress: bool = False) -> Int8FinetuneResult:
    """Distil ``teacher`` into a copy of ``model`` computing under the int8 grid.

    Args:
        model: the float model (dense or compressed); not modified.
        data: unlabeled inputs ``[N, ...]``; the first ``calib_samples`` choose the
            activation ranges, batches of all of them train.
        teacher: the float model to match (default: ``model`` as it is, in float).
        steps, batch_size, lr: Adam steps on random batches; BatchNorm statistics stay frozen.

    Returns:
        :class:`Int8FinetuneResult`; ``.model`` is a float copy of ``model`` (same classes,
        compressed layers keep their patterns) in eval mode.

    Raises:
        ConfigError: bad data or counts. TraceError: the model does not symbolic-trace.
    """
    from vbxfx.refit.distill import distill

    data = _check_data(data)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("calib_samples", calib_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
            raise ConfigError(f"finetune_int8: {name} must be a {'non-negative' if name == 'steps' else 'positive'} int, got {v!r}")
    t0 = time.perf_counter()
    teacher = copy.deepcopy(model if teacher is None else teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        gm = fake_quant_model(model, example_input, data[:calib_samples], batch_size=batch_size)
    except TraceError as e:
        raise TraceError(f"finetune_int8 needs a model torch.fx.symbolic_trace can trace: {e}") from e
    result = distill(gm, teacher, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     progress=progress)
    root = gm.meta[ROOT_KEY].eval()
    return Int8FinetuneResult(model=root, steps=steps, int8_points=gm.meta["vbxfx.int8_points"],
                              seconds=time.perf_counter() - t0, losses=result.losses)
