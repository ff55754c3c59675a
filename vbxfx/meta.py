"""Namespaced ``node.meta`` keys and accessors.

Analysis results live in ``node.meta`` under the keys below, never as attributes on
nodes or modules. Read them through :func:`get_meta`, which fails with a message that
says which pass to run when the key is missing.
"""

from __future__ import annotations

from typing import Any

import torch.fx

__all__ = ["LAYER_KEY", "REPEAT_KEY", "SENSITIVITY_KEY", "get_meta", "has_meta"]

#: vbxfx.passes.analyze_layers.AnalyzeLayers writes a LayerInfo per Conv2d/Linear call.
LAYER_KEY = "vbxfx.layer"
#: vbxfx.passes.allocate.Allocate writes the chosen repeat (1, 2 or 4) per layer call.
REPEAT_KEY = "vbxfx.repeat"
#: The allocation pass writes the per-level sensitivity it used.
SENSITIVITY_KEY = "vbxfx.sensitivity"

_PRODUCERS = {
    LAYER_KEY: "vbxfx.passes.AnalyzeLayers",
    REPEAT_KEY: "vbxfx.passes.Allocate",
    SENSITIVITY_KEY: "vbxfx.passes.Allocate",
}


def has_meta(node: torch.fx.Node, key: str) -> bool:
    return key in node.meta


def get_meta(node: torch.fx.Node, key: str) -> Any:
    """Return ``node.meta[key]`` or raise a KeyError naming the pass that writes it."""
    try:
        return node.meta[key]
    except KeyError:
        producer = _PRODUCERS.get(key, "the pass that writes it")
        raise KeyError(
            f"node {node.format_node()} has no {key!r} entry: run {producer} first"
        ) from None
