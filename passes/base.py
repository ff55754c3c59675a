"""The pass contract shared by every vbxfx graph pass.

A pass is a small object with a ``__call__(gm) -> PassResult``. It declares whether it
works in place (``in_place``) and whether it can change its input at all
(``changes_input``), like onnx-ir's passes. Analysis passes write typed records into
``node.meta`` and return ``modified=False``; transform passes return the (possibly new)
module and ``modified=True`` when they changed something.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch.fx

__all__ = ["PassResult", "GraphPass"]


@dataclass
class PassResult:
    """What a pass hands back: the module, whether it changed, and pass-specific output."""

    module: torch.fx.GraphModule
    modified: bool
    details: Any = field(default=None)


class GraphPass(abc.ABC):
    """Base class of the vbxfx passes.

    Subclasses set the two class-level flags and implement :meth:`call`.
    """

    #: The pass mutates the GraphModule it is given (rather than a copy).
    in_place: bool = True
    #: The pass can change its input at all (False for analysis passes).
    changes_input: bool = True

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        if not isinstance(gm, torch.fx.GraphModule):
            raise TypeError(
                f"{type(self).__name__} takes a torch.fx.GraphModule, got {type(gm).__name__}; "
                "trace the model first with vbxfx.trace(model, example_inputs)"
            )
        return self.call(gm)

    @abc.abstractmethod
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        """Run the pass."""
