"""Run the int8 TFLite file on data and compare it with the float torch model (QuantAnalyzer-like).

:func:`compare_int8` (``vbxfx check model.tflite --model SPEC --calib DATA``) runs the file
with LiteRT (:class:`~vbxfx.quant.interpreter.TfliteRunner`) and the torch model on the same
preprocessed batch ``[N, C, H, W]`` (the TFLite input of ``vbxfx export --tflite`` is the
ONNX input: normalisation is not inside the file, it is given to both) and reports

* end to end, int8 file against torch: top-1 agreement, KL(softmax torch || softmax int8),
  SQNR of the outputs in dB;
* with the float32 TFLite of the same graph (``model_float32.tflite`` that ``vbxfx export
  --tflite`` keeps beside the int8 file, :func:`~vbxfx.quant.files.float_reference_path`):
  the same figures for the float32 file against torch (the conversion alone: ~100 %, SQNR
  > 60 dB) and a per-layer table, worst first, of where the int8 error enters
  (:mod:`vbxfx.quant.layerwise`): per int8 tensor its SQNR against the float tensor
  (cumulative), the dB it loses against its worst input (``added``, the sort key), the SQNR of
  its own activation grid alone, its int8 range against the observed float range and the
  share of float values outside it (clipped). Without the float32 file only the end-to-end
  figures are given (the report says so).

>>> import vbxfx.quant                                                           # doctest: +SKIP
>>> report = vbxfx.quant.compare_int8("mnv2.tflite", mobilenet_v2, held_out)    # doctest: +SKIP
>>> report.top1, report.float_top1, report.layers[0].name                      # doctest: +SKIP
(0.73, 1.0, 'features.0.0')
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vbxfx.errors import CheckError, ConfigError
from vbxfx.quant.interpreter import TfliteRunner, to_torch_layout
from vbxfx.quant.layerwise import TensorStats, pair_tensors, short_name, torch_names
from vbxfx.quant.metrics import SqnrAccumulator, kl_divergence, top1_agreement

__all__ = ["compare_int8", "Int8Report", "Int8LayerRow", "load_data", "SHOWN"]

logger = logging.getLogger(__name__)

#: rows of the per-layer table that ``str(report)`` shows (to_dict has them all)
SHOWN = 15
#: a float32 file further than this from torch (dB) is reported: wrong model or data
FLOAT_SQNR_OK = 40.0
#: the input clipping reported as other preprocessing: this share of the data outside the
#: int8 input range, by more than INPUT_OVERSHOOT of that range's width
INPUT_CLIP_WARN = 0.01
INPUT_OVERSHOOT = 0.1


@dataclass(frozen=True)
class Int8LayerRow:
    """One int8 tensor against its float counterpart (module docstring); ``name`` is the torch
    layer where known, else the TFLite tensor's name."""

    op_index: int
    op: str
    name: str
    tensor: str
    shape: tuple[int, ...]
    sqnr_db: float
    input_sqnr_db: float | None
    added_db: float | None
    grid_sqnr_db: float | None
    scale: float
    zero_point: int
    int8_min: float
    int8_max: float
    float_min: float
    float_max: float
    clipped: float


