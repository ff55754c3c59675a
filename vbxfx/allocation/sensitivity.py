"""How much each layer suffers at each compression level: the costs of the allocation.

Three measures, all "lower is better" and additive across layers (the allocation sums them):

- ``"weight"`` (data-free, :func:`weight_sensitivity`): the noise-to-signal energy ratio that
  the projection ``P`` adds at the layer's normalised output. The error ``dW = W - P(W)``
  perturbs output channel ``o`` by ``dW_o · x``, of energy ``Σ dW² Var(x) + (Σ dW E[x])²``
  for input channels taken as independent. The input moments come from the BatchNorm that
  produces the input (through ReLU/ReLU6/... by Gaussian quadrature, through residual sums
  by adding); the BatchNorm after the layer scales channel ``o`` by ``γ_o/σ_o`` (its running
  ``σ``: the real spread of that channel) and outputs energy ``Σ γ² + β²``. The ratio is
  multiplied by the layer's branch share ``E_branch / (E_branch + E_skip)`` of the first
  residual sum its output flows into: noise added inside a residual branch is diluted by
  the skip path. No data is needed, only the running statistics stored in the model. Where
  the graph says nothing (no BatchNorm, a LayerTable without graph) the ratio falls back to
  the relative error ``||dW||²/||W||²``.

  *Why this normalisation.* Relative errors alone are nearly equal for every layer of a
  trained network (about 0.03 at 2:4 and 0.23 at 1:4 on MobileNetV2), so they cannot tell a
  fragile layer from a robust one; weighting them by MACs or size makes big layers look
  fragile, which they are not. On ImageNet MobileNetV2 the BatchNorm-aware ratio ranks the
  layers like the measured output divergence (Spearman 0.82 against the ``"output"``
  sensitivity at 1:4; plain relative error: -0.43). At 0.66 of MACs removed, one-shot,
  its allocation brings the logit KL to dense from 7.49 (size-ordered baseline) to 5.18
  (plain relative error: 6.68, times MAC share: 6.25); ``tools/compare_allocation.py``
  prints every variant.
- ``"output"`` (:func:`output_sensitivity`): a few calibration batches; the divergence of the
  model's output from the dense output when only that layer is projected at that level:
  ``KL(softmax(dense) || softmax(projected))`` per sample for a 2-D output (logits), else
  the relative squared error ``||y - y0||²/||y0||²``.
- a user ``eval_fn(model) -> float`` (higher is better, :func:`eval_fn_sensitivity`): the
  drop of the score when only that layer is projected (AIMET's greedy compression-ratio
  selection scores layers the same way).

The last two project **the model passed in**, one layer at a time, in place: inside
``torch.no_grad()`` the layer's weight is overwritten with its projection and, in a
``finally`` block, with a saved copy of the original, so the model comes back bit-for-bit
unchanged even when the forward pass or ``eval_fn`` raises. The model is put in eval mode
meanwhile and each module's own training flag is restored afterwards.

>>> import torch
>>> w = {"a": torch.randn(8, 16, 1, 1)}
>>> s = weight_sensitivity(w, (1, 2), "comp")
>>> 0 < s["a"][2] < s["a"][1] < 1
True
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vbxfx.errors import ConfigError
from vbxfx.format import project_unstructured, project_weight
from vbxfx.meta import LAYER_KEY
from vbxfx.analysis.trace import eval_mode
from vbxfx.allocation.noise import LayerStats, column_ratios, noise_ratio

__all__ = ["project", "projected", "LayerStats", "layer_statistics", "weight_sensitivity",
           "noise_ratio", "column_ratios",
           "output_sensitivity", "eval_fn_sensitivity", "output_divergence", "calib_batches"]

logger = logging.getLogger(__name__)

Level = int | float
#: The levels to score: one sequence for all layers, or one per layer name.
LevelSpec = Sequence[Level] | Mapping[str, Sequence[Level]]


def project(weight: torch.Tensor, level: Level, fmt: str) -> torch.Tensor:
    """The weight projected at ``level``: a repeat for ``"comp"``, a compression for ``"ucomp"``."""
    if fmt == "comp":
        return weight.detach().clone() if level == 4 else project_weight(weight, int(level))
    if float(level) == 0.0:
        return weight.detach().clone()
    return project_unstructured(weight, float(level))


@contextlib.contextmanager
def projected(param: torch.Tensor, level: Level, fmt: str) -> Iterator[None]:
    """Within the block ``param`` holds its projection; afterwards its exact original values."""
    with torch.no_grad():
        saved = param.detach().clone()
        try:
            param.copy_(project(saved, level, fmt))
            yield
        finally:
            param.copy_(saved)


def _noise_ratio(w: torch.Tensor, level: Level, fmt: str, st: LayerStats | None) -> float:
    """Noise-to-signal energy ratio at the layer's (normalised) output; see the module doc."""
    w = w.detach().float()
    return noise_ratio(w, w - project(w, level, fmt).float(), st)


