"""ChannelFlow: how the output channels of each layer reach the input channels of the next.

Run after :class:`vbxfx.passes.AnalyzeLayers` (it reads the layer records and the
``tensor_meta`` shapes that pass writes). The result, in ``PassResult.details``, is a
``networkx.DiGraph`` with these nodes (attribute ``type``):

- ``"layer"``: a Conv/Linear layer by its fully-qualified name (attributes ``kind``,
  ``eligible``, ``in_channels``, ``out_channels``). Depthwise convolutions map channel ``c``
  to channel ``c`` and are passed through rather than made nodes (they appear in ``through``);
- ``"input"`` (``"input"``, or ``"input:<name>"`` with several inputs) and ``"output"``;
- joins: ``"cat"`` (``"cat:<fx node>"``), ``"add"`` (elementwise add/sub, or a cat/stack
  along another dimension: channel ``c`` of every input meets channel ``c``), ``"mul"``
  (an elementwise product such as a squeeze-excitation gate);
- ``"split"``: one piece of a ``chunk`` / ``split`` / channel slice (``"chunk:<fx node>"``);
- ``"opaque"``: an op the flow does not follow (attention, a reshape that mixes channels...).

Each edge has ``kind`` (``"unchanged"``, ``"concat"``, ``"add"``, ``"mul"``, ``"chunk"``,
``"split"``, ``"reshape"`` when the consumer sees the channels reshaped, ``"opaque"``),
``channels`` (how many flow along it), ``offset`` (``concat``: where they land in the join's
output; ``chunk``/``split``: where the piece starts in the source; 0 otherwise), ``offsets``
(every offset when one source feeds a cat twice) and ``through`` (the parametrised modules
passed on the way that hold parameters or buffers: BatchNorm, LayerNorm, depthwise
convolutions...; the same names from both front ends).

>>> gm = vbxfx.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
>>> AnalyzeLayers()(gm); flow = ChannelFlow()(gm).details                          # doctest: +SKIP
>>> flow.edges["layer1.0.conv1", "layer1.0.conv2"]                                 # doctest: +SKIP
{'kind': 'unchanged', 'channels': 64, 'offset': 0, 'offsets': (0,), 'through': ('layer1.0.bn1',)}
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from vbxfx.analysis.channel_graph import FlowGraphBuilder
from vbxfx.passes.base import GraphPass, PassResult

__all__ = ["ChannelFlow", "FLOW_KEY"]

logger = logging.getLogger(__name__)

#: ``gm.meta`` key of the last ChannelFlow graph.
FLOW_KEY = "vbxfx.channel_flow"


class ChannelFlow(GraphPass):
    """Analysis pass: the channel-flow DiGraph between layers (see the module docstring).

    Raises:
        KeyError: AnalyzeLayers has not run on the GraphModule.
    """

    in_place = True
    changes_input = False

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
            raise KeyError("ChannelFlow needs the shapes AnalyzeLayers records: run "
                           "vbxfx.passes.AnalyzeLayers first")
        builder = FlowGraphBuilder(gm)
        for node in gm.graph.nodes:
            builder.visit(node)
        graph = builder.graph
        gm.meta[FLOW_KEY] = graph
        logger.info("ChannelFlow: %d nodes, %d edges", graph.number_of_nodes(),
                    graph.number_of_edges())
        return PassResult(gm, modified=False, details=graph)