@dataclass(frozen=True)
class Int8Report:
    """What :func:`compare_int8` found; ``str()`` is the summary and table, :meth:`to_dict`
    JSON-ready (infinite dB as None)."""

    tflite: str
    reference: str | None
    model: str
    data: str
    samples: int
    top1: float | None
    kl: float | None
    sqnr_db: float
    float_top1: float | None = None
    float_kl: float | None = None
    float_sqnr_db: float | None = None
    layers: tuple[Int8LayerRow, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def table(self, rows: int | None = SHOWN) -> str:
        """The per-layer table, worst first (``rows=None``: all of them)."""
        head = ("op", "kind", "layer", "SQNR dB", "added dB", "grid dB", "int8 range",
                "float range", "clipped")
        body = [(str(r.op_index), r.op, r.name, _num(r.sqnr_db), _num(r.added_db),
                 _num(r.grid_sqnr_db), f"[{r.int8_min:.3g}, {r.int8_max:.3g}]",
                 f"[{r.float_min:.3g}, {r.float_max:.3g}]", f"{r.clipped:.2%}")
                for r in self.layers[:rows]]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        return "\n".join([line(head)] + [line(b) for b in body])

    def __str__(self) -> str:
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        kl = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        out = [f"vbxfx check {self.tflite}: int8 against {self.model} on {self.samples} "
               f"samples ({self.data})",
               f"int8 TFLite vs torch:    top-1 agreement {pct(self.top1)}, KL {kl(self.kl)}, "
               f"SQNR {_num(self.sqnr_db)} dB"]
        if self.reference:
            out.append(f"float32 TFLite vs torch: top-1 agreement {pct(self.float_top1)}, KL "
                       f"{kl(self.float_kl)}, SQNR {_num(self.float_sqnr_db)} dB "
                       f"({self.reference})")
        if self.layers:
            shown = min(len(self.layers), SHOWN)
            out.append(f"where int8 error enters ({shown} of {len(self.layers)} tensors, "
                       "worst first; added: dB lost against its worst input, grid: the "
                       "float tensor on this int8 grid alone)")
            out.append(self.table())
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) and v > 0 else f"{v:.1f}"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------------ inputs


def load_data(calib: Any, input_shape: tuple[int, ...], normalize: str = "imagenet",
              limit: int | None = None) -> tuple[np.ndarray, str]:
    """``(float32 [N, C, H, W], description)`` from a Tensor/array (already preprocessed) or
    a ``--calib`` spec (:func:`vbxfx.inputs.calibration_from_spec`: images, ``skimage[:N]``
    normalised per ``normalize``, ``.pt``/``.npy`` taken as they are).

    Raises:
        ConfigError: unknown ``normalize``, data of the wrong shape, or what the calib
            loaders raise (naming the file).
    """
    from vbxfx.inputs.calib import calibration_from_spec

    if normalize not in ("imagenet", "none"):
        raise ConfigError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
    if hasattr(calib, "detach"):
        data, what = calib.detach().cpu().float().numpy(), "the given tensor"
    elif isinstance(calib, np.ndarray):
        data, what = calib.astype(np.float32), "the given array"
    else:
        spec = os.fspath(calib) if isinstance(calib, os.PathLike) else str(calib)
        data = calibration_from_spec(spec, input_shape, normalize=normalize == "imagenet")
        data, what = data.numpy(), spec
        if normalize == "imagenet" and (spec.startswith("skimage") or os.path.isdir(spec)):
            what += " (ImageNet-normalised)"
    if data.ndim != len(input_shape) or tuple(data.shape[1:]) != tuple(input_shape[1:]):
        raise ConfigError(f"data {what} has shape {tuple(data.shape)}; the model takes "
                          f"[N, {', '.join(map(str, input_shape[1:]))}]")
    if not np.all(np.isfinite(data)):
        raise ConfigError(f"data {what} holds NaN or infinite values")
    if limit is not None:
        data = data[:limit]
    return np.ascontiguousarray(data, dtype=np.float32), what


def _torch_shape(runner: TfliteRunner) -> tuple[int, ...]:
    shape = runner.input.shape
    return (1, shape[3], shape[1], shape[2]) if len(shape) == 4 else (1,) + tuple(shape[1:])


