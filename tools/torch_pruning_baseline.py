"""Torch-Pruning as a one-shot channel-pruning baseline for ImageNet MobileNetV2.

For each target fraction of *standard* MACs removed (``torch_pruning.utils.count_ops_and_params``
on a 1x3x224x224 input, dense vs pruned), Torch-Pruning's ``MetaPruner`` removes whole
channels; the pruning ratio is found by bisection so that the achieved fraction is within 0.01
of the target. ``model.classifier`` is ignored (its 1000 outputs stay). Variants:

- importance ``l1``: ``GroupMagnitudeImportance(p=1)`` (data-free);
- importance ``taylor``: ``GroupTaylorImportance`` with gradients of the cross-entropy to the
  dense model's own argmax labels on the calibration crops (label-free; a KL or soft-label loss
  to the dense model has zero gradient at the dense model, so hard pseudo-labels are used);
- ``uniform`` (global_pruning=False, one ratio for every layer) or ``global`` (global ranking,
  ``max_pruning_ratio=0.9`` so that no layer is removed entirely);
- no fine-tuning; metrics without and with BatchNorm recalibration (running statistics reset
  and re-estimated on the calibration crops, momentum=None).

Metrics against the dense model on evaluation crops: top-1 agreement and mean
KL(softmax(dense) || softmax(pruned)). ``seconds`` is the wall time of the ratio search and
pruning (plus the gradient pass for ``taylor`` and the recalibration for ``+BN recal``).
The ``dense +BN recal`` row shows what recalibration alone does to the unpruned model.

Torch-Pruning is no dependency of vbxfx: ``pip install torch-pruning`` (1.6.1 measured)
before running this, or ``tools/bench_methods.py --torch-pruning``, which imports it.

    OMP_NUM_THREADS=1 python tools/torch_pruning_baseline.py [--macs-removed 0.5 0.66 0.75 0.8]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import sys
import time

import torch
import torch.nn.functional as F
import torch_pruning as tp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_allocation import load_mobilenet  # noqa: E402
from vbxfx.inputs.calib import natural_image_crops  # noqa: E402

IMPORTANCES = ("l1", "taylor")


def _macs(model: torch.nn.Module, example: torch.Tensor) -> float:
    return float(tp.utils.count_ops_and_params(model, example)[0])


def _taylor_grads(model: torch.nn.Module, calib: torch.Tensor, batch: int = 16) -> dict:
    """Parameter gradients of CE(model(x), argmax dense(x)) summed over ``calib`` (eval mode)."""
    m = copy.deepcopy(model).eval()
    m.zero_grad()
    for xb in calib.split(batch):
        logits = m(xb)
        F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum").backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _prune(model, example, ratio, importance, grads, global_pruning):
    m = copy.deepcopy(model).eval()
    if grads is not None:
        for n, p in m.named_parameters():
            p.grad = grads.get(n)
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" \
        else tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio,
                                  global_pruning=global_pruning, max_pruning_ratio=0.9,
                                  ignored_layers=[m.classifier])
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m


def torch_pruning_oneshot(model: torch.nn.Module, example: torch.Tensor, macs_removed: float,
                          importance: str = "l1", calib: torch.Tensor | None = None,
                          global_pruning: bool = False, tol: float = 0.01, max_iter: int = 20):
    """Prune a copy of ``model`` with Torch-Pruning so that ``macs_removed`` of its standard MACs
    go (within ``tol``, ratio by bisection). Returns ``(pruned_model, achieved_fraction)``.

    ``importance``: ``"l1"`` (data-free) or ``"taylor"`` (needs ``calib``). ``model`` is untouched.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if importance == "taylor" and calib is None:
        raise ValueError("taylor importance needs calib crops")
    grads = _taylor_grads(model, calib) if importance == "taylor" else None
    dense = _macs(model, example)
    lo, hi = 0.0, 0.9
    best = None
    for _ in range(max_iter):
        ratio = (lo + hi) / 2
        pruned = _prune(model, example, ratio, importance, grads, global_pruning)
        frac = 1.0 - _macs(pruned, example) / dense
        if best is None or abs(frac - macs_removed) < abs(best[1] - macs_removed):
            best = (pruned, frac)
        if abs(frac - macs_removed) <= tol:
            break
        lo, hi = (ratio, hi) if frac < macs_removed else (lo, ratio)
    return best


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, calib: torch.Tensor, batch: int = 16) -> torch.nn.Module:
    """Reset BatchNorm running statistics and re-estimate them (cumulative average) on ``calib``."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for xb in calib.split(batch):
        model(xb)
    return model.eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb) for xb in x.split(batch)])


def top1_agreement(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> float:
    """Fraction of inputs whose argmax matches the dense model's."""
    return float((dense_logits.argmax(1) == pruned_logits.argmax(1)).float().mean())


def mean_kl(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> float:
    """Mean KL(softmax(dense) || softmax(pruned))."""
    return float(F.kl_div(F.log_softmax(pruned_logits, 1), F.log_softmax(dense_logits, 1),
                          log_target=True, reduction="batchmean"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--macs-removed", type=float, nargs="+", default=[0.5, 0.66, 0.75, 0.8])
    ap.add_argument("--importance", nargs="+", default=list(IMPORTANCES), choices=IMPORTANCES)
    ap.add_argument("--no-global", action="store_true", help="skip the global_pruning variants")
    ap.add_argument("--crops", type=int, default=256)
    ap.add_argument("--calib", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = load_mobilenet()
    example = torch.randn(1, 3, 224, 224)
    calib = natural_image_crops(args.calib, 224, seed=1)
    evals = natural_image_crops(args.crops, 224, seed=0)
    dense_logits = logits_of(model, evals)

    print(f"torch-pruning {importlib.metadata.version('torch-pruning')}, "
          f"torch {torch.__version__}, {args.crops} eval crops, {args.calib} calib crops\n")
    print("| variant | MACs removed (standard) | top-1 agreement | KL | seconds |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    recal = recalibrate_bn(copy.deepcopy(model), calib)
    t_bn = time.perf_counter() - t0
    logits = logits_of(recal, evals)
    print(f"| dense +BN recal (reference) | 0.000 | {top1_agreement(dense_logits, logits):.3f} | "
          f"{mean_kl(dense_logits, logits):.3f} | {t_bn:.1f} |", flush=True)
    modes = [False] if args.no_global else [False, True]
    for target in args.macs_removed:
        for imp in args.importance:
            for glob in modes:
                name = f"{imp} {'global' if glob else 'uniform'} @{target:g}"
                t0 = time.perf_counter()
                pruned, frac = torch_pruning_oneshot(model, example, target, imp, calib,
                                                     global_pruning=glob)
                t_prune = time.perf_counter() - t0
                logits = logits_of(pruned, evals)
                print(f"| {name} | {frac:.3f} | {top1_agreement(dense_logits, logits):.3f} | "
                      f"{mean_kl(dense_logits, logits):.3f} | {t_prune:.1f} |", flush=True)
                t0 = time.perf_counter()
                recalibrate_bn(pruned, calib)
                t_bn = t_prune + time.perf_counter() - t0
                logits = logits_of(pruned, evals)
                print(f"| {name} +BN recal | {frac:.3f} | "
                      f"{top1_agreement(dense_logits, logits):.3f} | "
                      f"{mean_kl(dense_logits, logits):.3f} | {t_bn:.1f} |", flush=True)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\nload average (1, 5, 15 min): {load}")


if __name__ == "__main__":
    main()
