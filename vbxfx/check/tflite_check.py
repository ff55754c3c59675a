"""Check the int8 TFLite file that ``vnnx_compile`` reads: repeats, MACs, what quantization did.

The VectorBlox compiler re-derives every layer's encoding from the int8 filters of the
TFLite file (``docs/format.md``). :func:`check_tflite` does the same for every CONV_2D that
is not grouped and every FULLY_CONNECTED (the compiler runs it as a 1x1 convolution): it
takes the int8 filter in the compiler's order ``[O, kh, kw, I]`` (``[O, I]``), input channels
zero-padded to a multiple of 8, finds the smallest repeat R in 1, 2, 4 that every block
fits (:func:`vbxfx.weight_repeat` on the integer values), and counts

* hardware MACs ``O * kh*kw * ceil(I/8)*8 * H_out*W_out * 2R/8`` (``vnnx_compile -c comp``),
  with ``H_out*W_out`` from the output tensor's shape in the file (the batch as the file has
  it; onnx2tf writes batch 1);
* unstructured multipliers as the int8 file holds them (``-c ucomp``,
  :func:`vbxfx.unstructured_macs` on the integer values: FULLY_CONNECTED is quantized per
  tensor, so its count can differ from one made on per-channel int8 values).

It warns, naming the layer, where quantization changed a layer: a weight scale at least
twice ``max|w|/127`` (onnx2tf raises it to keep each int32 bias within +-2**30 when the
activations are tiny), many output channels left all zero, or (with the float weights of a
vbxfx ONNX) a share of the kept weights rounded to zero. DEPTHWISE_CONV_2D stays dense in
the compiler and is only counted.

With ``expect`` (see :mod:`vbxfx.check.tflite_expect`) every compressed layer vbxfx declared is
matched to a TFLite layer; a structured layer whose int8 filter fits another repeat than
the declared one, or a declared layer with no TFLite layer, is a problem (exit 1). An
unstructured layer that needs more multipliers than vbxfx counted is a warning.

>>> import vbxfx                                                              # doctest: +SKIP
>>> report = vbxfx.check_tflite("model.tflite", expect="model.onnx")          # doctest: +SKIP
>>> report.ok, report.totals()["hw_macs"]                                     # doctest: +SKIP
(True, 907036672)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from vbxfx.errors import CheckError
from vbxfx.export.tflite_reader import TfliteModel, TfliteOperator, read_tflite
from vbxfx.format import explain_violation, hardware_macs, unstructured_macs, weight_repeat
from vbxfx.check.tflite_expect import Declared, load_declarations, match_layers, to_compiler_layout

__all__ = ["check_tflite", "TfliteCheckReport", "TfliteLayerRow", "RAISED_SCALE",
           "ZEROED_SHARE", "ZERO_ROWS_SHARE"]

logger = logging.getLogger(__name__)

#: A weight scale at least this many times ``max|w| / 127`` is reported as raised.
RAISED_SCALE = 2.0
#: Warn when quantization zeroes more than this share of a layer's nonzero float weights.
ZEROED_SHARE = 0.10
#: Warn when at least this share of a layer's output channels is all zero in int8.
ZERO_ROWS_SHARE = 0.25
_PACKED = ("CONV_2D", "FULLY_CONNECTED")


@dataclass(frozen=True)
class TfliteLayerRow:
    """One CONV_2D / FULLY_CONNECTED of the file. ``shape`` is the compiler's ``[O,kh,kw,I]``
    (``[O,I]``); ``ucomp_mults`` the unstructured multipliers of one output position."""

    op_index: int
    op: str
    tensor: str
    shape: tuple[int, ...]
    per_channel: bool
    positions: int | None
    repeat: int
    macs: int | None
    hw_macs: int | None
    ucomp_mults: int
    ucomp_macs: int | None
    declared: str | None = None
    declared_fmt: str | None = None
    declared_repeat: int | None = None
    declared_mults: int | None = None
    warnings: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    hw_macs_dense: int | None = None      # R=4, input channels padded to 8


@dataclass
class TfliteCheckReport:
    """The outcome of :func:`check_tflite`; ``str()`` is a table, :meth:`to_dict` JSON-ready."""

    path: str
    layers: list[TfliteLayerRow] = field(default_factory=list)
    dense_ops: dict[str, int] = field(default_factory=dict)
    expect: str | None = None
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def totals(self) -> dict[str, Any]:
        known = all(r.macs is not None for r in self.layers)
        total = (lambda key: sum(getattr(r, key) for r in self.layers) if known else None)
        declared = [r for r in self.layers if r.declared_fmt == "comp"]
        counted = [r for r in self.layers
                   if r.declared_fmt == "ucomp" and r.declared_mults is not None]
        dense, after = total("hw_macs_dense"), total("hw_macs")
        return {"layers": len(self.layers), "macs": total("macs"), "hw_macs_dense": dense,
                "hw_macs": after, "ucomp_macs": total("ucomp_macs"),
                "macs_removed": 1.0 - after / dense if dense else None,
                "repeats": {str(k): sum(r.repeat == k for r in self.layers) for k in (1, 2, 4)},
                "matched": sum(r.declared is not None for r in self.layers),
                "repeat_agrees": sum(r.repeat == r.declared_repeat for r in declared),
                "repeat_declared": len(declared),
                "mults_within": sum(r.ucomp_mults <= r.declared_mults for r in counted),
                "mults_declared": len(counted), "dense_ops": dict(self.dense_ops)}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "expect": self.expect,
                "layers": [asdict(r) for r in self.layers], "totals": self.totals(),
                "warnings": list(self.warnings), "problems": list(self.problems),
                "seconds": self.seconds}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        num = lambda v: "?" if v is None else f"{v:,}"  # noqa: E731
        head = ("op", "kind", "layer", "shape", "quant", "R", "declared", "MACs", "HW MACs",
                "ucomp MACs")
        rows = [(str(r.op_index), "FC" if r.op == "FULLY_CONNECTED" else "CONV",
                 r.declared or _short(r.tensor), "x".join(map(str, r.shape)),
                 "channel" if r.per_channel else "tensor", str(r.repeat), _declared(r),
                 num(r.macs), num(r.hw_macs), num(r.ucomp_macs)) for r in self.layers]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [f"vbxfx check {self.path}" + (f" --expect {self.expect}" if self.expect else ""),
               line(head)] + [line(r) for r in rows]
        t = self.totals()
        removed = ("" if t["macs_removed"] is None else
                   f": {t['macs_removed']:.1%} of the dense hardware MACs removed")
        reps = ", ".join(f"R{k}: {v}" for k, v in t["repeats"].items())
        out.append(f"totals: {t['layers']} CONV_2D/FULLY_CONNECTED ({reps}); standard MACs "
                   f"{num(t['macs'])}; hardware MACs {num(t['hw_macs_dense'])} dense (R=4, "
                   f"input channels padded to 8) -> {num(t['hw_macs'])} at -c comp{removed}; "
                   f"{num(t['ucomp_macs'])} multiplies at -c ucomp")
        if self.dense_ops:
            out.append("left dense by the compiler, not counted: "
                       + ", ".join(f"{v} {k}" for k, v in sorted(self.dense_ops.items())))
        if self.expect:
            parts = [f"declared: {t['matched']} layer(s) matched"]
            if t["repeat_declared"] or not t["mults_declared"]:
                parts.append(f"repeat as declared on {t['repeat_agrees']}/{t['repeat_declared']}")
            if t["mults_declared"]:
                parts.append(f"multipliers within vbxfx's count on {t['mults_within']}/"
                             f"{t['mults_declared']} (ucomp)")
            out.append(", ".join(parts))
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"problem: {p}" for p in self.problems]
        out.append("OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))")
        return "\n".join(out)


def _short(name: str) -> str:
    first = name.split(";")[0]
    return first if len(first) <= 48 else "..." + first[-45:]


def _declared(r: TfliteLayerRow) -> str:
    if r.declared_fmt == "comp":
        return f"R{r.declared_repeat}"
    if r.declared_fmt == "ucomp":
        return f"ucomp {r.declared_mults:,}" if r.declared_mults is not None else "ucomp"
    return r.declared_fmt or "-"


# ------------------------------------------------------------------------------ the check


def check_tflite(path: str | os.PathLike, expect: Any = None) -> TfliteCheckReport:
    """Check the int8 TFLite file at ``path`` (see the module docstring).

    Args:
        expect: a vbxfx ONNX file, a compress report JSON, or a compressed torch model
            (``nn.Module`` or ``.pt``); None checks the file on its own.

    Raises:
        CheckError: not a TFLite file, not a full-integer (int8) one, no layer to check,
            or ``expect`` cannot be read.
    """
    start = time.perf_counter()
    model = read_tflite(path)
    report = TfliteCheckReport(model.path)
    layers = _packed_layers(model, report)
    declared: list[Declared] = []
    if expect is not None:
        report.expect, declared = load_declarations(expect)
    matched, left = match_layers([(tuple(q.shape), q, _positions(model, op))
                                  for op, q, _ in layers], declared)
    for (op, q, quant), decl in zip(layers, matched, strict=True):
        report.layers.append(_check_layer(model, op, q, quant, decl))
    for row in report.layers:
        report.warnings.extend(row.warnings)
        report.problems.extend(row.problems)
    for d in left:
        if d.compressed:
            report.problems.append(
                f"vbxfx layer {d.name!r} ({_fmt(d)}, weight {'x'.join(map(str, d.shape))}) "
                "has no CONV_2D/FULLY_CONNECTED with that filter shape in the TFLite file")
    report.seconds = time.perf_counter() - start
    logger.info("checked %s: %d layer(s), %s in %.1f s", report.path, len(report.layers),
                "ok" if report.ok else f"{len(report.problems)} problem(s)", report.seconds)
    return report


def _fmt(d: Declared) -> str:
    return f"comp R{d.repeat}" if d.fmt == "comp" else d.fmt


def _packed_layers(model: TfliteModel, report: TfliteCheckReport) -> list[tuple]:
    """``[(operator, int8 filter in compiler order, Quantization)]``; CheckError when the file
    is not a full-integer model."""
    out = []
    for op in model.operators:
        if op.op not in _PACKED and op.op != "DEPTHWISE_CONV_2D":
            continue
        label = f"{model.path}: operator {op.index} {op.op}"
        if len(op.inputs) < 2 or op.inputs[1] < 0:
            raise CheckError(f"{label} has no filter input")
        act, filt = model.tensors[op.inputs[0]], model.tensors[op.inputs[1]]
        if filt.dtype != "int8" or act.dtype not in ("int8", "uint8"):
            raise CheckError(
                f"{label} (filter {filt.name!r}) has a {filt.dtype} filter and {act.dtype} "
                "input: not a full-integer int8 TFLite; vnnx_compile reads the "
                "*_full_integer_quant.tflite that onnx2tf -oiqt writes (vbxfx export --tflite)")
        if op.op == "DEPTHWISE_CONV_2D":
            report.dense_ops[op.op] = report.dense_ops.get(op.op, 0) + 1
            continue
        q = model.data(filt)
        if q is None:
            raise CheckError(f"{label}: the filter {filt.name!r} is not a constant")
        if filt.quantization is None:
            raise CheckError(f"{label}: the int8 filter {filt.name!r} has no quantization")
        if op.op == "CONV_2D" and len(act.shape) == 4 and q.ndim == 4 \
                and act.shape[3] != q.shape[3]:
            groups = act.shape[3] // max(1, q.shape[3])
            key = f"grouped CONV_2D (groups={groups})"
            report.dense_ops[key] = report.dense_ops.get(key, 0) + 1
            continue
        if q.ndim not in (2, 4):
            raise CheckError(f"{label}: filter {filt.name!r} has shape {q.shape}, "
                             "rank 4 (CONV_2D) or 2 (FULLY_CONNECTED) expected")
        out.append((op, np.asarray(q), filt.quantization))
    if not out:
        raise CheckError(f"{model.path}: no CONV_2D or FULLY_CONNECTED layer with an int8 "
                         "filter to check")
    return out


def _positions(model: TfliteModel, op: TfliteOperator) -> int | None:
    if not op.outputs or op.outputs[0] < 0:
        return None
    shape = model.tensors[op.outputs[0]].shape
    if not shape or any(d <= 0 for d in shape):
        return None
    return int(np.prod(shape[:-1], dtype=np.int64))


def _check_layer(model: TfliteModel, op: TfliteOperator, q: np.ndarray, quant,
                 decl: Declared | None) -> TfliteLayerRow:
    tensor = model.tensors[op.inputs[1]].name
    label = (f"layer {decl.name!r} (TFLite op {op.index} {op.op})" if decl is not None
             else f"TFLite op {op.index} {op.op} (filter {_short(tensor)!r})")
    # the compiler's [O,kh,kw,I] as torch's [O,I,kh,kw], so vbxfx.format reads it as it reads
    # any weight; int8 values are exact in float32
    values = torch.from_numpy(q.astype(np.float32))
    if values.dim() == 4:
        values = values.permute(0, 3, 1, 2)
    repeat = weight_repeat(values, quantize=False)
    mults = unstructured_macs(values, quantize=False)
    o, i = q.shape[0], q.shape[-1]
    kpos = int(np.prod(q.shape[1:-1], dtype=np.int64)) if q.ndim == 4 else 1
    positions = _positions(model, op)
    macs = hw = dense = umacs = None
    if positions is not None:
        macs = o * kpos * i * positions
        hw = hardware_macs(o, i, kpos, positions, repeat)
        dense = hardware_macs(o, i, kpos, positions, 4)
        umacs = mults * positions
    warnings = _quantization_warnings(label, q, quant, decl)
    problems = []
    if np.any(quant.zero_point != 0):
        problems.append(f"{label}: the int8 filter has a nonzero zero point; the compiler "
                        "expects symmetric int8 weights")
    if decl is not None and decl.fmt == "comp" and decl.repeat != repeat:
        why = ""
        if repeat > decl.repeat:
            v = explain_violation(values, decl.repeat, quantize=False)
            why = f": {v}" if v is not None else ""
        hint = " (quantization changed it, see the warning)" if warnings else ""
        problems.append(f"{label}: the int8 filter fits repeat {repeat}, vbxfx declared "
                        f"repeat {decl.repeat}{hint}{why}")
    if decl is not None and decl.fmt == "ucomp" and decl.multipliers is not None \
            and mults > decl.multipliers:
        extra = (" (FULLY_CONNECTED is quantized per tensor)" if not quant.per_channel
                 and q.shape[0] > 1 else "")
        warnings.append(f"{label}: the int8 file needs {mults:,} multipliers per output "
                        f"position where vbxfx counted {decl.multipliers:,}{extra}")
    return TfliteLayerRow(
        op.index, op.op, tensor, tuple(int(d) for d in q.shape), bool(quant.per_channel),
        positions, repeat, macs, hw, mults, umacs,
        declared=None if decl is None else decl.name,
        declared_fmt=None if decl is None else decl.fmt,
        declared_repeat=None if decl is None else decl.repeat,
        declared_mults=None if decl is None else decl.multipliers, hw_macs_dense=dense,
        warnings=tuple(warnings), problems=tuple(problems))


def _quantization_warnings(label: str, q: np.ndarray, quant, decl: Declared | None) -> list[str]:
    """Where the int8 filter says that quantization changed the layer (module docstring)."""
    rows = np.abs(q.reshape(q.shape[0], -1).astype(np.int32))
    qmax = rows.max(axis=1) if quant.per_channel else np.full(q.shape[0], rows.max())
    scale = np.broadcast_to(quant.scale.astype(np.float64), (q.shape[0],)) \
        if quant.scale.size in (1, q.shape[0]) else None
    weight = None
    if decl is not None and decl.weight is not None:
        weight = to_compiler_layout(decl.weight).reshape(q.shape[0], -1).astype(np.float64)
    notes = []
    if weight is not None and scale is not None:
        wmax = np.abs(weight).max(axis=1)
        if not quant.per_channel:
            wmax = np.full_like(wmax, wmax.max())
        ratio = np.where(wmax > 0, scale / np.where(wmax > 0, wmax, 1.0) * 127.0, 1.0)
    else:                   # the int8 values alone: a natural scale gives max|q| = 127
        ratio = np.where(qmax > 0, 127.0 / np.maximum(qmax, 1), 1.0)
    raised = ratio >= RAISED_SCALE
    if raised.any():
        where = (f"{int(raised.sum())} of {q.shape[0]} output channels" if quant.per_channel
                 else "the whole tensor (one scale)")
        notes.append(f"weight scale up to {float(ratio.max()):.3g}x max|w|/127 in {where}")
    zero_rows = int((rows.max(axis=1) == 0).sum())
    if zero_rows and zero_rows >= ZERO_ROWS_SHARE * q.shape[0]:
        notes.append(f"{zero_rows} of {q.shape[0]} output channels are all zero in int8")
    if weight is not None:
        kept = weight != 0
        lost = int((kept & (rows == 0)).sum())
        if kept.sum() and lost > ZEROED_SHARE * kept.sum():
            notes.append(f"{lost:,} of its {int(kept.sum()):,} nonzero weights "
                         f"({lost / kept.sum():.0%}) became 0")
    if not notes:
        return []
    why = (" (onnx2tf raises the scale to keep each int32 bias within +-2**30 where the "
           "layer's input is tiny)") if raised.any() else ""
    return [f"{label}: quantization changed this layer: {'; '.join(notes)}{why}"]