def _torch_outputs(model, data: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    import torch

    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            y = model(torch.from_numpy(data[start:start + batch]))
            ys = [y] if isinstance(y, torch.Tensor) else list(y) if isinstance(
                y, (list, tuple)) else None
            if ys is None or not all(isinstance(t, torch.Tensor) for t in ys):
                raise CheckError(f"the torch model returns a {type(y).__name__}; compare_int8 "
                                 "takes models returning a Tensor or a tuple of Tensors")
            outs = outs or [[] for _ in ys]
            for k, t in enumerate(ys):
                outs[k].append(t.detach().double().cpu().numpy())
    return [np.concatenate(o) for o in outs]


def _resolve(model: Any, weights: str | None):
    from torch import nn

    if isinstance(model, nn.Module):
        return model, type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        from vbxfx.inputs.model_spec import resolve_model
        return resolve_model(os.fspath(model), weights).model, os.fspath(model)
    raise ConfigError(f"model: give an nn.Module or a model spec (torchvision:NAME, a .pt "
                      f"file, file.py:factory), got a {type(model).__name__}")


# ------------------------------------------------------------------------------ the comparison


def compare_int8(tflite: str | os.PathLike, model: Any, calib: Any, *,
                 reference: str | os.PathLike | bool | None = None, weights: str | None = None,
                 normalize: str = "imagenet", limit: int | None = None,
                 num_threads: int = 1) -> Int8Report:
    """Run the int8 file ``tflite`` and the float ``model`` on ``calib`` (module docstring).

    Args:
        model: the float torch model (not modified: a copy runs in eval mode), or a spec for
            :func:`vbxfx.inputs.model_spec.resolve_model` with ``weights``.
        calib: ``[N, C, H, W]`` preprocessed data (Tensor or array), or a ``--calib`` spec: an
            image folder or ``skimage:N`` (normalised per ``normalize``), a ``.pt``/``.npy``.
        reference: the float32 TFLite of the same graph; None looks for
            ``NAME_float32.tflite`` beside ``tflite``; False compares end to end only.
        limit: use at most this many samples.

    Raises:
        CheckError: a missing or unreadable file, outputs that do not fit the torch model's.
        ConfigError: bad data or options.
    """
    t0 = time.perf_counter()
    path = os.fspath(tflite)
    from vbxfx.export.tflite_reader import read_tflite
    from vbxfx.quant.files import float_reference_path

    qmodel = read_tflite(path)                     # CheckError names the file
    ref_path: str | None = None
    notes: list[str] = []
    if reference is None:
        guess = float_reference_path(path)
        if os.path.isfile(guess) and os.path.abspath(guess) != os.path.abspath(path):
            ref_path = guess
        else:
            notes.append(f"no float32 reference ({guess} not found): end-to-end figures "
                         "only; vbxfx export --tflite writes it beside the int8 file")
    elif reference is not False:
        ref_path = os.fspath(reference)
        if not os.path.isfile(ref_path):
            raise CheckError(f"float32 reference {ref_path}: no such file")
    net, described = _resolve(model, weights)
    net = copy.deepcopy(net).eval()                # the user's model keeps its mode
    qrun = TfliteRunner(path, preserve_all=ref_path is not None, num_threads=num_threads)
    data, what = load_data(calib, _torch_shape(qrun), normalize, limit)
    qrun.file_layout(data.shape)                   # CheckError before any work
    expected = _torch_outputs(net, data)
    if len(expected) != len(qrun.outputs):
        raise CheckError(f"{path}: {len(qrun.outputs)} output(s), the torch model returns "
                         f"{len(expected)}")
    shapes = [e.shape for e in expected]
    stats, names, pairs, frun, fmodel = {}, {}, [], None, None
    if ref_path is not None:
        frun = TfliteRunner(ref_path, preserve_all=True, num_threads=num_threads)
        fmodel = read_tflite(ref_path)
        pairs, more = pair_tensors(qmodel, fmodel)
        notes += more
        stats = {p.q: TensorStats(qrun.tensors[p.q]) for p in pairs}
        names = torch_names(qmodel, net)
    qouts: list[list[np.ndarray]] = [[] for _ in qrun.outputs]
    fouts: list[list[np.ndarray]] = [[] for _ in qrun.outputs]
    step = max(1, qrun.input.shape[0])
    for start in range(0, len(data), step):
        qrun.invoke(data[start:start + step])
        for k, info in enumerate(qrun.outputs):
            qouts[k].append(qrun.tensor(info.index))
        if frun is None:
            continue
        frun.invoke(data[start:start + step])
        for k, info in enumerate(frun.outputs):
            fouts[k].append(frun.tensor(info.index))
        for p in pairs:
            stats[p.q].add(qrun.tensor(p.q), frun.tensor(p.f))
    q = _fit(path, [np.concatenate(o) for o in qouts], shapes)
    top1, kl, sqnr = _end_to_end(expected, q)
    report = dict(tflite=path, reference=ref_path, model=described, data=what,
                  samples=len(data), top1=top1, kl=kl, sqnr_db=sqnr)
    if frun is not None:
        f = _fit(ref_path, [np.concatenate(o) for o in fouts], shapes)
        report.update(zip(("float_top1", "float_kl", "float_sqnr_db"), _end_to_end(expected, f)))
        if report["float_sqnr_db"] < FLOAT_SQNR_OK:
            notes.append(f"the float32 TFLite differs from the torch model (SQNR "
                         f"{report['float_sqnr_db']:.1f} dB): another model, other weights or "
                         "other preprocessing than the file was made from?")
    if top1 is None:
        notes.append(f"outputs of shape {list(shapes[0])} are not class scores [N, classes]: "
                     "top-1 and KL are not computed")
    rows = _rows(pairs, stats, qmodel, names)
    first = stats.get(pairs[0].q) if pairs else None
    if first is not None and first.clipped_share > INPUT_CLIP_WARN and first.info.quantized \
            and max(first.range[0] - first.fmin, first.fmax - first.range[1]) \
            > INPUT_OVERSHOOT * (first.range[1] - first.range[0]):
        notes.append(f"the int8 input range [{first.range[0]:.3g}, {first.range[1]:.3g}] clips "
                     f"{first.clipped_share:.1%} of the data: was the file calibrated with "
                     "other preprocessing (--normalize)?")
    if not any(t.quantized for t in qrun.tensors.values()):
        notes.append(f"{path} holds no quantized tensor: it is a float file")
    result = Int8Report(**report, layers=tuple(rows), notes=tuple(notes),
                        seconds=time.perf_counter() - t0)
    logger.info("compared %s with %s on %d samples in %.1f s", path, described, len(data),
                result.seconds)
    return result


def _fit(path: str, outs: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    fitted = [to_torch_layout(o, s) for o, s in zip(outs, shapes)]
    for k, (o, s) in enumerate(zip(fitted, shapes)):
        if o.shape != tuple(s):
            raise CheckError(f"{path}: output {k} has shape {list(o.shape)} over the data, the "
                             f"torch model's has {list(s)}: is --model the model the file was "
                             "made from?")
    return fitted


def _end_to_end(expected: list[np.ndarray], got: list[np.ndarray]):
    acc = SqnrAccumulator()
    for e, g in zip(expected, got):
        acc.add(e, g)
    e, g = expected[0], got[0]
    if e.ndim == 2 and e.shape[1] >= 2:
        return top1_agreement(e, g), kl_divergence(e, g), acc.db
    return None, None, acc.db


def _rows(pairs, stats, qmodel, names) -> list[Int8LayerRow]:
    rows = []
    for p in pairs:
        s = stats[p.q]
        ins = [stats[t].sqnr_db for t in p.inputs if t in stats]
        worst = min(ins) if ins else None
        added = None
        if worst is not None and not (math.isinf(worst) and math.isinf(s.sqnr_db)):
            added = worst - s.sqnr_db
        tensor = qmodel.tensors[p.q]
        lo, hi = s.range
        rows.append(Int8LayerRow(
            p.op_index, p.op, names.get(p.op_index, short_name(tensor.name)), tensor.name,
            tuple(tensor.shape), s.sqnr_db, worst, added, s.grid_db, s.info.scale,
            s.info.zero_point, lo, hi, s.fmin, s.fmax, s.clipped_share))
    # worst first: most dB added (the input row, which has no input, as 0)
    return sorted(rows, key=lambda r: -(r.added_db if r.added_db is not None else 0.0))
