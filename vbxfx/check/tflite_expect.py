"""What vbxfx declared for each layer, and which TFLite layer is which (``check_tflite --expect``).

:func:`load_declarations` reads the declarations from

* a vbxfx ONNX file (``vbxfx.export_onnx`` / ``vbxfx compress -o``): every annotated layer's
  format, repeat and mask, and every Conv/Gemm/MatMul weight (BatchNorm already folded);
* a compress report (``vbxfx compress --json`` output, or its ``"report"`` part): per layer
  the format, repeat and weight shape, no weights;
* a compressed torch model (an ``nn.Module``, or a file saved with ``torch.save``): the
  compressed layers' format, repeat and mask.

:func:`match_layers` pairs each TFLite CONV_2D / FULLY_CONNECTED with one declared layer.
onnx2tf does not keep the ONNX node names (its tensors are called
``model/tf.nn.convolution_3/convolution``), nor always the ONNX order (the heads of a YOLO
come out in another order), so a TFLite layer is matched, among the declared layers not yet
matched,

1. by filter shape in the compiler's order ``[O, kh, kw, I]``;
2. by output positions ``H_out * W_out``, where the source knows them (the ONNX from shape
   inference, the report from its MAC counts), which tells apart same-shaped layers at
   different resolutions;
3. by content: the layer whose zero pattern (the annotation's mask, or the float weight's
   zeros) agrees best with the int8 filter's zeros;
4. ties and content-free sources (the report) go to the earliest in graph order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vbxfx.errors import CheckError, VbxError
from vbxfx.format import padded_channels

__all__ = ["Declared", "load_declarations", "match_layers", "compiler_shape"]

_STRUCTURAL = ("depthwise", "grouped", "transposed", "Conv1d", "Conv3d")
_ACCEPTED = ("accepted are a vbxfx ONNX (.onnx), a compress report (.json written by "
             "'vbxfx compress --json') or a compressed torch model (nn.Module, or .pt saved "
             "with torch.save)")


@dataclass(frozen=True)
class Declared:
    """One Conv/Linear layer as vbxfx declared it.

    ``fmt`` is ``"comp"``, ``"ucomp"`` or ``"dense"``; ``repeat`` 1/2/4 for comp (None
    otherwise); ``multipliers`` the ucomp multipliers of one output position; ``mask`` and
    ``weight`` are in torch layout ``[O, I, kh, kw]`` / ``[O, I]`` when the source has them.
    ``multipliers`` is what vbxfx reports: :func:`vbxfx.unstructured_macs` of the weight, on
    int8 values per output channel, from every source."""

    name: str
    fmt: str
    repeat: int | None
    shape: tuple[int, ...]
    mask: np.ndarray | None = None
    weight: np.ndarray | None = None
    multipliers: int | None = None
    positions: int | None = None

    @property
    def compressed(self) -> bool:
        return self.fmt in ("comp", "ucomp")


def compiler_shape(torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[O, I, kh, kw] -> [O, kh, kw, I]`` (TFLite's OHWI); ``[O, I]`` unchanged."""
    if len(torch_shape) == 4:
        o, i, kh, kw = torch_shape
        return (o, kh, kw, i)
    return tuple(torch_shape)


def to_compiler_layout(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (0, 2, 3, 1)) if array.ndim == 4 else array


# ------------------------------------------------------------------------------ loading


def load_declarations(expect: Any) -> tuple[str, list[Declared]]:
    """``(description, declared layers in graph order)`` from ``expect`` (module docstring).

    Raises:
        CheckError: the source cannot be read or is none of the accepted kinds.
    """
    import torch

    if isinstance(expect, torch.nn.Module):
        return "the compressed torch model", _from_module(expect)
    if not isinstance(expect, (str, os.PathLike)):
        raise CheckError(f"expect: got a {type(expect).__name__}; {_ACCEPTED}")
    path = os.fspath(expect)
    if not os.path.isfile(path):
        raise CheckError(f"--expect {path}: no such file")
    if path.lower().endswith(".json"):
        return f"{path} (compress report)", _from_report(path)
    if path.lower().endswith(".onnx"):
        return f"{path} (vbxfx ONNX annotations)", _from_onnx(path)
    if path.lower().endswith((".pt", ".pth")):
        from vbxfx.inputs.model_spec import resolve_model
        try:
            model = resolve_model(path).model
        except VbxError as e:
            raise CheckError(f"--expect {path}: {e}") from e
        return f"{path} (compressed torch model)", _from_module(model)
    raise CheckError(f"--expect {path}: unknown kind of file; {_ACCEPTED}")


