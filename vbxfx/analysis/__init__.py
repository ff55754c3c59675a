"""Analysis: the model as a torch.fx graph and what each Conv2d/Linear costs.

- :mod:`vbxfx.analysis.trace`: :func:`~vbxfx.analysis.trace.trace` (symbolic_trace, then
  torch.export) and the helpers that run a graph without touching the caller's model;
- :mod:`vbxfx.analysis.trace_errors`: the TraceError that says where tracing stopped;
- :mod:`vbxfx.analysis.layers`: the typed records :class:`LayerInfo` / :class:`LayerTable`;
- :mod:`vbxfx.analysis.layer_records`: the building blocks of the AnalyzeLayers pass;
- :mod:`vbxfx.analysis.weight_use`: layers whose weight a parent module reads directly;
- :mod:`vbxfx.analysis.op_macs`: multiplies of every ATen operator, counted from shapes.

The pass itself is :class:`vbxfx.passes.AnalyzeLayers`; :func:`vbxfx.analyze` runs both.
"""

from vbxfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "vbxfx.analysis.trace": ("trace", "get_root", "eval_mode", "preserved_state",
                             "run_shapes_only"),
    "vbxfx.analysis.layers": ("LayerInfo", "LayerTable", "OpInfo"),
    "vbxfx.analysis.weight_use": ("direct_weight_readers", "called_layers"),
    "vbxfx.analysis.op_macs": ("MacCounter",),
})
