"""Helpers for users' own test suites.

>>> import vbxfx.testing                                                      # doctest: +SKIP
>>> vbxfx.testing.assert_onnx_equivalent(model, "model.onnx", torch.randn(1, 3, 224, 224))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vbxfx.model_state import float_dtype, require_real_tensors
from vbxfx.check.tolerances import tolerances_for

__all__ = ["assert_onnx_equivalent"]


def assert_onnx_equivalent(torch_model: torch.nn.Module, onnx_path: str | os.PathLike,
                           inputs: Any, rtol: float | None = None,
                           atol: float | None = None) -> None:
    """Assert that onnxruntime and torch agree on ``inputs`` (a Tensor, a tuple of Tensors,
    or a list of such sets): ``max|onnx - torch| <= atol + rtol * max|torch|`` per output.
    ``rtol`` / ``atol`` default to those of the model's dtype (:mod:`vbxfx.check.tolerances`).

    Raises:
        AssertionError: naming the input set, the output and its max abs / rel error.
        vbxfx.CheckError: the file, the model (e.g. on the meta device) or the inputs cannot
            be used.
    """
    import onnxruntime as ort

    from vbxfx.check.onnx_check import _in_file_dtype, _input_sets
    from vbxfx.errors import CheckError
    from vbxfx.export.numerics import (_input_specs, _rounded, _validate, compare_arrays,
                                        run_torch, runnable)
    from vbxfx.export.reader import load_onnx

    require_real_tensors(torch_model, "assert_onnx_equivalent", CheckError)
    dtype = float_dtype(torch_model)
    default_rtol, default_atol = tolerances_for(dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    load_onnx(onnx_path, load_external_data=False)  # one-line errors for missing / not ONNX
    session = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    specs = _input_specs(session)
    torch_model = runnable(torch_model)
    names = [o.name for o in session.get_outputs()]
    sets = _input_sets(inputs, None)
    if dtype != torch.float32:       # inputs given in the model's dtype; the file is float32
        sets = _in_file_dtype(sets, dtype)
    for label, arrays in sets:
        feed = _validate(label, arrays, specs)
        if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
            feed = _rounded(feed, dtype)
        outs = session.run(None, feed)
        refs = run_torch(torch_model, tuple(feed.values()))
        if len(outs) != len(refs):
            raise AssertionError(f"{label}: the torch model returns {len(refs)} tensor(s), "
                                 f"{onnx_path} {len(outs)} output(s)")
        for name, out, ref in zip(names, outs, refs):
            max_abs, max_rel, ok = compare_arrays(out, ref, rtol, atol)
            if not ok:
                raise AssertionError(
                    f"{label}: output {name!r} of {os.fspath(onnx_path)} differs from torch: "
                    f"max abs error {max_abs:.3g}, max rel error {max_rel:.3g} (shape "
                    f"{list(np.shape(out))} vs {list(np.shape(ref))}; atol {atol:g}, "
                    f"rtol {rtol:g} of max|torch|)")
