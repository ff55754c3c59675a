"""Calibrated reconstruction: refit the compressed layers to the dense model's outputs.

The projection chooses each layer's pattern (which weights stay, which pairs share one
multiplier) from the weights alone. Given a few unlabeled calibration batches, much more
is possible without training. For every compressed layer, in graph order,

    min  E || y_dense - (W x + b) ||²     over W in the format, b free

where ``y_dense`` is the layer's output in the dense model and ``x`` its input in the
*compressed* model as refit so far (``method="sequential"``, :mod:`vbxfx.refit.sequential`):
each layer absorbs the error the layers before it left. With ``pattern="obs"`` the layer's
pattern is chosen on the data first (:mod:`vbxfx.refit.obs`: Optimal Brain Surgeon inside
the pairing format), then the kept weights, the shared magnitude of each pair and a bias
solve the least-squares problem inside it (:mod:`vbxfx.refit.solve`). Every compressed
weight stays in its format, so it keeps fitting its repeat after int8 quantization.
``dense_layers=True`` also refits the depthwise convolutions (which the hardware keeps
dense) without constraint; measured no better, so it is off.

Models that do not trace symbolically (torch.export models such as ultralytics YOLO) get
the same sequential refit by hooks (:mod:`vbxfx.refit.hooks`: partial forwards, layer by
layer in execution order; about half a forward per layer and batch instead of one per batch).
``method="local"`` refits every layer on the dense model's inputs from one forward with
hooks (the refit of earlier versions).

MobileNetV2 (ImageNet weights, 128 calibration crops, 512 evaluation crops,
``tools/bench_quality.py``): top-1 agreement with the dense model at 0.5 / 0.66 / 0.75 of
hardware MACs removed is 83 / 76 / 73 % with the defaults, 65 / 11 / 11 % with the local
refit and the projection's pattern (BENCHMARKS.md, issue 15, with every variant tried).

>>> import torch, vbxfx
>>> from vbxfx.inputs.demo import DemoNet
>>> dense = DemoNet().eval(); x = torch.randn(16, 3, 64, 64)
>>> small = vbxfx.compress(dense, x[:1], compression=0.66).model      # doctest: +SKIP
>>> reconstruct(small, dense, x).layers[0].error_after <= 1           # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.modules import is_compressed
from vbxfx.refit.layer import PATTERNS, LayerRefit, refit_compressed, refit_dense, weight_and_bias
from vbxfx.refit.hooks import refit_by_hooks
from vbxfx.refit.local import local_problems
from vbxfx.refit.rows import Problem, input_rows, is_depthwise, output_rows, sample_positions
from vbxfx.refit.sequential import run_side_by_side, trace_for_refit
from vbxfx.refit.structure import dense_refits, reference_for, sliced_output, structure_targets
from vbxfx.shrink.apply import ShrinkRecord
from vbxfx.allocation.sensitivity import calib_batches

__all__ = ["reconstruct", "ReconstructResult", "LayerRefit", "METHODS", "PATTERNS", "Progress",
           "OPTIONS"]

logger = logging.getLogger(__name__)

METHODS = ("sequential", "local")
#: The keyword options of :func:`reconstruct`.
OPTIONS = ("method", "pattern", "dense_layers", "iters", "damp", "max_rows", "max_stats_bytes",
           "layers", "seed", "progress", "local_weight", "variance_match", "zero_pruned")
#: ``progress(done, total, layer)``: called after each refit layer.
Progress = Callable[[int, int, str], None]


@dataclass
class ReconstructResult:
    layers: list[LayerRefit] = field(default_factory=list)
    forwards: int = 0
    method: str = "local"

    @property
    def compressed(self) -> list[LayerRefit]:
        return [r for r in self.layers if not r.dense]

    def summary(self) -> str:
        done = self.compressed
        if not done:
            return "reconstruct: no layer refit"
        before = sum(r.error_before for r in done) / len(done)
        after = sum(r.error_after for r in done) / len(done)
        extra = len(self.layers) - len(done)
        return (f"reconstruct ({self.method}): {len(done)} compressed layer(s)"
                f"{f' and {extra} dense one(s)' if extra else ''} refit from "
                f"{self.forwards} forward(s); mean relative output error "
                f"{before:.4f} -> {after:.4f}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check(method: Any, pattern: Any, dense_layers: Any, iters: Any, damp: Any, max_rows: Any,
           progress: Any, local_weight: Any, variance_match: Any, zero_pruned: Any) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if pattern not in PATTERNS:
        raise ConfigError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    for name, value in (("dense_layers", dense_layers), ("variance_match", variance_match),
                        ("zero_pruned", zero_pruned)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    _positive_int("iters", iters)
    _positive_int("max_rows", max_rows)
    for name, value in (("damp", damp), ("local_weight", local_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a callable(done, total, layer) or None, got "
                          f"{type(progress).__name__}")


def reconstruct(model: nn.Module, reference: nn.Module, calib_data: Any, *,
                method: str = "sequential", pattern: str = "obs", dense_layers: bool = False,
                iters: int = 30, damp: float = 0.01, max_rows: int = 4096,
                max_stats_bytes: int = 2 ** 30, layers: Iterable[str] | None = None,
                seed: int = 0, progress: Progress | None = None,
                local_weight: float = 0.0, variance_match: bool = False,
                zero_pruned: bool = True, structure: ShrinkRecord | None = None
                ) -> ReconstructResult:
    """Refit the compressed layers of ``model`` (in place) to the outputs of ``reference``.

    Args:
        model: a model holding compressed layers (e.g. ``vbxfx.compress(...).model``).
        reference: the dense model it was compressed from (not modified: a copy runs).
        calib_data: a Tensor batch, or an iterable of batches (Tensors, tuples of inputs, or
            ``(inputs, labels)`` pairs, as for the output sensitivity).
        method: ``"sequential"`` (inputs from the compressed model, layer by layer: along
            the symbolic graph, or by hooks for a model that does not trace) or
            ``"local"`` (inputs from the dense model, one forward).
        pattern: ``"obs"`` (choose each pattern on the data) or ``"keep"`` (the
            projection's pattern).
        dense_layers: also refit the depthwise convolutions, without constraint
            (sequential only; measured no better, and slower).
        iters: conjugate-gradient iterations per layer (it stops early when converged).
        damp: Tikhonov damping toward the dense layer, a fraction of the mean input energy
            (0.01 and 0.1 measured alike on MobileNetV2).
        max_rows: input rows (convolution patches) sampled per layer and batch.
        max_stats_bytes: ``"local"``: memory for second moments per forward, the sequential
            refit by hooks: for the dense targets kept at once; more layers take more
            forwards.
        layers: only these compressed layers (default: all).
        progress: ``progress(done, total, layer)`` after each refit layer.
        local_weight: sequential only: also fit the dense model's inputs, with this weight
            (0: the compressed model's only; measured no better).
        variance_match: sequential only: scale each refit output channel to the dense
            output's variance on the calibration rows (a BatchNorm-statistics correction;
            measured no better).
        zero_pruned: write zeros at the pruned positions of each refit layer's dense weight,
            so that fine-tuning's pattern refreshes keep the refit patterns (False: they keep
            their dense values and may come back; a refresh then undoes the data-chosen
            patterns, which cost the distillation recovery, BENCHMARKS.md issue 15).
        structure: what :func:`vbxfx.shrink.apply_shrink` changed in ``model`` (pruned
            channels, low-rank factors; :mod:`vbxfx.refit.structure`): those layers are
            compared with the dense layers' kept channels, and the dense layers that lost
            input channels are refit too.

    Raises:
        ConfigError: no compressed layer, bad options, a layer missing in ``reference`` or of
            a different shape there, or calibration data the models cannot run; raised
            before any weight changes, except a failure in the middle of a sequential run.
    """
    _check(method, pattern, dense_layers, iters, damp, max_rows, progress, local_weight,
           variance_match, zero_pruned)
    batches = calib_batches(calib_data)
    modules = dict(model.named_modules())
    compressed = [n for n, m in modules.items() if is_compressed(m)]
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in wanted if n not in compressed]
        if missing:
            raise ConfigError(f"reconstruct: {missing} are not compressed layers of the model; "
                              f"it has {compressed[:5]}{' ...' if len(compressed) > 5 else ''}")
        compressed = [n for n in compressed if n in set(wanted)]
    extra = dense_refits(model, structure) if layers is None else []
    if not compressed and not extra:
        raise ConfigError("reconstruct: the model holds no compressed layer; compress it first")
    reference = reference_for(reference, structure)
    ref_modules = dict(reference.named_modules())
    targets = structure_targets(structure)
    changed = set(targets) | set(structure.in_index if structure else ())
    names = []
    for n in compressed:
        ref = ref_modules.get(n)
        if n in changed:
            pass
        elif not isinstance(ref, (nn.Conv2d, nn.Linear)) or ref.weight.shape != modules[n].weight.shape:
            raise ConfigError(f"reconstruct: layer {n!r} has no Conv2d/Linear of weight shape "
                              f"{tuple(modules[n].weight.shape)} at the same name in the "
                              "reference model (give the dense model it was compressed from)")
        why = _refittable(modules[n])
        if why:
            logger.info("reconstruct: %s is not refit (%s)", n, why)
            continue
        names.append(n)
    # the dense layers: the reference's (a compressed reference layer gives its projection)
    priors = {n: weight_and_bias(modules[n] if n in changed else ref_modules[n],
                                 compressed=n not in changed).detach().clone() for n in names}
    graph = trace_for_refit(model) if method == "sequential" else None
    opts = dict(pattern=pattern, iters=iters, damp=float(damp), zero_pruned=zero_pruned)
    seq_opts = dict(opts, local_weight=float(local_weight), variance_match=variance_match)
    if graph is not None:
        dense = [n for n, m in modules.items() if dense_layers and is_depthwise(m)
                 and not is_compressed(m) and _same_shape(m, ref_modules.get(n))
                 and _refittable(m) is None]
        return _sequential(graph, model, reference, batches, names, dense + extra, priors,
                           max_rows, seed, seq_opts, progress, targets)
    if method == "sequential":
        return _by_hooks(model, reference, batches, names + extra, priors, max_rows,
                         max_stats_bytes, seed, seq_opts, progress, targets)
    if structure is not None:
        raise ConfigError("reconstruct: a model with pruned channels or low-rank factors is "
                          "refit sequentially only (method='sequential')")
    return _local(model, reference, batches, names, priors, max_rows, max_stats_bytes, seed,
                  opts, progress)


def _same_shape(m: nn.Module, ref: nn.Module | None) -> bool:
    return isinstance(ref, nn.Conv2d) and ref.weight.shape == m.weight.shape


def _refittable(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be refit, or None."""
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros"
                                         or isinstance(layer.padding, str)):
        return f"padding {layer.padding!r} / padding_mode {layer.padding_mode!r}"
    return None