def weight_sensitivity(weights: Mapping[str, torch.Tensor], levels: LevelSpec, fmt: str,
                       stats: Mapping[str, LayerStats] | None = None,
                       ) -> dict[str, dict[Level, float]]:
    """Data-free: the projection's noise-to-signal ratio per layer and level (module doc).

    Without ``stats`` (no graph to read BatchNorm statistics from) this is the relative
    squared projection error ``||W - P(W)||² / ||W||²``. The dense level costs 0.
    """
    stats = stats or {}
    out: dict[str, dict[Level, float]] = {}
    for name, w in weights.items():
        out[name] = {lv: (0.0 if _is_dense(lv, fmt) else _noise_ratio(w, lv, fmt, stats.get(name)))
                     for lv in _levels(levels, name)}
    return out


def calib_batches(calib_data: Any) -> list[tuple]:
    """``calib_data`` as a list of input tuples: a Tensor (one batch), or an iterable of
    batches, each a Tensor or a ``(inputs, labels, ...)`` sequence whose first item is fed."""
    if isinstance(calib_data, torch.Tensor):
        return [(_finite_batch(0, calib_data),)]
    if calib_data is None or isinstance(calib_data, (str, bytes)) or not isinstance(
            calib_data, Iterable):
        raise ConfigError("calib_data must be a Tensor batch or an iterable of batches "
                          f"(Tensors or (inputs, labels) pairs), got {type(calib_data).__name__}")
    batches = []
    for i, batch in enumerate(calib_data):
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise ConfigError(f"calib_data batch {i} is a {type(batch).__name__}; expected a "
                              "Tensor or an (inputs, labels) pair")
        batches.append((_finite_batch(i, batch),))
    if not batches:
        raise ConfigError("calib_data holds no batch; give a few calibration batches")
    return batches


def _finite_batch(i: int, batch: torch.Tensor) -> torch.Tensor:
    if batch.is_floating_point() and batch.device.type != "meta" \
            and not bool(torch.isfinite(batch).all()):
        bad = int((~torch.isfinite(batch)).sum())
        raise ConfigError(f"calib_data batch {i} holds {bad} NaN or infinite value(s) of "
                          f"{batch.numel()}; give finite inputs (as the model sees them)")
    return batch


def output_divergence(dense: Any, out: Any) -> float:
    """KL(softmax(dense) || softmax(out)) per sample for 2-D outputs, else relative MSE."""
    if isinstance(dense, torch.Tensor) and dense.dim() == 2 and dense.is_floating_point():
        log_p = F.log_softmax(dense.float(), dim=1)
        log_q = F.log_softmax(out.float(), dim=1)
        return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    d, o = _tensors(dense), _tensors(out)
    if len(d) != len(o) or not d:
        raise ConfigError("the model's output has no tensors to compare, or changes structure "
                          "when a layer is projected")
    num = sum(float((a.float() - b.float()).square().sum()) for a, b in zip(d, o))
    den = sum(float(a.float().square().sum()) for a in d)
    return num / den if den > 0 else num


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def output_sensitivity(model: nn.Module, params: Mapping[str, torch.Tensor],
                       levels: LevelSpec, fmt: str, calib_data: Any,
                       progress: bool = True) -> dict[str, dict[Level, float]]:
    """Output divergence (:func:`output_divergence`) with only one layer projected, averaged
    over the calibration batches; ``params`` maps layer names to their weight Parameters."""
    batches = calib_batches(calib_data)
    with eval_mode(model), torch.no_grad():
        dense = [model(*b) for b in batches]

        def score() -> float:
            total = sum(output_divergence(d, model(*b)) for d, b in zip(dense, batches))
            return total / len(batches)

        return _per_layer(model, params, levels, fmt, score, "output", progress)


