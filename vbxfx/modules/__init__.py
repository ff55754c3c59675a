"""Compressed layers for fine-tuning in the VectorBlox formats, and their annotations.

>>> import torch
>>> from vbxfx.modules import VBXLinear, is_compressed
>>> fc = VBXLinear.from_dense(torch.nn.Linear(16, 4), repeat=2)
>>> is_compressed(fc), fc.encoding().repeat
(True, 2)
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from vbxfx.modules.annotation import LayerAnnotation
from vbxfx.modules.compressed import VBXConv2d, VBXLinear, from_dense, is_compressed
from vbxfx.modules.mixin import DEFAULT_REFRESH_EVERY, FORMATS, CompressedMixin

__all__ = ["VBXConv2d", "VBXLinear", "CompressedMixin", "LayerAnnotation", "is_compressed",
           "from_dense", "compressed_modules", "refresh_patterns", "freeze_patterns",
           "DEFAULT_REFRESH_EVERY", "FORMATS"]


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, CompressedMixin]]:
    """``(fqn, layer)`` for every compressed layer of ``model`` (each layer once)."""
    for name, module in model.named_modules():
        if is_compressed(module):
            yield name, module


def refresh_patterns(model: nn.Module) -> int:
    """Recompute the pattern of every compressed, not frozen layer; return how many."""
    done = 0
    for _, module in compressed_modules(model):
        if not module.frozen:
            module.refresh_pattern()
            done += 1
    return done


def freeze_patterns(model: nn.Module) -> int:
    """Freeze the pattern of every compressed layer; return how many."""
    layers = [m.freeze() for _, m in compressed_modules(model)]
    return len(layers)