def _problem(layer: nn.Module, xs: list, ys: list, max_rows: int, gen: torch.Generator,
             local: list | None = None, local_weight: float = 0.0) -> Problem:
    """The layer's problem from inputs ``xs`` and target outputs ``ys`` (one per batch);
    ``local``: the dense model's inputs, added with ``local_weight``."""
    w = layer.weight
    dw = is_depthwise(layer)
    k = w[0].numel()
    p = Problem(k, w.shape[0], w.device, channels=w.shape[0] if dw else 0)
    for i, (x, y) in enumerate(zip(xs, ys)):
        pos = sample_positions(layer, y.shape, max_rows, gen)
        out_hw = tuple(y.shape[2:]) if isinstance(layer, nn.Conv2d) else (0, 0)
        t = output_rows(layer, y, pos)
        p.add(input_rows(layer, x, out_hw, pos), t)
        if local_weight:
            p.add(input_rows(layer, local[i], out_hw, pos), t, local_weight)
    return p


def _sequential(graph, model, reference, batches, names, dense, priors, max_rows, seed, opts,
                progress, targets) -> ReconstructResult:
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    result = ReconstructResult(forwards=1, method="sequential")
    wanted = set(names) | set(dense)

    def visit(name: str, x_c: list, x_d: list, y_d: list) -> None:
        layer = modules[name]
        y_d = [sliced_output(layer, y, targets.get(name)) for y in y_d]
        p = _problem(layer, x_c, y_d, max_rows, gen, x_d, opts.get("local_weight", 0.0))
        if name in priors:
            r = refit_compressed(name, layer, priors[name], p, pattern=opts["pattern"],
                                 iters=opts["iters"], damp=opts["damp"],
                                 variance_match=opts["variance_match"],
                                 zero_pruned=opts["zero_pruned"])
        else:
            r = refit_dense(name, layer, p, opts["damp"])
        result.layers.append(r)
        logger.debug("reconstruct: %s %.4f -> %.4f", name, r.error_before, r.error_after)

    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, result.layers[-1].name)

    saved = {n: (copy.deepcopy(modules[n].state_dict()), modules[n].bias is None)
             for n in wanted}
    try:
        run_side_by_side(graph, model, reference, batches, wanted, visit, tick)
    except BaseException:
        for n, (state, no_bias) in saved.items():   # a batch failed midway: undo it all
            if no_bias:
                modules[n].bias = None
            modules[n].load_state_dict(state)
        raise
    missing = [n for n in names if n not in {r.name for r in result.layers}]
    for n in missing:
        logger.info("reconstruct: %s did not run on the calibration data", n)
    logger.info("%s", result.summary())
    return result


