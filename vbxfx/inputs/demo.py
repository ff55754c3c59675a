"""A small CNN that ships with vbxfx, so the whole pipeline runs with no download.

``DemoNet`` is a compact residual classifier (64x64 RGB input, 10 classes) with plain,
strided, 1x1, depthwise and fully connected layers, so the demo shows every kind of layer
the analysis reports: eligible convolutions, a 3-channel stem padded to 8, an ineligible
depthwise convolution, and a Linear head treated as a 1x1 convolution.
The weights are a fixed seeded initialisation: the demo is about the pipeline, not accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoNet"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class DemoNet(nn.Module):
    """``DemoNet()(torch.randn(1, 3, 64, 64)).shape == (1, 10)``."""

    example_input_shape = (1, 3, 64, 64)

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.layer1 = _Block(32, 32, 1)
            self.layer2 = _Block(32, 64, 2)
            self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=64, bias=False),
                                    nn.BatchNorm2d(64), nn.ReLU())
            self.layer3 = _Block(64, 128, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(128, num_classes)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):   # non-trivial statistics, as after training
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.data.uniform_(0.5, 1.5)
                    m.bias.data.uniform_(-0.1, 0.1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.dw(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))