def eval_fn_sensitivity(model: nn.Module, params: Mapping[str, torch.Tensor],
                        levels: LevelSpec, fmt: str, eval_fn: Callable[[nn.Module], float],
                        progress: bool = True) -> dict[str, dict[Level, float]]:
    """Drop of ``eval_fn(model)`` (higher is better) with only one layer projected."""
    if not callable(eval_fn):
        raise ConfigError(f"eval_fn must be a callable model -> float, got {eval_fn!r}")

    def call() -> float:
        value = eval_fn(model)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"eval_fn returned {value!r}; it must return a number "
                              "(higher is better)") from None

    with eval_mode(model):
        base = call()
        return _per_layer(model, params, levels, fmt, lambda: base - call(), "eval_fn", progress)


def _per_layer(model: nn.Module, params: Mapping[str, torch.Tensor], levels: LevelSpec,
               fmt: str, score: Callable[[], float], what: str,
               progress: bool) -> dict[str, dict[Level, float]]:
    todo = {n: [lv for lv in _levels(levels, n) if not _is_dense(lv, fmt)] for n in params}
    out: dict[str, dict[Level, float]] = {}
    bar = tqdm(total=sum(map(len, todo.values())), desc=f"vbxfx sensitivity ({what})",
               disable=not progress, leave=False)
    try:
        for name, p in params.items():
            out[name] = {lv: 0.0 for lv in _levels(levels, name) if _is_dense(lv, fmt)}
            for lv in todo[name]:
                with projected(p, lv, fmt):
                    out[name][lv] = score()
                bar.update(1)
            logger.debug("%s sensitivity of %r: %s", what, name, out[name])
    finally:
        bar.close()
    return out


def _is_dense(level: Level, fmt: str) -> bool:
    return level == 4 if fmt == "comp" else float(level) == 0.0


def _levels(levels: LevelSpec, name: str) -> Sequence[Level]:
    return levels[name] if isinstance(levels, Mapping) else levels


# --------------------------------------------------------------------------- graph statistics

_aten = torch.ops.aten
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU,
                nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU, nn.Hardsigmoid)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.hardswish, F.gelu,
                  F.leaky_relu, torch.sigmoid, torch.tanh, F.mish, F.elu, F.hardsigmoid,
                  _aten.relu.default, _aten.relu_.default, _aten.hardtanh.default,
                  _aten.hardtanh_.default, _aten.silu.default, _aten.silu_.default,
                  _aten.hardswish.default, _aten.hardswish_.default, _aten.gelu.default,
                  _aten.sigmoid.default, _aten.tanh.default, _aten.clamp.default}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_PASS_FUNCTIONS = {F.dropout, _aten.dropout.default, _aten.clone.default}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor}
_BN_FUNCTIONS = {_aten.batch_norm.default, F.batch_norm}
_Z = torch.linspace(-6.0, 6.0, 241)
_PDF = torch.softmax(-_Z.square() / 2, 0)  # normalised Gaussian weights on the grid

Moments = tuple[torch.Tensor, torch.Tensor]  # per-channel mean and variance


def layer_statistics(gm: torch.fx.GraphModule) -> dict[str, LayerStats]:
    """:class:`LayerStats` of every layer call of an analysed GraphModule (first call each).

    Works on both front ends (``call_module`` BatchNorm / activations, and torch.export's
    ``aten.batch_norm`` / ``aten.hardtanh_`` ...); anything it does not recognise leaves the
    statistic unknown, which :func:`weight_sensitivity` treats conservatively.
    """
    moments: dict[torch.fx.Node, Moments | None] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            moments[node] = _node_moments(gm, node, moments)
        out: dict[str, LayerStats] = {}
        for node in gm.graph.nodes:
            info = node.meta.get(LAYER_KEY)
            if info is None or info.name in out:
                continue
            x = node.args[0] if node.args else None
            inp = moments.get(x) if isinstance(x, torch.fx.Node) else None
            if inp is not None and inp[0].numel() != info.in_channels:
                inp = None
            gain = energy = None
            users = list(node.users)
            bn = _bn_params(gm, users[0]) if len(users) == 1 else None
            if bn is not None:
                gamma, beta, _, var, eps = bn
                gain = gamma.square() / (var + eps)
                energy = float((gamma.square() + beta.square()).sum())
            out[info.name] = LayerStats(
                in_mean=None if inp is None else inp[0], in_var=None if inp is None else inp[1],
                out_gain=gain, out_energy=energy, share=_branch_share(gm, node, moments))
    return out


