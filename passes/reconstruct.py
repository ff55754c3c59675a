"""Reconstruct: refit the compressed layers' kept weights to the dense outputs (calibrated).

A transform pass over a GraphModule that went through :class:`~vbxfx.passes.Rewrite`: it
refits the compressed layers of ``gm.meta["vbxfx.root"]`` (the model the rewrite changed,
for both front ends) to the outputs of the dense ``reference`` on calibration batches. See
:func:`vbxfx.reconstruct.reconstruct` for the method.

>>> gm = vbxfx.trace(model, x)                                              # doctest: +SKIP
>>> Rewrite({"layer1.0.conv1": 2})(gm)                                      # doctest: +SKIP
>>> Reconstruct(model, calib_batches)(gm).details.summary()                 # doctest: +SKIP
'reconstruct (sequential): 2 compressed layer(s) refit from 1 forward(s); mean ...'
"""

from __future__ import annotations

import logging
from typing import Any

import torch.fx
from torch import nn

from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.refit.reconstruct import reconstruct
from vbxfx.analysis.trace import get_root

__all__ = ["Reconstruct"]

logger = logging.getLogger(__name__)


class Reconstruct(GraphPass):
    """Transform pass (in place): refit the compressed layers (keeps every pattern).

    Args:
        reference: the dense model the GraphModule was traced from (not modified).
        calib_data: a Tensor batch or an iterable of batches.
        **options: the keyword options of :func:`vbxfx.reconstruct.reconstruct`
            (``method``, ``pattern``, ``damp``, ``progress``, ...).

    Returns ``PassResult(gm, modified, details=ReconstructResult)``.

    Raises:
        ConfigError: see :func:`vbxfx.reconstruct.reconstruct`; raised before any change.
    """

    in_place = True
    changes_input = True

    def __init__(self, reference: nn.Module, calib_data: Any, **options: Any):
        self.reference = reference
        self.calib_data = calib_data
        self.options = options

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        result = reconstruct(get_root(gm), self.reference, self.calib_data, **self.options)
        return PassResult(gm, modified=bool(result.layers), details=result)
