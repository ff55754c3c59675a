"""Export a compressed model to ONNX with standard operators and the vbxfx annotations.

Which exporter (``dynamo=None``, the default, chooses per model):

* the TorchScript exporter (``dynamo=False``) for ordinary models: it is fast and, in eval
  mode, folds BatchNorm into the preceding Conv;
* the dynamo exporter (``dynamo=True``, ``torch.export``) for models that need it: those
  built from ``ultralytics`` modules, and any model the TorchScript exporter fails on.

Both work on a deep copy of the model, so the caller's model (and an ultralytics Detect
head's cached anchors) is never touched. Each annotated layer is then found in the ONNX
graph by its weight: the initializer named ``<fqn>.weight``, the node's module path
(dynamo's ``pkg.torch.onnx.name_scopes``, TorchScript's ``/a/a.0/conv/Conv`` node names),
and always a value match up to one scale per output channel (a folded BatchNorm), see
:mod:`vbxfx.export.mapping`.

A compressed layer the forward does not call (an auxiliary head that runs in training only, a
layer whose weight its parent reads directly, as ``nn.MultiheadAttention`` does with
``out_proj``) is no error: a short run on the example inputs finds those layers before the
export, they keep the weight torch computes with (the dense one) and no annotation, and
``report.skipped`` says why. So does a layer whose weight the exporter folded away.

>>> import torch, tempfile, os, vbxfx
>>> from vbxfx.export.annotations import LayerAnnotation
>>> conv = torch.nn.Conv2d(8, 8, 3)
>>> with torch.no_grad():
...     _ = conv.weight.copy_(vbxfx.project_weight(conv.weight, 2))
>>> notes = {"": LayerAnnotation("", "comp", 2, vbxfx.encode_weight(conv.weight, 2))}
>>> path = os.path.join(tempfile.mkdtemp(), "conv.onnx")
>>> report = export_onnx(conv, torch.randn(1, 8, 16, 16), path, annotations=notes)
>>> report.exporter, list(report.layers)
('torchscript', [''])
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from torch import nn

from vbxfx.errors import ConfigError, ExportError, VbxError
from vbxfx.errors import one_line as _one_line
from vbxfx.export.annotations import LayerAnnotation, normalize_annotations
from vbxfx.export.mapping import annotate, map_layers

__all__ = ["export_onnx", "ExportReport", "choose_exporter", "map_layers", "safe_deepcopy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote: file, exporter, opset, ``{fqn: node name}``."""

    path: str
    exporter: str                                   # "torchscript" or "dynamo"
    opset: int
    layers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    size_bytes: int = 0
    #: compressed layers left without annotation: ``{fqn: reason}``
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = (f"exported {self.path} ({self.size_bytes / 1e6:.1f} MB) with the {self.exporter} "
                f"exporter, opset {self.opset}, {len(self.layers)} annotated layer(s), "
                f"{self.seconds:.1f} s")
        if self.skipped:
            text += (f"; {len(self.skipped)} compressed layer(s) not annotated: "
                     + "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:3])
                     + (" ..." if len(self.skipped) > 3 else ""))
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "exporter": self.exporter, "opset": self.opset,
                "layers": dict(self.layers), "seconds": self.seconds,
                "size_bytes": self.size_bytes, "skipped": dict(self.skipped)}