def _from_onnx(path: str) -> list[Declared]:
    from vbxfx.export.graph import OnnxGraph, attribute
    from vbxfx.export.reader import annotated_nodes, load_onnx

    proto = load_onnx(path)
    notes = {a.node.name: a.annotation for a in annotated_nodes(proto, path)}
    graph = OnnxGraph(proto)
    out = []
    for node in graph.layer_nodes():
        ref = graph.weight(node)
        if ref is None or (node.op_type == "Conv" and int(attribute(node, "group", 1)) != 1):
            continue
        weight = np.asarray(ref.torch_layout(), dtype=np.float32)
        positions = graph.output_positions(node)
        ann = notes.get(node.name)
        if ann is None:
            out.append(Declared(node.name, "dense", None, tuple(weight.shape),
                                mask=weight != 0, weight=weight, positions=positions))
            continue
        mask = ann.encoding.mask.numpy().astype(bool)
        mults = _ucomp_count(weight) if ann.fmt == "ucomp" else None
        if tuple(weight.shape) != tuple(mask.shape):
            raise CheckError(f"{path}: layer {ann.name!r} is annotated with shape "
                             f"{tuple(mask.shape)}, its weight has {tuple(weight.shape)}")
        out.append(Declared(ann.name, ann.fmt, ann.repeat if ann.fmt == "comp" else None,
                            tuple(mask.shape), mask=mask, weight=weight, multipliers=mults,
                            positions=positions))
    return out


def _ucomp_count(weight) -> int:
    """The ucomp multipliers vbxfx reports for a weight (its compress report and check count
    them on per-output-channel int8 values, pairs found by equal magnitude)."""
    import torch

    from vbxfx.format import unstructured_macs
    return unstructured_macs(torch.tensor(np.asarray(weight), dtype=torch.float32))


def _from_report(path: str) -> list[Declared]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckError(f"--expect {path}: not a JSON file ({e})") from e
    report = data.get("report", data) if isinstance(data, dict) else None
    rows = report.get("layers") if isinstance(report, dict) else None
    if not isinstance(rows, list):
        raise CheckError(f"--expect {path}: no 'layers' list; {_ACCEPTED}")
    structured = report.get("fmt", "comp") == "comp"
    out = []
    for k, row in enumerate(rows):
        try:
            name, fmt, shape = str(row["name"]), str(row["fmt"]), tuple(int(d) for d in
                                                                       row["weight_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckError(f"--expect {path}: layers[{k}] lacks name/fmt/weight_shape "
                             f"({e!r})") from e
        reason = str(row.get("reason") or "")
        if len(shape) not in (2, 4) or reason.startswith(_STRUCTURAL):
            continue                      # not a CONV_2D / FULLY_CONNECTED the compiler packs
        repeat = row.get("repeat") if fmt == "comp" else None
        # macs_before: hardware MACs at repeat 4 (eligible layers of comp reports), else
        # standard MACs
        per_position = (shape[0] * int(np.prod(shape[2:])) * padded_channels(shape[1])
                        if structured and row.get("eligible", True) else int(np.prod(shape)))
        before = int(row.get("macs_before") or 0)
        positions = before // per_position if before and before % per_position == 0 else None
        mults = None
        if fmt == "ucomp" and positions:
            mults = int(row["macs_after"]) // positions
        out.append(Declared(name, fmt if fmt in ("comp", "ucomp") else "dense",
                            int(repeat) if repeat is not None else None, shape,
                            multipliers=mults, positions=positions))
    return out


def _from_module(model: Any) -> list[Declared]:
    from torch import nn

    from vbxfx.modules import is_compressed

    out = []
    for name, module in model.named_modules():
        if is_compressed(module):
            mask = module.encoding().mask.detach().cpu().numpy().astype(bool)
            mults = (_ucomp_count(module.compressed_weight().detach().cpu())
                     if module.fmt == "ucomp" else None)
            out.append(Declared(name, module.fmt, module.repeat if module.fmt == "comp" else None,
                                tuple(mask.shape), mask=mask, multipliers=mults))
        elif (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module,
                                                                                    nn.Linear):
            out.append(Declared(name, "dense", None, tuple(module.weight.shape)))
    return out


# ------------------------------------------------------------------------------ matching


def match_layers(layers: list[tuple[tuple[int, ...], np.ndarray, int | None]],
                 declared: list[Declared]) -> tuple[list[Declared | None], list[Declared]]:
    """Pair TFLite layers ``[(compiler shape, int8 values, output positions), ...]`` (in file
    order) with declared layers (module docstring). Returns one Declared or None per TFLite
    layer, and the declared layers left unmatched."""
    free = list(range(len(declared)))
    shapes = [compiler_shape(d.shape) for d in declared]
    result: list[Declared | None] = []
    for shape, values, positions in layers:
        candidates = [k for k in free if shapes[k] == tuple(shape)]
        if positions is not None:
            same = [k for k in candidates if declared[k].positions == positions]
            unknown = [k for k in candidates if declared[k].positions is None]
            candidates = same or unknown or candidates
        if not candidates:
            result.append(None)
            continue
        nonzero = values != 0
        best, best_score = candidates[0], -1.0
        for k in candidates:
            d = declared[k]
            mask = d.mask if d.mask is not None else (None if d.weight is None
                                                      else d.weight != 0)
            score = 0.0 if mask is None else float(np.mean(to_compiler_layout(mask) == nonzero))
            if score > best_score:
                best, best_score = k, score
        free.remove(best)
        result.append(declared[best])
    return result, [declared[k] for k in free]
