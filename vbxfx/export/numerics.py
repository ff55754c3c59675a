"""onnxruntime vs torch on input sets: the numerical part of :func:`vbxfx.check_onnx`.

An output passes when ``max|onnx - torch| <= atol + rtol * max|torch|``: the tolerance
scales with the output's own magnitude, so a near-zero element of a large output does not
need the impossible relative accuracy an element-wise test would ask of it.

>>> out = np.array([1.0, 2.0]); ref = np.array([1.0, 2.0001])
>>> max_abs, max_rel, ok = compare_arrays(out, ref, rtol=1e-4, atol=0.0)
>>> round(max_abs, 6), round(max_rel, 6), ok
(0.0001, 5e-05, True)
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vbxfx.errors import CheckError
from vbxfx.export.selections import (RecordSelections, match, outputs_after, selections,
                                     with_selection_outputs)

__all__ = ["OutputRow", "compare", "compare_arrays", "run_onnx", "run_torch", "runnable",
           "ORT_DTYPES"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputRow:
    """onnxruntime vs torch on one output for one input set."""

    inputs: str
    output: str
    max_abs: float
    max_rel: float          # max_abs / max|torch output|
    ok: bool

#: onnxruntime's input type strings and the numpy dtypes they take.
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(bool)": np.bool_}


def compare_arrays(out: np.ndarray, ref: np.ndarray, rtol: float, atol: float
                   ) -> tuple[float, float, bool]:
    """``(max_abs, max_rel, ok)`` of ``out`` against the reference ``ref``."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        return float("inf"), float("inf"), False
    if out.size == 0:
        return 0.0, 0.0, True
    if not (np.isnan(out) == np.isnan(ref)).all():
        return float("inf"), float("inf"), False
    diff = np.abs(out - ref)
    diff[np.isnan(ref) | (np.isinf(ref) & (out == ref))] = 0.0
    finite = np.isfinite(ref)
    max_abs = float(diff.max())
    scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel, bool(max_abs <= atol + rtol * scale)


def _input_specs(session) -> list[tuple[str, tuple, Any]]:
    specs = []
    for i in session.get_inputs():
        dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in (i.shape or ()))
        specs.append((i.name, dims, ORT_DTYPES.get(i.type)))
    return specs


def _validate(label: str, arrays: tuple, specs: list) -> dict[str, np.ndarray]:
    if len(arrays) != len(specs):
        raise CheckError(f"{label}: {len(arrays)} array(s) given, the ONNX model takes "
                         f"{len(specs)} input(s) ({', '.join(s[0] for s in specs)})")
    feed = {}
    for array, (name, dims, dtype) in zip(arrays, specs):
        want = "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"
        bad_shape = array.ndim != len(dims) or any(d is not None and d != s
                                                   for d, s in zip(dims, array.shape))
        if bad_shape:
            raise CheckError(f"{label}: input {name!r} expects shape {want}, got "
                             f"{list(array.shape)}")
        if dtype is not None and array.dtype != dtype:
            raise CheckError(f"{label}: input {name!r} expects {np.dtype(dtype).name}, got "
                             f"{array.dtype.name}")
        feed[name] = np.ascontiguousarray(array)
    return feed


def _random_sets(specs: list, example: tuple | None, n: int, seed: int) -> list[tuple[str, tuple]]:
    if n == 0:
        return []
    shapes = []
    for k, (name, dims, dtype) in enumerate(specs):
        if example is not None and k < len(example):
            shapes.append(tuple(example[k].shape))
        elif any(d is None for d in dims):
            raise CheckError(f"input {name!r} has dynamic dimensions {list(dims)}; pass "
                             "example_inputs to give the shape of the random inputs")
        else:
            shapes.append(dims)
    rng = np.random.default_rng(seed)
    sets = []
    for r in range(n):
        arrays = []
        for (name, dims, dtype), shape in zip(specs, shapes):
            dtype = dtype or np.float32
            if np.issubdtype(dtype, np.floating):
                arrays.append(rng.standard_normal(shape).astype(dtype))
            elif dtype == np.bool_:
                arrays.append(rng.integers(0, 2, shape).astype(bool))
            else:
                arrays.append(rng.integers(0, 10, shape).astype(dtype))
        sets.append((f"random[{r}]", tuple(arrays)))
    return sets