def choose_exporter(model: nn.Module) -> bool:
    """True (dynamo) for models built from ultralytics modules, else False (TorchScript)."""
    return any(type(m).__module__.startswith("ultralytics") for m in model.modules())


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                annotations: Mapping[str, Any] | None = None, opset: int | None = None,
                dynamo: bool | None = None, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None) -> ExportReport:
    """Export ``model`` to ``path`` and annotate every compressed layer (see module docstring).

    Args:
        model: a model with VBX modules (finalized on a deep copy) or a plain model whose
            compressed layers ``annotations`` describes.
        example_inputs: a Tensor or a tuple of Tensors.
        path: the ``.onnx`` file to write (its directory must exist).
        annotations: ``{fqn: LayerAnnotation or PairEncoding}`` for plain models.
        opset: ONNX opset (None: the exporter's default).
        dynamo: True/False forces the exporter; None chooses (module docstring).
        input_names, output_names: names of the graph inputs / outputs (None: the
            exporter's own).

    Returns:
        An :class:`ExportReport`; ``report.layers`` maps each annotated fqn to its node,
        ``report.skipped`` each compressed layer left unannotated to the reason (not called
        by the forward, or its weight folded away by the exporter).

    Raises:
        ExportError: the model cannot be copied or exported, or an annotated weight does not
            hold its annotation (the message names it).
        ConfigError: a bad argument.
    """
    start = time.perf_counter()
    inputs = _check_args(model, example_inputs, path, opset, dynamo)
    path = os.fspath(path)
    try:
        work = safe_deepcopy(model)
    except Exception as e:
        raise ExportError(f"could not deep-copy {type(model).__name__} before exporting "
                          f"({type(e).__name__}: {_one_line(e)}); vbxfx never exports the "
                          "caller's model itself") from e
    skipped = _uncalled_to_dense(work, inputs, annotations)
    work, notes = _finalize(work, annotations)
    for name in skipped:
        notes.pop(name, None)
    _check_layers(work, notes)
    work, inputs = _as_float32(work, inputs)
    use_dynamo = choose_exporter(work) if dynamo is None else dynamo
    # a private scratch folder beside the output (one file system, so the final rename is
    # atomic): the exporters may write side files next to their output (the dynamo exporter
    # puts the weights in ``<name>.onnx.data``, TorchScript large tensors in files of their
    # own), and removing the folder removes whatever they wrote
    scratch = tempfile.mkdtemp(prefix=".vbxfx-export-", dir=os.path.dirname(os.path.abspath(path)))
    tmp = os.path.join(scratch, "model.onnx")
    try:
        used = _export(model, work, inputs, tmp, opset, use_dynamo, dynamo is None,
                       input_names, output_names)
        proto = onnx.load(tmp)  # external data too: the file written below holds everything
        layers = annotate(proto, work, notes, skipped)
        onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as e:
            raise ExportError(f"the exported model fails the ONNX checker: {e}") from e
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = ExportReport(path, used, int(opset_used), layers, time.perf_counter() - start,
                          os.path.getsize(path), skipped)
    logger.info("%s", report)
    return report


# --------------------------------------------------------------------------- steps


def _fake_attributes(model: nn.Module) -> list[tuple[int, str, Any]]:
    """``(module index, name, value)`` of plain module attributes holding FakeTensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    def fake(v: Any) -> bool:
        return isinstance(v, FakeTensor) or (isinstance(v, (list, tuple))
                                             and any(isinstance(t, FakeTensor) for t in v))
    return [(i, k, v) for i, m in enumerate(model.modules()) for k, v in vars(m).items()
            if k not in ("_parameters", "_buffers", "_modules") and fake(v)]


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that survives the FakeTensors a ``torch.export`` of the caller's model
    leaves in forward-time caches (ultralytics' ``Detect.anchors`` / ``strides``): the copy
    gets None there and its cache key ``shape`` reset, so its next forward recomputes them."""
    fakes = _fake_attributes(model)
    memo: dict[int, Any] = {id(v): None for _, _, v in fakes}
    out = copy.deepcopy(model, memo)
    if fakes:
        modules = list(out.modules())
        for i, name, _ in fakes:
            logger.info("dropped the cached FakeTensor %s.%s from the copy (left by torch.export)",
                        type(modules[i]).__name__, name)
            if hasattr(modules[i], "shape"):
                modules[i].shape = None
    return out


def _check_args(model: Any, example_inputs: Any, path: Any, opset: Any, dynamo: Any) -> tuple:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export_onnx() takes an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not (isinstance(example_inputs, (tuple, list)) and example_inputs
            and all(isinstance(t, torch.Tensor) for t in example_inputs)):
        raise ConfigError("example_inputs must be a Tensor or a tuple of Tensors, e.g. "
                          f"torch.randn(1, 3, 224, 224); got {type(example_inputs).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path must be a file name, got {type(path).__name__}")
    _check_output_path(os.fspath(path))
    from vbxfx.model_state import require_real_tensors
    require_real_tensors(model, "export_onnx")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ConfigError(f"opset must be an int >= 7 or None, got {opset!r}")
    if dynamo is not None and not isinstance(dynamo, bool):
        raise ConfigError(f"dynamo must be True, False or None (choose), got {dynamo!r}")
    return tuple(example_inputs)


