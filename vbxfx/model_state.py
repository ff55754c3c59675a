"""Checks of a user's model that every entry point runs before it changes anything.

>>> import torch
>>> model = torch.nn.Linear(4, 2, device="meta")
>>> require_real_tensors(model, "compress")
Traceback (most recent call last):
    ...
vbxfx.errors.ConfigError: compress: the model's parameter 'weight' is on the meta device (it has a shape but no values); materialize it first, e.g. model.to_empty(device="cpu") then model.load_state_dict(torch.load("weights.pt"))
>>> float_dtype(torch.nn.Linear(4, 2).half())
torch.float16
"""

from __future__ import annotations

import torch
from torch import nn

from vbxfx.errors import ConfigError

__all__ = ["require_real_tensors", "float_dtype"]


def require_real_tensors(model: nn.Module, what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` when a parameter or buffer of ``model`` is on the meta device."""
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise error(f"{what}: the model's {kind} {name!r} is on the meta device (it has "
                            "a shape but no values); materialize it first, e.g. "
                            'model.to_empty(device="cpu") then '
                            'model.load_state_dict(torch.load("weights.pt"))')


def float_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype of the model's parameters and buffers (float32 when
    it has none)."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if not dtypes:
        return torch.float32
    return max(dtypes, key=lambda d: torch.finfo(d).eps)
