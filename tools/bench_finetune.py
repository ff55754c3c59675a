"""Training-step time of a compressed vs the dense torchvision resnet18 (CPU), and refresh cost.

A step is forward + backward + SGD step (momentum 0.9) on one batch. The compressed model
comes from ``vbxfx.compress_vbx3(model, 0.66)``; its patterns are fixed while timing
(``refresh_every=None``), so the table shows the cost between refreshes; one refresh of
every layer (``vbxfx.modules.refresh_patterns``) is timed separately. Dense and compressed
steps alternate round by round, so load from other processes hits both alike; the ratio
is of the medians. The projections' own forward + backward time is printed too, a number
that load disturbs less than whole steps.

    .venv/bin/python tools/bench_finetune.py [--batch 16] [--size 224] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vbxfx
from vbxfx.modules import DEFAULT_REFRESH_EVERY, compressed_modules, refresh_patterns


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per model per round")
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--compression", type=float, default=0.66)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    torchvision = __import__("torchvision")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = torchvision.models.resnet18().train()
    comp = torchvision.models.resnet18().train()
    comp.load_state_dict(dense.state_dict())
    t0 = time.perf_counter()
    report = vbxfx.compress_vbx3(comp, args.compression, refresh_every=None)
    t_compress = time.perf_counter() - t0
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    models = {"dense": dense, "vbxfx": comp}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    for k, m in models.items():  # warm-up
        _step(m, opts[k], x, y)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                _step(m, opts[k], x, y)
                times[k].append(time.perf_counter() - t)
    layers = [layer for _, layer in compressed_modules(comp)]
    ones = [torch.ones_like(layer.weight) for layer in layers]
    projection = []
    for _ in range(args.rounds):  # the compressed model's only extra work between refreshes
        t = time.perf_counter()
        torch.autograd.backward([layer.compressed_weight() for layer in layers], ones)
        projection.append(time.perf_counter() - t)
    refresh = []
    for _ in range(args.refreshes):
        t = time.perf_counter()
        refresh_patterns(comp)
        refresh.append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"resnet18, batch {args.batch}, {args.size}x{args.size}, CPU, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; compress_vbx3({args.compression}) took "
          f"{t_compress:.1f} s, {len(list(compressed_modules(comp)))} layers, "
          f"{report['weights_removed']:.3f} of the weights removed")
    print(f"{'model':<8} {'median s/step':>14} {'min':>8} {'max':>8} {'steps':>6} {'ratio':>7}")
    for k in models:
        v = times[k]
        print(f"{k:<8} {med[k]:>14.3f} {min(v):>8.3f} {max(v):>8.3f} {len(v):>6} "
              f"{med[k] / med['dense']:>6.3f}x")
    p = statistics.median(projection)
    print(f"weight projections alone (forward + backward, all layers): median {1e3 * p:.0f} ms "
          f"= {100 * p / med['dense']:.1f}% of a dense step")
    r = statistics.median(refresh)
    print(f"one refresh of all layers: median {r:.2f} s (min {min(refresh):.2f}, "
          f"{len(refresh)} runs) = {r / med['dense']:.1f} dense steps; at the default "
          f"refresh_every={DEFAULT_REFRESH_EVERY} that adds "
          f"{100 * r / (DEFAULT_REFRESH_EVERY * med['vbxfx']):.1f}% per step on average")


if __name__ == "__main__":
    main()
