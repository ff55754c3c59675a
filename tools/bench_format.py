"""Benchmark of the format kernel on every Conv2d(groups=1)/Linear weight of ResNet-50.

Projects all 25.5M weights at repeat 2 and 1, with pairing (exact) and without (plain N:4
magnitude pruning, the baseline), and prints time and relative squared error per variant.

    python tools/bench_format.py [--repeats 5] [--threads 2] [--pretrained-free]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from vbxfx.format import project_weight


def layer_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules()
            if isinstance(m, torch.nn.Linear)
            or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (best and median shown)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", default="resnet50", help="torchvision model name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = layer_weights(getattr(torchvision.models, args.model)())
    total = sum(w.numel() for w in weights)
    norm = sum(float(w.square().sum()) for w in weights)
    print(f"{args.model}: {len(weights)} layers, {total:,} weights, torch {torch.__version__}, "
          f"{args.threads} threads")
    rows = []
    for repeat in (2, 1):
        for pairing in (True, False):
            project_weight(weights[0], repeat, pairing)          # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = [project_weight(w, repeat, pairing) for w in weights]
                times.append(time.perf_counter() - t0)
            err = sum(float((w - p).square().sum()) for w, p in zip(weights, out)) / norm
            rows.append((repeat, pairing, min(times), statistics.median(times), err))
    base = {r: best for r, p, best, _, _ in rows if not p}
    print(f"{'repeat':>6} {'variant':<22} {'best s':>8} {'median s':>9} {'x plain':>8} {'rel. sq. error':>15}")
    for repeat, pairing, best, med, err in rows:
        name = "exact pairing" if pairing else f"plain {'2:4' if repeat == 2 else '1:4'} magnitude"
        print(f"{repeat:>6} {name:<22} {best:>8.3f} {med:>9.3f} {best / base[repeat]:>8.2f} {err:>15.4f}")


if __name__ == "__main__":
    main()
