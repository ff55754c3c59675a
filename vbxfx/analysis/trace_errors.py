"""The TraceError of :func:`vbxfx.trace`: where tracing stopped, both causes, what to do.

The message names the model code that stopped symbolic tracing (the innermost frame outside
torch and vbxfx, with its module's fully-qualified name), the one-line cause from each front
end, and the usual ways out; for a detector (a model with a ``backbone``, like torchvision's
Faster R-CNN, which loops over its images in Python and runs NMS) it shows how to compress
the backbone on its own.
"""

from __future__ import annotations

import linecache
import os
import types

import torch
from torch import nn

from vbxfx.errors import TraceError, one_line

__all__ = ["trace_error"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_VBXFX_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep



def _user_frame(e: BaseException) -> types.FrameType | None:
    """The innermost traceback frame outside torch and vbxfx: the model code that failed."""
    tb, found = e.__traceback__, None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        generated = filename.startswith("<eval_with_key")  # fx's generated forward()
        if not generated and not os.path.abspath(filename).startswith((_TORCH_DIR, _VBXFX_DIR)):
            found = tb
        tb = tb.tb_next
    return found


def _where(e: BaseException, root: nn.Module) -> str | None:
    tb = _user_frame(e)
    if tb is None:
        return None
    frame, lineno = tb.tb_frame, tb.tb_lineno
    code = frame.f_code
    source = linecache.getline(code.co_filename, lineno).strip()
    owner = frame.f_locals.get("self")
    names = {id(m): n for n, m in root.named_modules()}
    if isinstance(owner, nn.Module) and id(owner) in names:
        fqn = names[id(owner)]
        who = f"{type(owner).__name__} at {fqn!r}" if fqn else f"{type(owner).__name__} (the root)"
    else:
        who = f"{code.co_name}()"
    return f"{who}, {code.co_filename}:{lineno}" + (f": `{source}`" if source else "")


def trace_error(model: nn.Module, root: nn.Module, inputs: tuple,
                 errors: dict[str, BaseException]) -> TraceError:
    first = errors.get("symbolic_trace") or errors["export"]
    where = _where(first, root) or _where(errors.get("export", first), root)
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    lines = [f"could not trace {type(model).__name__}"
             + (f": tracing stopped in {where}" if where else "")]
    for name, err in errors.items():
        lines.append(f"  {name}: {type(err).__name__}: {one_line(err)}")
    lines.append(
        "  What to do: keep the module that stops tracing opaque with "
        "vbxfx.trace(..., leaf_modules=(TheModuleClass, 'its.fqn')), remove data-dependent "
        f"Python control flow, or check the example input shapes ({shapes})."
    )
    hint = _backbone_hint(model, inputs)
    if hint:
        lines.append(hint)
    return TraceError("\n".join(lines))


def _backbone_hint(model: nn.Module, inputs: tuple) -> str | None:
    """For a detector (a model with a ``backbone``): compress the backbone on its own.

    torchvision's detection models loop over the images in Python and run data-dependent
    post-processing (NMS); neither front end gets through, whatever the leaf modules. Their
    backbone is an ordinary network that traces.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module) or not list(backbone.modules())[1:]:
        return None
    x = inputs[0] if inputs else None
    channels = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() == 4 else 3
    transform = getattr(model, "transform", None)
    size = getattr(transform, "min_size", None)  # torchvision's GeneralizedRCNNTransform
    size = int(size[-1]) if isinstance(size, (tuple, list)) and size else (
        int(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() == 4 else 224)
    return (
        f"  {type(model).__name__} looks like a detector: its backbone traces; compress it on "
        "its own and put it back:\n"
        f"    result = vbxfx.compress(model.backbone, torch.randn(1, {channels}, {size}, "
        f"{size}), compression=0.66)\n"
        "    model.backbone = result.model\n"
        "  (or vbxfx.compress_vbx3(model, 0.66), which needs no tracing, then fine-tune; "
        "export the backbone with vbxfx.export_onnx(model.backbone, ...))")
