"""Graph passes over torch.fx GraphModules (importable as ``vbxfx.passes``)."""

from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.passes.analyze_layers import AnalyzeLayers
from vbxfx.passes.channel_flow import ChannelFlow
from vbxfx.passes.finalize import Finalize
from vbxfx.passes.rewrite import Rewrite
from vbxfx.passes.allocate import Allocate
from vbxfx.passes.reconstruct import Reconstruct
from vbxfx.passes.shrink import Shrink

__all__ = ["GraphPass", "PassResult", "AnalyzeLayers", "ChannelFlow", "Allocate", "Rewrite",
           "Reconstruct", "Finalize", "Shrink"]
