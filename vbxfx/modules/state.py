"""How a compressed layer saves and restores itself: ``state_dict`` and pickling.

``state_dict`` holds tensors only (see :mod:`vbxfx.modules.mixin`): ``vbx_pattern`` and the
int64 ``vbx_state`` = (layout version, step counter, ``refresh_every`` or -1, flags
frozen | pairing, float64 bits of ``compression`` or NaN). Pickles (``copy.deepcopy``,
``torch.save`` of the module) leave out the buffers derived from ``vbx_pattern`` and
rebuild them when unpickled.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from vbxfx.errors import ConfigError, FormatError
from vbxfx.modules.legacy_state import upgrade_v1_module, upgrade_v1_state_dict

__all__ = ["LayerStateMixin", "STATE_VERSION"]

STATE_VERSION = 2                    # layout of vbx_state; 1 was the dict _extra_state of 0.1.0
_DERIVED = ("mask", "pair_index", "pair_sign", "vbx_coef_a", "vbx_coef_b", "vbx_gather_index")
_FROZEN, _PAIRING = 1, 2             # vbx_state flag bits


class LayerStateMixin:
    """``state_dict`` / pickling of a compressed layer (the layer's methods do the rest)."""

    # ------------------------------------------------------------------ state_dict
    def _vbx_state_values(self) -> tuple[int, ...]:
        flags = (_FROZEN if self._vbx_frozen else 0) | (_PAIRING if self._vbx_pairing else 0)
        c = self._vbx_compression
        bits = torch.tensor(math.nan if c is None else float(c), dtype=torch.float64)
        return (STATE_VERSION, int(self._vbx_steps),
                -1 if self._vbx_refresh_every is None else int(self._vbx_refresh_every),
                flags, int(bits.view(torch.int64)))

    def _vbx_read_state(self, values: list[int], where: str) -> None:
        version, steps, refresh_every, flags, bits = values
        if version != STATE_VERSION or steps < 0 or refresh_every == 0 or refresh_every < -1 \
                or flags & ~(_FROZEN | _PAIRING):
            raise ConfigError(f"{where}: unreadable vbxfx layer state {values} (expected "
                              f"version {STATE_VERSION}, steps >= 0, refresh_every >= 1 or -1)")
        c = float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))
        self._vbx_steps = steps
        self._vbx_refresh_every = None if refresh_every == -1 else refresh_every
        self._vbx_frozen = bool(flags & _FROZEN)
        self._vbx_pairing = bool(flags & _PAIRING)
        self._vbx_compression = None if math.isnan(c) else c

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        values = self._vbx_state_values()
        if values != self._vbx_state_written:   # one small copy, only when something changed
            with torch.no_grad():
                self.vbx_state.copy_(torch.tensor(values, dtype=torch.int64))
            self._vbx_state_written = values
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        error_msgs = args[-1]
        where = prefix[:-1] or "root"
        try:
            upgrade_v1_state_dict(state_dict, prefix, self)
            saved = state_dict.get(prefix + "vbx_repeat")
            if saved is not None and (int(saved) == 0) != (self.fmt == "ucomp"):
                raise ConfigError(f"the saved layer is in the {'ucomp' if int(saved) == 0 else 'comp'}"
                                  f" format, this one in {self.fmt!r}; build the layer in the "
                                  "saved format (from_dense(..., fmt=...)) before loading")
        except (ConfigError, FormatError) as e:
            error_msgs.append(f"{where}: {e}")
            return
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "vbx_state" not in state_dict or prefix + "vbx_pattern" not in state_dict:
            return                         # reported as missing keys by torch (strict loads)
        try:
            self._vbx_read_state(self.vbx_state.tolist(), where)
            self._vbx_state_written = None
            self._vbx_decode_pattern()
        except (ConfigError, FormatError) as e:
            error_msgs.append(f"{where}: {e}")

    # ------------------------------------------------------------------ pickling
    # A pickle (torch.save of the module, ultralytics' checkpoints) carries vbx_pattern and
    # leaves out the derived buffers, rebuilt when it is loaded; a deep copy copies them
    # (decoding again would cost 10x the copy on yolov8n). The rebuild is eager, never lazy:
    # a tracer (torch.onnx.export, torch.export) must not meet the decoding ops.
    def __getstate__(self) -> dict[str, Any]:
        """The module's state without the buffers derived from ``vbx_pattern``."""
        state = self.__dict__.copy()
        buffers = state["_buffers"].copy()
        for name in _DERIVED:
            buffers.pop(name, None)
        state["_buffers"] = buffers
        state["_vbx_state_written"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "vbx_pattern" not in self._buffers:      # a module pickled by vbxfx 0.1.0
            upgrade_v1_module(self)
        self._vbx_decode_pattern()

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        nn.Module.__setstate__(new, copy.deepcopy(self.__dict__, memo))
        return new