def _by_hooks(model, reference, batches, names, priors, max_rows, max_bytes, seed, opts,
              progress, targets) -> ReconstructResult:
    """The sequential refit of a model that does not trace symbolically (:mod:`.hooks`)."""
    modules = dict(model.named_modules())
    result = ReconstructResult(forwards=0, method="sequential")

    def refit(name: str, p: Problem) -> None:
        if name not in priors:
            r = refit_dense(name, modules[name], p, opts["damp"])
            result.layers.append(r)
            return
        r = refit_compressed(name, modules[name], priors[name].to(p.h.device), p,
                             pattern=opts["pattern"], iters=opts["iters"], damp=opts["damp"],
                             variance_match=opts["variance_match"],
                             zero_pruned=opts["zero_pruned"])
        result.layers.append(r)
        logger.debug("reconstruct: %s %.4f -> %.4f", name, r.error_before, r.error_after)

    saved = {n: (copy.deepcopy(modules[n].state_dict()), modules[n].bias is None)
             for n in names}
    try:
        done, result.forwards = refit_by_hooks(model, reference, batches, names, refit,
                                               max_rows, torch.Generator().manual_seed(seed),
                                               progress, max_bytes=max_bytes,
                                               out_index=targets)
    except BaseException:
        for n, (state, no_bias) in saved.items():   # a batch failed midway: undo it all
            if no_bias:
                modules[n].bias = None
            modules[n].load_state_dict(state)
        raise
    logger.info("%s", result.summary())
    return result


def _local(model, reference, batches, names, priors, max_rows, max_stats_bytes, seed, opts,
           progress) -> ReconstructResult:
    modules = dict(model.named_modules())
    reference.eval()
    problems, forwards = local_problems(reference, priors, batches, max_rows=max_rows,
                                        max_bytes=max_stats_bytes,
                                        gen=torch.Generator().manual_seed(seed))
    result = ReconstructResult(forwards=forwards, method="local")
    for i, n in enumerate(names):
        p = problems.pop(n)
        if p.n == 0:
            logger.info("reconstruct: %s did not run on the calibration data", n)
            continue
        result.layers.append(refit_compressed(n, modules[n], priors[n].to(p.h.device), p,
                                              **opts))
        if progress is not None:
            progress(i + 1, len(names), n)
    logger.info("%s", result.summary())
    return result
