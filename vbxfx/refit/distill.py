"""Label-free recovery: distil the dense model into its compressed copy on unlabeled inputs.

After one-shot compression the compressed model can win back much of what it lost without
labels: the dense model is the teacher, the compressed one the student, and the loss is
``T² · KL(softmax(teacher/T) || softmax(student/T))`` on classifier logits (mean squared
error, normalised by the teacher's energy, on any other output). BatchNorm running
statistics are frozen by default, since a few hundred crops estimate them worse than the
training set did; the compressed layers keep refreshing their patterns as they train.

>>> import torch, vbxfx
>>> from vbxfx.inputs.demo import DemoNet
>>> teacher = DemoNet(); x = torch.randn(1, 3, 64, 64)
>>> student = vbxfx.compress(teacher, x, compression=0.66).model   # doctest: +SKIP
>>> distill(student, teacher, torch.randn(32, 3, 64, 64), steps=5).losses[-1] >= 0  # doctest: +SKIP
True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vbxfx.errors import ConfigError

__all__ = ["distill", "DistillResult", "distillation_loss"]

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    steps: int
    losses: list[float] = field(default_factory=list)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


def distillation_loss(student_out, teacher_out, temperature: float = 1.0) -> torch.Tensor:
    """KL on ``[N, classes]`` logits, else energy-normalised MSE summed over all outputs."""
    s, t = _flat(student_out), _flat(teacher_out)
    if len(s) != len(t) or not s:
        raise ConfigError(f"student and teacher outputs differ ({len(s)} vs {len(t)} tensors)")
    if len(s) == 1 and s[0].dim() == 2:
        tt = temperature
        return F.kl_div(F.log_softmax(s[0] / tt, 1), F.log_softmax(t[0].detach() / tt, 1),
                        log_target=True, reduction="batchmean") * tt * tt
    return sum(F.mse_loss(a, b.detach()) / b.detach().square().mean().clamp_min(1e-12)
               for a, b in zip(s, t) if a.is_floating_point())


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distill(student: nn.Module, teacher: nn.Module, data: torch.Tensor, *, steps: int = 200,
            batch_size: int = 16, lr: float = 1e-4, size: int | None = None,
            temperature: float = 1.0, freeze_bn: bool = True, seed: int = 0,
            progress: bool = False, optimizer: torch.optim.Optimizer | None = None) -> DistillResult:
    """Train ``student`` towards ``teacher`` for ``steps`` steps on batches of ``data``.

    Args:
        data: unlabeled inputs ``[N, C, H, W]``; batches are drawn at random (seeded).
        size: resize the inputs to ``size`` x ``size`` (faster recovery at a lower resolution).
        lr: Adam learning rate (used when no ``optimizer`` is given).

    Raises:
        ConfigError: bad steps/batch size/data.
    """
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ConfigError("distill needs unlabeled inputs as a tensor [N, ...] with N > 0")
    if steps < 0 or batch_size < 1:
        raise ConfigError(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    device = next(student.parameters()).device
    teacher.eval()
    student.train()
    if freeze_bn:
        _freeze_bn(student)
    opt = optimizer or torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    result = DistillResult(steps=steps)
    for _ in tqdm(range(steps), desc="distill", disable=not progress, leave=False):
        idx = torch.randint(data.shape[0], (min(batch_size, data.shape[0]),), generator=g)
        x = data[idx].to(device)
        if size is not None and x.dim() == 4 and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            t_out = teacher(x)
        loss = distillation_loss(student(x), t_out, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
    student.eval()
    logger.info("distill: %d steps, loss %.4f -> %.4f", steps,
                result.losses[0] if result.losses else float("nan"),
                result.losses[-1] if result.losses else float("nan"))
    return result