def _bn_params(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple | None:
    """(gamma, beta, running_mean, running_var, eps) of a BatchNorm node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
            c = mod.running_var.numel()
            gamma = mod.weight.detach() if mod.weight is not None else torch.ones(c)
            beta = mod.bias.detach() if mod.bias is not None else torch.zeros(c)
            return gamma.float(), beta.float(), mod.running_mean.float(), \
                mod.running_var.float(), float(mod.eps)
        return None
    if node.op != "call_function" or node.target not in _BN_FUNCTIONS:
        return None
    a = list(node.args) + [None] * 8
    if node.target is F.batch_norm:  # (input, running_mean, running_var, weight, bias, ...)
        rm, rv, w, b, eps = a[1], a[2], a[3], a[4], node.kwargs.get("eps", a[7] or 1e-5)
    else:  # aten.batch_norm(input, weight, bias, running_mean, running_var, training, m, eps)
        w, b, rm, rv, eps = a[1], a[2], a[3], a[4], a[7] if a[7] is not None else 1e-5
    rm, rv, w, b = (_fetch(gm, t) for t in (rm, rv, w, b))
    if rm is None or rv is None:
        return None
    w = w if w is not None else torch.ones_like(rv)
    b = b if b is not None else torch.zeros_like(rv)
    return w.float(), b.float(), rm.float(), rv.float(), float(eps)


def _fetch(gm: torch.fx.GraphModule, arg: Any) -> torch.Tensor | None:
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(arg.target).split("."):
        obj = getattr(obj, part, None)
    return obj.detach() if isinstance(obj, torch.Tensor) else None


def _is_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACT_MODULES)
    return node.op == "call_function" and node.target in _ACT_FUNCTIONS


def _is_passthrough(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS
            and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args))


def _node_moments(gm: torch.fx.GraphModule, node: torch.fx.Node,
                  memo: dict[torch.fx.Node, Moments | None]) -> Moments | None:
    bn = _bn_params(gm, node)
    if bn is not None:  # normalised by its running statistics: mean beta, variance gamma²
        return bn[1], bn[0].square()
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    parent = memo.get(first) if first is not None else None
    if _is_add(node):
        a, b = (memo.get(x) for x in node.args)
        if a is None or b is None or a[0].shape != b[0].shape:
            return None
        return a[0] + b[0], a[1] + b[1]
    if parent is None:
        return None
    if _is_passthrough(gm, node):
        return parent
    if _is_activation(gm, node):  # Gaussian quadrature through the elementwise function
        mean, var = parent
        grid = mean[:, None] + var.clamp(min=0).sqrt()[:, None] * _Z[None, :]
        if node.op == "call_module":
            y = gm.get_submodule(node.target)(grid)
        else:
            y = node.target(grid, *node.args[1:], **node.kwargs)
        m = (y * _PDF).sum(1)
        return m, ((y - m[:, None]).square() * _PDF).sum(1)
    return None


def _branch_share(gm: torch.fx.GraphModule, node: torch.fx.Node,
                  memo: dict[torch.fx.Node, Moments | None]) -> float:
    """Energy share of the branch holding ``node`` in the first residual sum downstream."""
    cur = node
    for _ in range(32):
        users = list(cur.users)
        if len(users) != 1:
            return 1.0
        user = users[0]
        if _is_add(user):
            other = user.args[1] if user.args[0] is cur else user.args[0]
            mine, theirs = memo.get(cur), memo.get(other)
            if mine is None or theirs is None:
                return 1.0
            e_mine = float((mine[1] + mine[0].square()).sum())
            e_theirs = float((theirs[1] + theirs[0].square()).sum())
            return e_mine / (e_mine + e_theirs) if e_mine + e_theirs > 0 else 1.0
        if not (LAYER_KEY in user.meta or _bn_params(gm, user) is not None
                or _is_activation(gm, user) or _is_passthrough(gm, user)):
            return 1.0
        cur = user
    return 1.0