def runnable(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or a clean copy when a ``torch.export`` left FakeTensors in its caches."""
    from vbxfx.export.onnx_export import _fake_attributes, safe_deepcopy

    return safe_deepcopy(model) if _fake_attributes(model) else model


def run_onnx(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, feed)


def run_torch(model: torch.nn.Module, arrays: tuple, record: Any = None) -> list[np.ndarray]:
    """The model's tensor outputs, flattened in pytree order (as the exporters flatten them).
    Floating inputs are cast to the model's dtype (the file is float32 for every model).
    ``record``: a ``TorchFunctionMode`` active while the model runs."""
    from torch.utils._pytree import tree_flatten

    from vbxfx.model_state import float_dtype
    from vbxfx.analysis.trace import preserved_state

    dtype = float_dtype(model)
    tensors = [torch.from_numpy(np.array(a)) for a in arrays]
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    with preserved_state(model), torch.no_grad(), record or contextlib.nullcontext():
        out = model(*tensors)
    leaves, _ = tree_flatten(out)
    return [(t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
            for t in leaves if isinstance(t, torch.Tensor)]


def _rounded(feed: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Floating inputs rounded to ``dtype`` (a float16 / bfloat16 torch model): onnxruntime
    then sees the values the torch model sees."""
    return {k: (torch.from_numpy(v).to(dtype).to(torch.float32).numpy().astype(v.dtype)
                if np.issubdtype(v.dtype, np.floating) else v) for k, v in feed.items()}


def compare(path: str, torch_model: torch.nn.Module | None, sets: list[tuple[str, tuple]],
            example: Any, n_random: int, seed: int, report) -> None:
    """Run every input set through onnxruntime (and torch); append rows and problems."""
    import onnxruntime as ort


    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        report.problems.append(f"onnxruntime cannot load the model: {str(e).strip()[:300]}")
        return
    if torch_model is not None:
        torch_model = runnable(torch_model)
    specs = _input_specs(session)
    feeds = [(label, _validate(label, arrays, specs)) for label, arrays in sets]
    example_set = next((arrays for label, arrays in sets if label == "example_inputs"), None)
    feeds += [(label, _validate(label, arrays, specs))
              for label, arrays in _random_sets(specs, example_set, n_random, seed)]
    if torch_model is not None:
        from vbxfx.model_state import float_dtype
        dtype = float_dtype(torch_model)
        if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
            feeds = [(label, _rounded(feed, dtype)) for label, feed in feeds]
    names = [o.name for o in session.get_outputs()]
    chosen, after = [], set()
    if torch_model is not None:
        session, chosen, after = _selection_session(path, session, options, report)
    for label, feed in feeds:
        try:
            outs = run_onnx(session, feed)
        except Exception as e:
            report.problems.append(f"onnxruntime fails on {label}: {str(e).strip()[:300]}")
            continue
        if torch_model is None:
            continue
        record = RecordSelections() if chosen else None
        try:
            refs = run_torch(torch_model, tuple(feed.values()), record)
        except Exception as e:
            report.problems.append(f"the torch model fails on {label}: {type(e).__name__}: "
                                   f"{str(e).strip()[:300]}")
            continue
        outs, extra = outs[:len(names)], outs[len(names):]
        if len(refs) != len(outs):
            report.problems.append(f"{label}: the torch model returns {len(refs)} tensor(s), the "
                                   f"ONNX model {len(outs)} output(s)")
            continue
        pairs = [(n, o, r) for n, o, r in zip(names, outs, refs) if n not in after]
        if chosen:
            found = match(chosen, record.seen)
            if found is None:            # compare everything element by element, as without
                pairs = list(zip(names, outs, refs))
                note = ("the file's TopK/ArgMax/ArgMin nodes could not be matched to the torch "
                        "model's topk/argmax/argmin calls: every output compared element by "
                        "element")
                if note not in report.notes:
                    report.notes.append(note)
            else:
                values = dict(zip([s.tensor for s in chosen], extra))
                pairs += [(f"{s.tensor} (input of {s.node})", values[s.tensor], ref)
                          for s, ref in found if not s.after]
        for name, out, ref in pairs:
            max_abs, max_rel, ok = compare_arrays(out, ref, report.rtol, report.atol)
            report.outputs.append(OutputRow(label, name, max_abs, max_rel, ok))
            if not ok:
                detail = (f"shape {list(out.shape)} vs torch {list(ref.shape)}"
                          if out.shape != ref.shape else
                          f"max abs error {max_abs:.3g}, max rel error {max_rel:.3g} > atol "
                          f"{report.atol:g} + rtol {report.rtol:g} * max|torch|")
                report.problems.append(f"{label}: output {name!r} differs from torch: {detail}")


def _selection_session(path: str, session, options, report):
    """``(session, selections, outputs after them)``: for a file whose outputs come after
    TopK/ArgMax/ArgMin, a session that also outputs the selections' inputs (see
    :mod:`vbxfx.export.selections`); the plain session and nothing otherwise."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path, load_external_data=False)
    after = outputs_after(proto)
    if not after:
        return session, [], set()
    chosen = selections(proto)
    try:
        proto = onnx.load(path)
        extended = ort.InferenceSession(with_selection_outputs(proto, chosen), options,
                                        providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - then every output is compared as it is
        report.notes.append(f"the inputs of the file's discrete selections cannot be read out "
                            f"({str(e).strip()[:200]}): every output compared element by "
                            "element")
        return session, [], set()
    kinds = sorted({s.kind for s in chosen})
    first = [s.node for s in chosen if not s.after]
    report.notes.append(
        f"outputs {after} come after a discrete selection ({', '.join(kinds)}: near-equal "
        f"scores may pick differently in two runtimes, then whole values differ), so they are "
        f"not compared element by element; compared instead: the input of "
        f"{', '.join(first)}" + (f" ({len(chosen) - len(first)} later selection(s) take "
                                 "inputs that come after one)" if len(first) < len(chosen)
                                 else ""))
    return extended, chosen, set(after)
