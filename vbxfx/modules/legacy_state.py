"""Reading what vbxfx 0.1.0 saved: a compressed layer's ``mask``, ``pair_index`` and
``pair_sign`` buffers and its dict ``_extra_state`` become ``vbx_pattern`` and ``vbx_state``.

Both ways a checkpoint was written are read: a ``state_dict`` (rewritten key by key before
torch loads it) and a pickled whole module (``torch.save(model)``, ultralytics checkpoints),
converted when it is unpickled. Saving again writes the current layout.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vbxfx.errors import ConfigError, FormatError
from vbxfx.modules.pattern_code import pack_pattern

__all__ = ["upgrade_v1_state_dict", "upgrade_v1_module"]

logger = logging.getLogger(__name__)

_V1_KEYS = ("mask", "pair_index", "pair_sign")
def _v1_state_values(layer: Any, extra: Any, where: str) -> list[int]:
    keys = {"version", "refresh_every", "frozen", "steps", "pairing", "compression"}
    if not isinstance(extra, dict) or set(extra) != keys or extra["version"] != 1:
        raise ConfigError(f"{where}: unreadable vbxfx 0.1.0 layer state {extra!r} (expected the "
                          f"keys {sorted(keys)}, version 1)")
    layer._vbx_refresh_every = extra["refresh_every"]
    layer._vbx_frozen = bool(extra["frozen"])
    layer._vbx_steps = int(extra["steps"])
    layer._vbx_pairing = bool(extra["pairing"])
    layer._vbx_compression = extra["compression"]
    return list(layer._vbx_state_values())


def upgrade_v1_state_dict(state_dict: dict, prefix: str, layer: Any) -> None:
    """Rewrite a vbxfx 0.1.0 layer entry (mask, pair_index, pair_sign, _extra_state) in place."""
    old = [prefix + k for k in _V1_KEYS]
    if prefix + "vbx_pattern" in state_dict or not all(k in state_dict for k in old):
        return
    where = prefix[:-1] or "root"
    repeat = state_dict.get(prefix + "vbx_repeat", layer.vbx_repeat)
    fmt = "ucomp" if int(repeat) == 0 else "comp"
    mask, index, sign = (state_dict.pop(k) for k in old)
    if tuple(mask.shape) != tuple(layer.weight.shape):
        raise FormatError(f"the saved mask has shape {tuple(mask.shape)}, the layer's weight "
                          f"{tuple(layer.weight.shape)}")
    state_dict[prefix + "vbx_pattern"] = pack_pattern(mask.bool(), index, sign, fmt)
    extra = state_dict.pop(prefix + "_extra_state", None)
    if extra is not None:
        state_dict[prefix + "vbx_state"] = torch.tensor(_v1_state_values(layer, extra, where))
    else:
        state_dict[prefix + "vbx_state"] = torch.tensor(layer._vbx_state_values())
    logger.info("%s: read a vbxfx 0.1.0 layer state; save again to write the current format",
                where)


def upgrade_v1_module(layer: Any) -> None:
    """A layer unpickled from vbxfx 0.1.0: its pattern buffers become vbx_pattern/vbx_state."""
    buffers = layer._buffers
    if not all(k in buffers for k in _V1_KEYS):
        raise ConfigError(f"{layer._vbx_label()}: this pickled vbxfx layer holds neither "
                          "vbx_pattern nor the mask/pair_index/pair_sign of vbxfx 0.1.0; "
                          "rebuild it with VBXConv2d/VBXLinear.from_dense")
    layer._vbx_state_written = None
    fmt = "ucomp" if int(buffers["vbx_repeat"]) == 0 else "comp"
    code = pack_pattern(buffers["mask"].bool(), buffers["pair_index"], buffers["pair_sign"], fmt)
    for k in _V1_KEYS:
        del buffers[k]
    layer.register_buffer("vbx_pattern", code)
    layer.register_buffer("vbx_state", torch.tensor(layer._vbx_state_values(),
                                                    device=code.device))
