"""The digits task of the fine-tuning tests and of bench_quality: scikit-learn's 8x8 digits
(1437 training, 360 test images, a fixed split), a small CNN, SGD with a cosine schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 32


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``; images ``[N, 1, 8, 8]`` scaled to [0, 1]."""
    from sklearn import datasets

    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1437], perm[1437:]
    return x[train], y[train], x[test], y[test]


def digits_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, data, epochs: int, lr: float, seed: int,
          opt: torch.optim.Optimizer | None = None,
          after_step: Callable[[], None] | None = None) -> nn.Module:
    """``epochs`` epochs of cross-entropy on the training half of ``data`` (SGD momentum 0.9,
    weight decay 1e-4 unless ``opt`` is given; cosine schedule); ``after_step`` runs after
    every optimizer step. Returns the model in eval mode."""
    xtr, ytr = data[0], data[1]
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = max(1, epochs * -(-len(xtr) // BATCH))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(order), BATCH):
            b = order[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(xtr[b]), ytr[b]).backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Top-1 accuracy (a fraction) on the test half of ``data``."""
    model.eval()
    return float((model(data[2]).argmax(1) == data[3]).float().mean())
