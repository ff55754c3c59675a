"""Training-step time of a compressed model against the dense one, over batch sizes (CPU).

A step is forward, loss, backward and SGD step (momentum 0.9) on one batch; for yolov8n also
ultralytics' ``ModelEMA`` update and, for the compressed model, the EMA taking over its
patterns (``follow_patterns``), as the trainer does. The compressed model comes from
``vbxfx.compress(model, x, compression=0.66, refresh_every=None)``: patterns fixed while
timing, so ``ratio`` is the cost between refreshes. Dense and compressed steps alternate
(ABAB...), so load from other processes hits both alike; ratios are of medians. Then:

* ``+ refresh``: the ratio with one refresh of every layer per ``refresh_every`` steps (the
  default policy, 100), from the median time of a refresh (``vbxfx.modules.refresh_patterns``);
* ``projection``: the projections' own forward + backward (all layers), the fixed cost per step.

    OMP_NUM_THREADS=2 python tools/bench_finetune.py --model resnet18 --configs 8x128 32x64 16x224
    YOLO_OFFLINE=1 OMP_NUM_THREADS=2 python tools/bench_finetune.py --model yolov8n --configs 8x320
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vbxfx
from vbxfx.modules import DEFAULT_REFRESH_EVERY, compressed_modules, refresh_patterns

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_table import print_rows  # noqa: E402

MODELS = ("resnet18", "yolov8n")


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out
    return [t for o in items for t in _flat(o)]


def build(name: str, size: int, compression: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dense model and its compressed copy (patterns fixed), both in training mode."""
    torch.manual_seed(0)
    if name == "resnet18":
        dense = __import__("torchvision").models.resnet18()
    else:
        from ultralytics.nn.tasks import DetectionModel
        dense = DetectionModel(f"{name}.yaml", nc=2, verbose=False)
    comp = vbxfx.compress(dense, torch.zeros(1, 3, size, size), compression=compression,
                          refresh_every=None).model
    return dense.train(), comp.train()


def stepper(model: torch.nn.Module, x: torch.Tensor, yolo: bool):
    """One training step of ``model`` on ``x`` (a closure; returns its time in seconds)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    y = torch.randint(0, 1000, (x.shape[0],))
    ema = seen = None
    if yolo:
        from ultralytics.utils.torch_utils import ModelEMA

        from vbxfx.integrations.ultralytics import follow_patterns
        ema, seen = ModelEMA(model), {}

    def step() -> float:
        t0 = time.perf_counter()
        out = model(x)
        loss = sum(t.float().square().mean() for t in _flat(out)) if yolo \
            else F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
            if any(True for _ in compressed_modules(model)):
                follow_patterns(model, ema.ema, seen)
        return time.perf_counter() - t0

    return step


def interleaved(steps: list, rounds: int) -> list[float]:
    """Median step time of each closure, run turn about; the first round warms up."""
    times: list[list[float]] = [[] for _ in steps]
    for r in range(rounds + 1):
        for k, step in enumerate(steps):
            t = step()
            if r:
                times[k].append(t)
    return [statistics.median(t) for t in times]


def projection_time(model: torch.nn.Module, runs: int) -> float:
    """Median seconds of every layer's projection, forward and backward."""
    layers = [layer for _, layer in compressed_modules(model)]
    ones = [torch.ones_like(layer.weight) for layer in layers]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        torch.autograd.backward([layer.compressed_weight() for layer in layers], ones)
        times.append(time.perf_counter() - t)
    for layer in layers:
        layer.weight.grad = None
    return statistics.median(times)


def refresh_time(model: torch.nn.Module, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        refresh_patterns(model)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _config(text: str) -> tuple[int, int]:
    try:
        batch, size = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give BATCHxSIZE, e.g. 8x128") from None
    return batch, size


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument("--configs", type=_config, nargs="+", default=[(8, 128), (32, 64)],
                        metavar="BATCHxSIZE")
    parser.add_argument("--rounds", type=int, default=10, help="turn-about rounds per config")
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--compression", type=float, default=0.66)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    yolo = args.model != "resnet18"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    dense, comp = build(args.model, args.configs[0][1], args.compression)
    t_build = time.perf_counter() - t0
    layers = [layer for _, layer in compressed_modules(comp)]
    weights = sum(layer.weight.numel() for layer in layers)
    refresh = refresh_time(comp, args.refreshes)
    projection = projection_time(comp, 5)
    rows = []
    for batch, size in args.configs:
        x = torch.randn(batch, 3, size, size)
        t_dense, t_comp = interleaved([stepper(dense, x, yolo), stepper(comp, x, yolo)],
                                      args.rounds)
        amortized = t_comp + refresh / DEFAULT_REFRESH_EVERY
        rows.append({"model": args.model, "batch": batch, "size": size, "dense_s": t_dense,
                     "compressed_s": t_comp, "ratio": t_comp / t_dense,
                     "ratio_refresh": amortized / t_dense, "projection_ms": 1e3 * projection,
                     "refresh_s": refresh})
    title = (f"{args.model}, compress({args.compression}) in {t_build:.1f} s: {len(layers)} "
             f"layers, {weights:,} weights; CPU, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {args.rounds} rounds; load average {load:.2f} -> "
             f"{os.getloadavg()[0]:.2f}. projection = forward + backward of every layer's "
             f"projection; + refresh = one refresh of all layers ({refresh:.2f} s) every "
             f"{DEFAULT_REFRESH_EVERY} steps")
    print_rows(title, "| model | batch | size | dense s/step | compressed s/step | ratio "
                      "| + refresh | projection ms |", rows,
               lambda r: (f"| {r['model']} | {r['batch']} | {r['size']} | {r['dense_s']:.3f} | "
                          f"{r['compressed_s']:.3f} | {r['ratio']:.3f}x | "
                          f"{r['ratio_refresh']:.3f}x | {r['projection_ms']:.0f} |"),
               args.json)
    return rows


if __name__ == "__main__":
    main()
