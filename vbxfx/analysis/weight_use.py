"""Layers whose weight a parent module reads directly, so that their own forward never runs.

A compressed layer (``VBXConv2d`` / ``VBXLinear``) applies its pattern in its ``forward``; its
``weight`` Parameter stays the dense, trainable one. A parent that computes with
``self.child.weight`` itself (``nn.MultiheadAttention`` passes ``out_proj.weight`` to
``F.multi_head_attention_forward``, torchvision's Swin attention passes ``qkv.weight`` and
``proj.weight`` to ``shifted_window_attention``, ``nn.TransformerEncoderLayer``'s inference
fast path reads every weight) bypasses that forward: torch keeps using the dense weight while an
export of the finalized model would hold the compressed one. Such layers must stay dense.

:func:`direct_weight_readers` finds them without running the model, which the seed API
(``compress_vbx3``, no example input) needs: it reads the source of every parent's
``forward`` for ``self.<child>.weight`` / ``.bias`` (attribute reads such as ``.shape`` or
``.dtype`` do not count), and knows the torch and torchvision classes above even where the
source cannot be read. :func:`called_layers` is the dynamic check, for when an input is at
hand: a short run with forward hooks that records which layers' forward ran and which layer
weights were handed to a torch function outside their own forward.

>>> import torch
>>> class Block(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.attn = torch.nn.MultiheadAttention(16, 2)
...         self.fc = torch.nn.Linear(16, 16)
...     def forward(self, x):
...         return self.fc(self.attn(x, x, x)[0])
>>> sorted(direct_weight_readers(Block()))
['attn.out_proj']
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import textwrap
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vbxfx.analysis.layers import module_kind

__all__ = ["direct_weight_readers", "called_layers", "KNOWN_READERS", "UNUSED_FORWARD"]

logger = logging.getLogger(__name__)

#: Classes known to read their children's weights directly: ``{class name: children}``.
#: (Matched by name, so that torchvision need not be imported.)
KNOWN_READERS: dict[str, tuple[str, ...]] = {
    "MultiheadAttention": ("out_proj",),
    "TransformerEncoderLayer": ("linear1", "linear2", "self_attn.out_proj"),
    "ShiftedWindowAttention": ("qkv", "proj"),
    "ShiftedWindowAttentionV2": ("qkv", "proj"),
}

#: Why such a layer stays dense.
UNUSED_FORWARD = "the layer's forward never runs (a compressed weight would go unused)"

# ``self.a.b.weight`` not followed by a metadata attribute (.shape, .dtype, ...)
_READ = re.compile(r"\bself\.((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\.(?:weight|bias)\b"
                   r"(?!\s*\.\s*(?:shape|dtype|device|size|dim|ndim|numel|requires_grad|is_cuda|"
                   r"layout|is_sparse|data_ptr|is_meta)\b)")


@functools.lru_cache(maxsize=None)
def _read_in_forward(cls: type) -> tuple[str, ...]:
    """Dotted child paths whose weight/bias the class's ``forward`` source reads."""
    forward = getattr(cls, "forward", None)
    if forward is None or (getattr(forward, "__module__", None) or "").startswith(
            "torch.nn.modules.module"):
        return ()
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        return ()
    lines = [ln.split("#", 1)[0] for ln in source.splitlines()]  # comments do not count
    return tuple(dict.fromkeys(m.group(1) for m in _READ.finditer("\n".join(lines))))


def _why(parent_name: str, parent: nn.Module) -> str:
    what = type(parent).__name__
    where = f"{what} {parent_name!r}" if parent_name else f"{what} (the root)"
    if what == "MultiheadAttention":
        how = " (F.multi_head_attention_forward)"
    elif what == "TransformerEncoderLayer":
        how = " (its inference fast path)"
    elif what.startswith("ShiftedWindowAttention"):
        how = " (shifted_window_attention)"
    else:
        how = " in its forward"
    return f"weight used directly by {where}{how}: {UNUSED_FORWARD}"


def direct_weight_readers(model: nn.Module) -> dict[str, str]:
    """``{layer fqn: reason}`` for every Conv/Linear layer whose weight or bias a parent's
    forward reads directly (see the module docstring)."""
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        paths = set(_read_in_forward(type(parent))) | set(
            KNOWN_READERS.get(type(parent).__name__, ()))
        for path in sorted(paths):
            try:
                child = parent.get_submodule(path)
            except AttributeError:
                continue
            if module_kind(child) is None:
                continue
            fqn = f"{parent_name}.{path}" if parent_name else path
            found.setdefault(fqn, _why(parent_name, parent))
    return found


class _WeightArgs(TorchFunctionMode):
    """Records torch functions called with a watched Parameter outside its layer's forward."""

    def __init__(self, watched: dict[int, str], active: list[str]):
        super().__init__()
        self.watched, self.active, self.direct = watched, active, {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for value in list(args) + list(kwargs.values()):
            name = self.watched.get(id(value)) if isinstance(value, torch.Tensor) else None
            if name is not None and (not self.active or self.active[-1] != name):
                fn = getattr(func, "__name__", str(func))
                self.direct.setdefault(name, f"weight passed to {fn} outside the layer's own "
                                             "forward: a compressed weight would not be used")
        return func(*args, **kwargs)


def called_layers(model: nn.Module, example_inputs: tuple,
                  names: list[str]) -> tuple[set[str], dict[str, str]]:
    """Run ``model`` once (eval mode, FakeTensors, no_grad, state restored) with hooks on the
    layers ``names``; return ``(layers whose forward ran, {layer: reason} for the weights
    used directly by something else)``."""
    from vbxfx.analysis.trace import preserved_state, run_shapes_only

    ran: set[str] = set()
    active: list[str] = []
    watched: dict[int, str] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)
        watched[id(layer.weight)] = name

        def pre(_m: nn.Module, _args: Any, name: str = name) -> None:
            ran.add(name)
            active.append(name)

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            active.pop()

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    mode = _WeightArgs(watched, active)
    try:
        with preserved_state(model):
            run_shapes_only(lambda *xs: _run(model, mode, xs), tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return ran, mode.direct


def _run(model: nn.Module, mode: _WeightArgs, xs: tuple) -> Any:
    with mode:
        return model(*xs)
