"""Building blocks of AnalyzeLayers: per-call layer records, module paths, tensor metadata.

:func:`resolve_module_path` turns a torch.export ``nn_module_stack`` path into the module's
fully-qualified name. torch.export spells a module reached through a slice of a container as
``model.slice(None, -1, None).0`` (ultralytics' RT-DETR runs ``for m in self.model[:-1]``), and
one reached by a negative index as ``model.-1``; both name ``model.0`` / the last child here.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
>>> resolve_module_path(m, "slice(None, -1, None).0"), resolve_module_path(m, "-1")
('0', '2')
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from vbxfx.format.cost import REPEATS, hardware_macs
from vbxfx.analysis.layers import LINEAR_NOTE, LayerInfo, module_kind
from vbxfx.analysis.weight_use import UNUSED_FORWARD

__all__ = ["FUNCTIONS", "weight_owner", "arg", "functional_kind", "ineligible", "structural_reason", "layer_info",
           "uncalled_info", "parameter_owners", "others_sharing", "write_tensor_meta",
           "resolve_module_path", "SymbolicShape"]

_aten = torch.ops.aten
#: call_function targets -> (family, transposed, spelling for messages)
FUNCTIONS: dict[Any, tuple[str, bool | None, str]] = {
    F.conv1d: ("conv", False, "F.conv1d"),
    F.conv2d: ("conv", False, "F.conv2d"),
    F.conv3d: ("conv", False, "F.conv3d"),
    F.conv_transpose1d: ("conv", True, "F.conv_transpose1d"),
    F.conv_transpose2d: ("conv", True, "F.conv_transpose2d"),
    F.conv_transpose3d: ("conv", True, "F.conv_transpose3d"),
    F.linear: ("linear", False, "F.linear"),
    _aten.linear.default: ("linear", False, "F.linear"),
    _aten.convolution.default: ("conv", None, "F.conv2d"),
    _aten._convolution.default: ("conv", None, "F.conv2d"),
}
for _d in (1, 2, 3):
    for _overload in ("default", "padding"):
        _op = getattr(getattr(_aten, f"conv{_d}d"), _overload)
        FUNCTIONS[_op] = ("conv", False, f"F.conv{_d}d")
    _packet = getattr(_aten, f"conv_transpose{_d}d")
    for _overload in _packet.overloads():
        FUNCTIONS[getattr(_packet, _overload)] = ("conv", True, f"F.conv_transpose{_d}d")



_PART = re.compile(r"slice\([^)]*\)|[^.]+")


def resolve_module_path(root: nn.Module, path: str) -> str | None:
    """The fully-qualified name of the submodule an ``nn_module_stack`` path names, or None
    when the path does not lead to a submodule of ``root``."""
    if not path:
        return ""
    module: nn.Module = root
    names: list[str] = []
    view: list[tuple[str, nn.Module]] | None = None  # the children after a slice
    for part in _PART.findall(path):
        if part.startswith("slice("):
            try:
                bounds = ast.literal_eval("(" + part[len("slice("):-1] + ",)")
                items = view if view is not None else list(module._modules.items())
                view = items[slice(*bounds)]
            except (ValueError, SyntaxError, TypeError):
                return None
            continue
        if view is None and part in module._modules:
            name, child = part, module._modules[part]
        else:
            items = view if view is not None else list(module._modules.items())
            try:
                name, child = items[int(part)]
            except (ValueError, IndexError):
                return None
        view = None
        if child is None:
            return None
        names.append(name)
        module = child
    return None if view is not None else ".".join(names)


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def functional_kind(family: str, transposed: bool, weight_dim: int) -> str:
    if family == "linear":
        return "functional_linear"
    if transposed:
        return "conv_transpose"
    return {3: "conv1d", 4: "functional_conv2d", 5: "conv3d"}.get(weight_dim, "functional_conv2d")


def ineligible(info: LayerInfo, reason: str) -> LayerInfo:
    return dataclasses.replace(info, eligible=False, reason=reason)


def structural_reason(kind: str, groups: int, in_channels: int) -> str | None:
    if kind == "conv_transpose":
        return "transposed conv"
    if kind == "conv1d":
        return "Conv1d"
    if kind == "conv3d":
        return "Conv3d"
    if groups != 1:
        if groups == in_channels:
            return f"depthwise conv (groups={groups})"
        return f"grouped conv (groups={groups})"
    return None


def layer_info(*, name: str, kind: str, node: torch.fx.Node, weight: torch.Tensor,
                x: torch.Tensor, out: torch.Tensor, groups: int, transposed: bool,
                bias_numel: int, module_type: str, batch: int = 1) -> LayerInfo:
    """The per-call record; MACs at batch 1 (``batch``: the model's batch size; a Linear's
    output positions are its output rows per batch element, whatever the layout: an
    attention block may run it on ``[seq, batch, features]`` or on windows)."""
    w = tuple(weight.shape)
    out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    groups = int(groups)
    if kind in ("linear", "functional_linear"):
        out_ch, in_ch = w
        k_pos = 1
        rows = math.prod(out_shape[:-1]) if out_shape else 1
        positions = max(1, rows // max(1, batch)) if len(out_shape) >= 2 else 1
        mac_positions, out_per, in_per = positions, out_ch, in_ch
    else:
        spatial = len(w) - 2
        k_pos = math.prod(w[2:])
        positions = math.prod(out_shape[-spatial:])
        if transposed:  # weight [I, O/g, k...]; each input position scatters a kernel
            in_ch, out_ch = w[0], w[1] * groups
            mac_positions, out_per, in_per = math.prod(tuple(x.shape)[-spatial:]), w[1], w[0]
        else:  # weight [O, I/g, k...]
            in_ch, out_ch = w[1] * groups, w[0]
            mac_positions, out_per, in_per = positions, w[0], w[1]
    macs = out_per * in_per * k_pos * mac_positions
    hw = {r: hardware_macs(out_per, in_per, k_pos, mac_positions, r) for r in REPEATS}
    reason = structural_reason(kind, groups, in_ch)
    return LayerInfo(
        name=name, kind=kind, node_name=node.name, weight_shape=w, in_shape=tuple(x.shape),
        out_shape=out_shape, calls=1, in_channels=in_ch, out_channels=out_ch, groups=groups,
        kernel_positions=k_pos, output_positions=positions, macs=macs, hw_macs=hw,
        params=weight.numel() + bias_numel, eligible=reason is None, reason=reason,
        note=LINEAR_NOTE if kind == "linear" else None, module_type=module_type)


def uncalled_info(name: str, module: nn.Module, reason: str) -> LayerInfo:
    """The record of a Conv/Linear module the traced forward does not call: no calls, no MACs
    of its own (where its weight is used, the op that uses it counts them), dense."""
    kind = module_kind(module)
    w = tuple(module.weight.shape)
    groups = int(getattr(module, "groups", 1))
    if kind == "linear":
        out_ch, in_ch, k = w[0], w[1], 1
    elif kind == "conv_transpose":
        in_ch, out_ch, k = w[0], w[1] * groups, math.prod(w[2:])
    else:
        out_ch, in_ch, k = w[0], w[1] * groups, math.prod(w[2:])
    bias = getattr(module, "bias", None)
    return LayerInfo(
        name=name, kind=kind, node_name="", weight_shape=w, in_shape=(), out_shape=(), calls=0,
        in_channels=in_ch, out_channels=out_ch, groups=groups, kernel_positions=k,
        output_positions=0, macs=0, hw_macs={r: 0 for r in REPEATS},
        params=module.weight.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0),
        eligible=False, reason=reason, note=LINEAR_NOTE if kind == "linear" else None,
        module_type=type(module).__name__, node_names=("",))


def weight_owner(root: nn.Module, owners: dict[int, list[str]], n: torch.fx.Node, w_node: Any,
                 family: str, transposed: bool) -> tuple[str | None, str | None, str]:
    """For a functional conv/linear node: (the Conv/Linear module whose call it is, or None;
    the parameter's fqn or None; what the weight is, for the reason). torch.export graphs
    name the caller in ``nn_module_stack``; ``owners`` is :func:`parameter_owners`."""
    if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr":
        what = w_node.name if isinstance(w_node, torch.fx.Node) else repr(w_node)
        return None, None, f"a weight computed in the graph (node {what})"
    fqn = w_node.target
    try:
        param = root.get_parameter(fqn)
    except AttributeError:
        return None, fqn, f"the constant tensor {fqn!r}"
    stack = n.meta.get("nn_module_stack")
    caller = None
    if stack:  # torch.export: the innermost module on the call stack
        raw, caller = list(stack.values())[-1]
        path = resolve_module_path(root, raw)
        if path is None:  # a spelling the resolver does not know: trust the owner's type
            path = _owner_by_type(root, owners, param, str(caller))
    elif fqn == "weight":  # symbolic_trace of a root that is itself a Conv/Linear
        path = ""
    else:  # symbolic_trace: module calls are call_module nodes
        path = None
    mod = None
    if path is not None:
        try:
            mod = root.get_submodule(path)
        except AttributeError:
            mod = None
    kind = module_kind(mod) if mod is not None else None
    module_family = "linear" if kind == "linear" else "conv"
    if (kind is not None and getattr(mod, "weight", None) is param
            and module_family == family and (kind == "conv_transpose") == transposed):
        return path, f"{path}.weight" if path else "weight", ""
    return None, fqn, _describe_param(root, fqn, n, path, caller)

def _owner_by_type(root: nn.Module, owners: dict[int, list[str]], param: torch.Tensor,
                   caller: str) -> str | None:
    """The module holding ``param`` as its weight, when its class is ``caller``."""
    for fqn in owners.get(id(param), []):
        module, _, attr = fqn.rpartition(".")
        mod = root.get_submodule(module)
        if attr == "weight" and f"{type(mod).__module__}.{type(mod).__qualname__}" == caller:
            return module
    return None

def _describe_param(root: nn.Module, fqn: str, n: torch.fx.Node, path: str | None,
                    caller: Any) -> str:
    module, _, attr = fqn.rpartition(".")
    try:
        owner = root.get_submodule(module)
    except AttributeError:
        return "a parameter"
    if module_kind(owner) is None or attr != "weight":
        where = f"{type(owner).__name__} {module!r}" if module else "the root module"
        return f"parameter {fqn!r} of {where}"
    if path is not None and caller is not None:
        name = caller.__name__ if isinstance(caller, type) else str(caller).rsplit(".", 1)[-1]
        user = f"{name} {path!r}" if path else "the root"
    else:
        user = f"{getattr(n.target, '__name__', n.target)} at node {n.name}"
    return (f"weight of {type(owner).__name__} {module!r} used directly by {user}: "
            f"{UNUSED_FORWARD}")


def parameter_owners(root: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every fully-qualified name under which a module holds it."""
    owners: dict[int, list[str]] = {}
    for prefix, mod in root.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{prefix}.{pname}" if prefix else pname)
    return owners


def others_sharing(root: nn.Module, param_fqn: str, owners: dict[int, list[str]]) -> list[str]:
    try:
        param = root.get_parameter(param_fqn)
    except AttributeError:
        return []
    others = []
    for fqn in owners.get(id(param), []):
        if fqn != param_fqn:
            name = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
            if name not in others:
                others.append(name)
    return others


class SymbolicShape(RuntimeError):
    """A fake-tensor run met a data-dependent shape; the real run takes over."""


def write_tensor_meta(n: torch.fx.Node, result: Any) -> None:
    """``node.meta["tensor_meta"]`` as ShapeProp writes it (tuples for tuple results)."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            if not all(isinstance(s, int) for s in obj.shape):
                raise SymbolicShape(f"{n.format_node()} has the data-dependent shape "
                                     f"{tuple(obj.shape)}")
            try:
                return _extract_tensor_metadata(obj)
            except Exception:  # exotic tensors: the shape is all vbxfx needs
                return TensorMetadata(
                    obj.shape, obj.dtype, False, (), None, False, {})
        return obj

    meta = map_aggregate(result, extract)
    if found:
        n.meta["tensor_meta"] = meta
    else:
        n.meta.pop("tensor_meta", None)