def _check_output_path(path: str) -> None:
    """Fail now, before the export's work, when ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"cannot write {path!r}: it is a directory; give a file name, e.g. "
                          f"{os.path.join(path, 'model.onnx')!r}")
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ExportError(f"cannot write {path!r}: {directory!r} {what}")
    try:                                   # what the export does there: a scratch folder
        os.rmdir(tempfile.mkdtemp(prefix=".vbxfx-probe-", dir=directory))
    except OSError as e:
        raise ExportError(f"cannot write {path!r}: directory {directory!r} is not writable "
                          f"({e.strerror or type(e).__name__})") from e


def _as_float32(work: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    """The model and inputs in float32: onnxruntime has no float64 Conv on CPU, and the
    VectorBlox toolchain (onnx2tf, int8 TFLite) starts from a float32 file."""
    dtypes = {t.dtype for t in (*work.parameters(), *work.buffers(), *inputs)
              if t.is_floating_point() and t.dtype != torch.float32}
    if not dtypes:
        return work, inputs
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    logger.warning("export_onnx: the model (or its example inputs) is %s; the ONNX file is "
                   "float32, as onnxruntime and the VectorBlox toolchain take it", names)
    return work.float(), tuple(t.float() if t.is_floating_point() else t for t in inputs)


def _uncalled_to_dense(work: nn.Module, inputs: tuple,
                       annotations: Mapping[str, Any] | None) -> dict[str, str]:
    """Find the compressed / annotated layers whose forward the export will not run; give each
    such compressed layer back its dense weight (what torch computes with when a parent reads
    ``.weight`` itself); return ``{fqn: reason}``."""
    from vbxfx.modules import is_compressed
    from vbxfx.modules.swap import replace_module
    from vbxfx.analysis.weight_use import called_layers

    names = [n for n, m in work.named_modules() if is_compressed(m)]
    for name in annotations or ():
        try:
            if hasattr(work.get_submodule(name), "weight") and name not in names:
                names.append(name)
        except AttributeError:
            pass  # _check_layers names it
    if not names:
        return {}
    try:
        ran, direct = called_layers(work, inputs, names)
    except Exception as e:  # the export itself will say what is wrong with the model
        logger.debug("could not check which layers the forward calls: %s", _one_line(e))
        return {}
    skipped = {}
    for name in names:
        if name in ran:
            continue
        skipped[name] = direct.get(name, "not called by the forward on the example inputs "
                                         "(eval mode): an unused branch, or a parent reads "
                                         "its weight itself; exported with its dense weight")
        layer = work.get_submodule(name)
        if is_compressed(layer):
            plain = layer.to_dense()
            with torch.no_grad():
                plain.weight.copy_(layer.weight)   # the dense weight: what torch uses
            replace_module([work], name, layer, plain)
    if skipped:
        logger.warning("%d compressed layer(s) that the forward does not call are not "
                       "annotated: %s", len(skipped), ", ".join(list(skipped)[:5]))
    return skipped


def _finalize(work: nn.Module, annotations: Mapping[str, Any] | None
              ) -> tuple[nn.Module, dict[str, LayerAnnotation]]:
    notes: dict[str, LayerAnnotation] = {}
    try:
        from vbxfx.modules import is_compressed
    except ImportError:  # pragma: no cover - vbxfx.modules not installed
        is_compressed = None
    if is_compressed is not None and any(is_compressed(m) for m in work.modules()):
        from vbxfx.passes.finalize import finalize

        try:
            work, found = finalize(work, inplace=True)
        except VbxError as e:
            raise ExportError(f"could not finalize the compressed layers: {e}") from e
        notes.update(normalize_annotations(found))
    if annotations is not None:
        for name, ann in normalize_annotations(annotations).items():
            if name in notes:
                raise ExportError(f"layer {name!r} is a VBX module and also in annotations=; "
                                  "give it once")
            notes[name] = ann
    if not notes:
        logger.warning("no compressed layer to annotate: the ONNX file will carry the schema "
                       "and no layer annotation")
    return work, notes


def _check_layers(work: nn.Module, notes: Mapping[str, LayerAnnotation]) -> None:
    for name, ann in notes.items():
        try:
            layer = work.get_submodule(name)
        except AttributeError as e:
            raise ExportError(f"annotated layer {name!r} is not a submodule of "
                              f"{type(work).__name__}") from e
        conv = isinstance(layer, nn.Conv2d)
        if not ((conv and layer.groups == 1) or isinstance(layer, nn.Linear)):
            groups = f" with groups={layer.groups}" if conv else ""
            raise ExportError(f"annotated layer {name!r} is a {type(layer).__name__}{groups}; "
                              "accepted are Conv2d with groups=1 and Linear")
        if tuple(layer.weight.shape) != tuple(ann.encoding.mask.shape):
            raise ExportError(f"layer {name!r}: weight {tuple(layer.weight.shape)} but annotation "
                              f"for {tuple(ann.encoding.mask.shape)}")


def _flush_native() -> None:
    """Flush Python's and C's stdio buffers (C++ ``std::cout`` writes through C's)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _fd_captured() -> Any:
    """Send file descriptor 1 to a temporary file while the block runs (the TorchScript
    exporter prints its graph from C++ on failure, past ``sys.stdout``); yields a callable
    returning what was written. stderr stays: progress lines keep drawing there."""
    saved: list[tuple[int, int]] = []

    def written() -> str:
        _flush_native()
        sink.seek(0)
        return sink.read().decode(errors="replace")

    with tempfile.TemporaryFile() as sink:
        _flush_native()
        for fd in (1,):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:                     # no such descriptor (an embedded interpreter)
                pass
        try:
            yield written
        finally:
            _flush_native()
            for fd, dup in reversed(saved):
                os.dup2(dup, fd)
                os.close(dup)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn freely, in Python and from C++; keep it in the
    debug log (so ``--json`` output stays JSON)."""
    out, err = io.StringIO(), io.StringIO()
    chatty = [logging.getLogger(n) for n in (
        "onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export",
        "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in chatty]
    with warnings.catch_warnings(record=True) as caught, _fd_captured() as native, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        for lg in chatty:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(chatty, levels):
                lg.setLevel(level)
            for w in caught:
                logger.debug("exporter warning: %s", w.message)
            text = (out.getvalue() + err.getvalue() + native()).strip()
            if text:
                logger.debug("exporter output:\n%s", text)


def _export(original: nn.Module, work: nn.Module, inputs: tuple, tmp: str, opset: int | None,
            dynamo: bool, may_fall_back: bool, input_names: Any, output_names: Any) -> str:
    kwargs: dict[str, Any] = {"input_names": list(input_names) if input_names else None,
                              "output_names": list(output_names) if output_names else None}
    if opset is not None:
        kwargs["opset_version"] = opset
    work.eval()
    if not dynamo:
        try:
            # a fresh copy for TorchScript keeps ``work`` clean for a dynamo retry
            target = safe_deepcopy(work) if may_fall_back else work
            with _quiet(), torch.no_grad():
                torch.onnx.export(target, inputs, tmp, dynamo=False, **kwargs)
            return "torchscript"
        except Exception as e:
            if not may_fall_back:
                raise ExportError(f"the TorchScript exporter failed on {type(original).__name__}: "
                                  f"{type(e).__name__}: {_one_line(e)}") from e
            logger.info("TorchScript export of %s failed (%s); trying the dynamo exporter",
                        type(original).__name__, _one_line(e))
    try:
        with _quiet():
            torch.onnx.export(work, inputs, tmp, dynamo=True, **kwargs)
    except Exception as e:
        raise ExportError(f"the dynamo exporter failed on {type(original).__name__}: "
                          f"{type(e).__name__}: {_one_line(e)}") from e
    return "dynamo"
