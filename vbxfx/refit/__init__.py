"""The calibrated refit's parts (the entry point is :func:`vbxfx.reconstruct`).

- :mod:`vbxfx.refit.rows`: a layer's least-squares problem from sampled activation rows;
- :mod:`vbxfx.refit.solve`: least squares inside a pattern (PCG), and unconstrained;
- :mod:`vbxfx.refit.obs`: the pattern chosen on the data (OBS inside the pairing format);
- :mod:`vbxfx.refit.layer`: one layer refit in place;
- :mod:`vbxfx.refit.sequential`: the compressed and dense models run side by side;
- :mod:`vbxfx.refit.sensitivity`: per-level costs after the refit, for the allocation.
"""
