"""Allocation: which repeat (1:4, 2:4, dense) each layer gets, in one global budget.

- :mod:`vbxfx.allocation.sensitivity`: the cost of each level for each layer (weight,
  output divergence, a user's eval function);
- :mod:`vbxfx.allocation.knapsack`: the exact multiple-choice knapsack over those costs;
- :mod:`vbxfx.allocation.overrides`: per-layer overrides (the seed's ``json_file``).

The pass is :class:`vbxfx.passes.Allocate` (:func:`vbxfx.allocate`).
"""

from vbxfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "vbxfx.allocation.knapsack": ("solve_mckp", "lp_bound", "KnapsackResult"),
    "vbxfx.allocation.overrides": ("load_overrides", "resolve_overrides", "merged_overrides"),
    "vbxfx.allocation.sensitivity": ("weight_sensitivity", "output_sensitivity",
                                     "eval_fn_sensitivity", "layer_statistics"),
})
