"""Finalize: turn every compressed layer back into a plain nn.Conv2d / nn.Linear.

The plain layer holds the compressed weight (checked to fit its format after int8
quantization, as the toolchain sees it), and the returned :class:`LayerAnnotation` carries
an encoding derived from that final weight, so that the two always agree.

>>> import torch, vbxfx
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 4))
>>> _ = vbxfx.compress_vbx3(model, 0.75)
>>> plain, notes = vbxfx.finalize(model)
>>> type(plain[0]).__name__, notes["0"].repeat, vbxfx.is_compressed(model[0])
('Linear', 1, True)
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

from vbxfx.errors import FormatError
from vbxfx.format import encode_unstructured, encode_weight, require_fit, unstructured_macs
from vbxfx.modules import CompressedMixin, LayerAnnotation, is_compressed
from vbxfx.modules.swap import replace_module
from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.analysis.trace import FRONTEND_KEY, ROOT_KEY

__all__ = ["Finalize", "finalize", "annotate"]

logger = logging.getLogger(__name__)


def annotate(name: str, layer: CompressedMixin) -> LayerAnnotation:
    """The annotation of a compressed layer, its encoding derived from its compressed weight.

    Raises:
        FormatError: the compressed weight does not fit the layer's format (a bug).
    """
    with torch.no_grad():
        w = layer.compressed_weight().detach().float().cpu()
    if layer.fmt == "comp":
        require_fit(w, layer.repeat, what=f"layer {name!r}")
        return LayerAnnotation(name, "comp", layer.repeat, encode_weight(w, layer.repeat))
    budget = round((1.0 - layer.compression) * w.numel())
    used = unstructured_macs(w)
    if used > budget:
        raise FormatError(f"layer {name!r}: {used} multiplies per output position after int8 "
                          f"quantization, above its budget of {budget}")
    return LayerAnnotation(name, "ucomp", 0, encode_unstructured(w))


def _finalize_in(containers: list[nn.Module]) -> dict[str, LayerAnnotation]:
    notes: dict[str, LayerAnnotation] = {}
    plain_of: dict[int, nn.Module] = {}
    for name, module in list(containers[0].named_modules(remove_duplicate=False)):
        if not is_compressed(module):
            continue
        if id(module) not in plain_of:
            notes[name] = annotate(name, module)
            plain_of[id(module)] = module.to_dense()
        replace_module(containers, name, module, plain_of[id(module)])
    return notes


def finalize(model: nn.Module, *,
             inplace: bool = False) -> tuple[nn.Module, dict[str, LayerAnnotation]]:
    """Replace every compressed layer of ``model`` by a plain layer with its compressed weight.

    Args:
        model: any module (a GraphModule from vbxfx.trace too: its root is finalized with it).
        inplace: change ``model`` itself; by default a deep copy is finalized and returned.

    Returns:
        ``(model, {fqn: LayerAnnotation})``.

    Raises:
        FormatError: a compressed weight that does not fit its format.
    """
    if not inplace:
        model = copy.deepcopy(model)
    containers = [model]
    root = getattr(model, "meta", {}).get(ROOT_KEY) if isinstance(model, torch.fx.GraphModule) \
        else None
    if root is not None and root is not model:
        containers = [root, model] if model.meta.get(FRONTEND_KEY) != "export" else [root]
    notes = _finalize_in(containers)
    if root is not None and root is not model and model.meta.get(FRONTEND_KEY) != "export":
        notes.update(_finalize_in([model]))  # layers only the GraphModule holds
    if isinstance(model, torch.fx.GraphModule) and notes:
        model.graph.lint()
        model.recompile()
    logger.info("finalize: %d compressed layer(s) made plain", len(notes))
    return model, notes


class Finalize(GraphPass):
    """Transform pass (in place): :func:`finalize` on a traced GraphModule and its root.

    Returns ``PassResult(gm, modified, details={fqn: LayerAnnotation})``.
    """

    in_place = True
    changes_input = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        gm, notes = finalize(gm, inplace=True)
        return PassResult(gm, modified=bool(notes), details=notes)
