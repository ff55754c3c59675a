"""YOLO's detection head split between the hardware (int8) and the host (float).

ultralytics' ``Detect`` head ends each level with two convolutions, ``cv2.i`` (``4 * reg_max``
box-distribution channels) and ``cv3.i`` (``nc`` class logits); the rest (DFL, anchor
decoding, sigmoid, the concatenation into ``[B, 4 + nc, anchors]``) is arithmetic the host can
do. The VectorBlox SDK's YOLOv8 tutorials cut their int8 files there, and vbxfx does too
(``vbxfx export --tflite --cut-head``): in one int8 tensor, boxes in pixels and probabilities
in [0, 1] share one grid and every probability rounds to zero.

- :func:`head_outputs`: the names of those convolutions' outputs in an ONNX file that
  ``yolo export format=onnx`` wrote (found by the module names it records);
- :func:`decode_head`: the file's outputs (any order, NCHW or NHWC) back to the tensor the
  torch model returns, with the model's own ``Detect`` arithmetic, for ultralytics' NMS and
  metrics.

>>> names = head_outputs(onnx.load("best.onnx"))                    # doctest: +SKIP
>>> preds = decode_head(tflite_outputs, YOLO("best.pt").model)      # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vbxfx.errors import ConfigError

__all__ = ["head_outputs", "decode_head", "detect_head"]

_CONV = re.compile(r"^/model\.(\d+)/(cv2|cv3)\.(\d+)/\2\.\3\.(\d+)/Conv$")


def head_outputs(proto, source: str = "the ONNX model") -> list[str]:
    """The outputs of each level's last box and class convolution, level by level
    (``cv2.0, cv3.0, cv2.1, ...``), in a ``yolo export format=onnx`` file.

    Raises:
        ConfigError: no ultralytics Detect head is recognised (the names it looks for are
            ``/model.N/cv2.I/cv2.I.K/Conv`` and ``/model.N/cv3.I/cv3.I.K/Conv``).
    """
    last: dict[tuple[str, str, int], tuple[int, str]] = {}
    for node in proto.graph.node:
        m = _CONV.match(node.name)
        if node.op_type == "Conv" and m:
            key = (m.group(1), m.group(2), int(m.group(3)))
            if key not in last or int(m.group(4)) > last[key][0]:
                last[key] = (int(m.group(4)), node.output[0])
    heads = sorted({k[0] for k in last}, key=int)
    if not heads:
        raise ConfigError(f"{source} has no ultralytics Detect head: no Conv node is named "
                          "/model.N/cv2.I/cv2.I.K/Conv (write the file with yolo export "
                          "format=onnx, or name the tensors to cut at yourself)")
    head = heads[-1]
    levels = sorted({k[2] for k in last if k[0] == head})
    names = []
    for i in levels:
        for branch in ("cv2", "cv3"):
            if (head, branch, i) not in last:
                raise ConfigError(f"{source}: the Detect head model.{head} has {branch}.{i} "
                                  "missing; cannot cut it")
            names.append(last[(head, branch, i)][1])
    return names


def detect_head(model: nn.Module) -> nn.Module:
    """The ultralytics ``Detect`` module of ``model`` (a DetectionModel or a YOLO)."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    found = [m for m in model.modules() if type(m).__name__ == "Detect"
             and hasattr(m, "reg_max") and hasattr(m, "stride")]
    if len(found) != 1:
        raise ConfigError(f"{type(model).__name__} holds {len(found)} ultralytics Detect heads; "
                          "decode_head needs exactly one")
    return found[0]


def _nchw(a: np.ndarray, layout: str) -> np.ndarray:
    if a.ndim != 4:
        raise ConfigError(f"a head output has shape {list(a.shape)}; expected 4-D {layout}")
    return a if layout == "NCHW" else np.transpose(a, (0, 3, 1, 2))


def decode_head(outputs: Sequence[Any], model: nn.Module, layout: str = "NCHW") -> torch.Tensor:
    """``[B, 4 + nc, anchors]`` (boxes in pixels, class probabilities), as the torch model
    returns in eval mode, from the cut file's head outputs.

    Args:
        outputs: the ``2 * levels`` raw head tensors (numpy or torch, float), in any order;
            told apart by channel count and size.
        layout: ``"NCHW"`` (ONNX, torch) or ``"NHWC"`` (TFLite files from onnx2tf).
        model: the float model the file was made from (its ``Detect`` head gives ``nc``,
            ``reg_max``, strides and the DFL).

    Raises:
        ConfigError: the tensors do not match the head (count, channels, sizes).
    """
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    head = detect_head(model)
    nc, box_ch, nl = int(head.nc), 4 * int(head.reg_max), int(head.nl)
    if nc == box_ch:
        raise ConfigError(f"the head has {nc} classes and {box_ch} box channels: the outputs "
                          "cannot be told apart by shape")
    arrays = [_nchw(np.asarray(o.detach().cpu().numpy() if hasattr(o, "detach") else o,
                               dtype=np.float32), layout) for o in outputs]
    if len(arrays) != 2 * nl:
        raise ConfigError(f"the head has {nl} levels: expected {2 * nl} outputs, got "
                          f"{len(arrays)}")
    boxes = sorted((a for a in arrays if a.shape[1] == box_ch), key=lambda a: -a.shape[2] * a.shape[3])
    scores = sorted((a for a in arrays if a.shape[1] == nc), key=lambda a: -a.shape[2] * a.shape[3])
    if len(boxes) != nl or len(scores) != nl or any(
            b.shape[2:] != s.shape[2:] for b, s in zip(boxes, scores)):
        raise ConfigError(f"head outputs {[list(a.shape) for a in arrays]} do not pair up into "
                          f"{nl} levels of {box_ch} box and {nc} class channels")
    bs = boxes[0].shape[0]
    feats = [torch.from_numpy(b) for b in boxes]
    x = {"boxes": torch.cat([f.reshape(bs, box_ch, -1) for f in feats], -1),
         "scores": torch.cat([torch.from_numpy(s).reshape(bs, nc, -1) for s in scores], -1),
         "feats": feats}
    with torch.no_grad():
        return head._inference(x)
