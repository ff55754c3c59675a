"""Graph passes over torch.fx GraphModules (importable as ``vbxfx.passes``)."""

from vbxfx.passes.base import GraphPass, PassResult

__all__ = ["GraphPass", "PassResult"]
