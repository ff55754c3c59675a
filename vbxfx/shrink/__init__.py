"""Physically smaller layers: channel pruning and low-rank factors, before the VBX levels.

- :mod:`vbxfx.shrink.slicing`: smaller copies of Conv2d / Linear / BatchNorm / depthwise
  layers, and a layer as two low-rank factors;
- :mod:`vbxfx.shrink.apply`: a :class:`~vbxfx.shrink.apply.ShrinkPlan` applied to a model.

The channel groups come from :mod:`vbxfx.analysis.channel_groups`, the plan from
:mod:`vbxfx.allocation.joint`, the pass is :class:`vbxfx.passes.Shrink`, and
``vbxfx.compress(..., methods=...)`` (:mod:`vbxfx.pipeline.methods`) runs them all.
"""
