"""AnalyzeLayers: find every Conv/Linear layer call, its shapes and its hardware MAC cost.

The pass runs the graph on the example inputs as a ``torch.fx.Interpreter`` (like
``torch.fx.passes.shape_prop.ShapeProp``, whose ``node.meta["tensor_meta"]`` it also writes),
and writes one :class:`vbxfx.layers.LayerInfo` per layer call into
``node.meta["vbxfx.layer"]``. It understands both front ends of :func:`vbxfx.trace`:

- symbolic_trace graphs: ``call_module`` nodes of ``nn.Conv*`` / ``nn.Linear`` modules, and
  ``F.conv2d`` / ``F.linear`` ``call_function`` nodes on a ``get_attr`` parameter;
- torch.export graphs: ``aten.conv2d`` / ``aten.convolution`` / ``aten.linear`` nodes whose
  weight is a ``get_attr`` of the parameter's fully-qualified name, mapped back to the module
  that owns it through the node's ``nn_module_stack``.

>>> gm = vbxfx.trace(model, torch.randn(1, 3, 224, 224))                # doctest: +SKIP
>>> table = AnalyzeLayers(exclude=["fc"])(gm).details                   # doctest: +SKIP
>>> table["fc"].reason                                                  # doctest: +SKIP
'excluded by user'
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from vbxfx.errors import ConfigError
from vbxfx.format.cost import REPEATS, hardware_macs
from vbxfx.layers import LINEAR_NOTE, LayerInfo, LayerTable, module_kind
from vbxfx.meta import LAYER_KEY
from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.trace import INPUTS_KEY, eval_mode, get_root, preserved_state, run_shapes_only

__all__ = ["AnalyzeLayers", "TABLE_KEY", "layer_table"]

logger = logging.getLogger(__name__)

#: ``gm.meta`` key of the LayerTable the last AnalyzeLayers run produced.
TABLE_KEY = "vbxfx.layer_table"

_aten = torch.ops.aten
# call_function targets -> (family, transposed, spelling for messages)
_FUNCTIONS: dict[Any, tuple[str, bool | None, str]] = {
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
        _FUNCTIONS[_op] = ("conv", False, f"F.conv{_d}d")
    _packet = getattr(_aten, f"conv_transpose{_d}d")
    for _overload in _packet.overloads():
        _FUNCTIONS[getattr(_packet, _overload)] = ("conv", True, f"F.conv_transpose{_d}d")

class AnalyzeLayers(GraphPass):
    """Analysis pass: a :class:`~vbxfx.layers.LayerTable` of every Conv/Linear layer.

    Args:
        exclude: fully-qualified layer names or fnmatch globs (``"model.22.*"``) to keep dense;
            they are reported ineligible with reason ``"excluded by user"``.
        example_inputs: inputs to run the graph on; by default the ones :func:`vbxfx.trace`
            recorded in ``gm.meta["vbxfx.example_inputs"]``.

    Raises:
        ConfigError: an ``exclude`` pattern that matches no layer (with the closest names), or
            no example inputs.
    """

    in_place = True
    changes_input = False

    def __init__(self, exclude: str | Iterable[str] = (), *, example_inputs: Any = None):
        if isinstance(exclude, str):
            exclude = (exclude,)
        try:
            patterns = tuple(exclude)
        except TypeError:
            raise ConfigError(f"exclude takes layer names or globs, got {exclude!r}") from None
        bad = [p for p in patterns if not isinstance(p, str) or not p]
        if bad:
            raise ConfigError(f"exclude takes non-empty strings (names or globs), got {bad!r}")
        self.exclude = patterns
        self.example_inputs = example_inputs

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        inputs = self.example_inputs if self.example_inputs is not None else gm.meta.get(INPUTS_KEY)
        if inputs is None:
            raise ConfigError(
                "AnalyzeLayers needs example inputs: trace with vbxfx.trace(model, inputs) or "
                "pass AnalyzeLayers(example_inputs=...)"
            )
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        root = get_root(gm)

        def record(*xs: Any) -> _Recorder:
            recorder = _Recorder(gm, root)
            recorder.run(*xs)
            return recorder

        # Shapes are all the analysis needs: FakeTensors give them without the arithmetic.
        # A graph whose shapes depend on values (nonzero...) runs again on real tensors.
        with eval_mode(gm), preserved_state(root):
            recorder = run_shapes_only(record, tuple(inputs))
        if recorder.hidden:
            logger.warning(
                "%d leaf module(s) hold Conv/Linear layers that run inside them and are not "
                "analysed (their MACs are not counted): %s", len(recorder.hidden),
                ", ".join(recorder.hidden[:5]) + (" ..." if len(recorder.hidden) > 5 else ""))

        table = self._aggregate(recorder.calls, root)
        for node, info, _ in recorder.calls:
            final = table[info.name]
            node.meta[LAYER_KEY] = dataclasses.replace(
                info, eligible=final.eligible, reason=final.reason)
        gm.meta[TABLE_KEY] = table
        logger.info("AnalyzeLayers: %d layers, %d eligible, %s MACs", len(table),
                    len(table.eligible()), f"{table.total_macs:,}")
        return PassResult(gm, modified=False, details=table)

    def _aggregate(self, calls: list, root: nn.Module) -> LayerTable:
        layers: dict[str, LayerInfo] = {}
        fqn_of: dict[str, str | None] = {}
        for node, info, param_fqn in calls:
            prev = layers.get(info.name)
            if prev is None:
                layers[info.name] = info
                fqn_of[info.name] = param_fqn
            elif prev.kind != info.kind:
                layers[info.name] = _ineligible(prev.merged(info), (
                    f"weight also used by a {info.kind} call at node {node.name} "
                    f"(layer is {prev.kind}): vbxfx rewrites modules only"))
            else:
                layers[info.name] = prev.merged(info)

        owners = _parameter_owners(root)
        for name, layer in list(layers.items()):
            param_fqn = fqn_of[name]
            if not layer.eligible or param_fqn is None:
                continue
            others = _others_sharing(root, param_fqn, owners)
            if others:
                layers[name] = _ineligible(layer, "weight shared with layer " + ", ".join(others))

        if self.exclude:
            names = list(layers)
            for pattern in self.exclude:
                hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
                    raise ConfigError(
                        f"exclude pattern {pattern!r} matches no layer"
                        + (f"; closest names: {close}" if close else "")
                        + f" ({len(names)} layers, e.g. {names[:3]})")
                for n in hits:
                    if layers[n].eligible:
                        layers[n] = _ineligible(layers[n], "excluded by user")
        return LayerTable(layers.values())


def layer_table(gm: torch.fx.GraphModule) -> LayerTable:
    """The LayerTable of the last AnalyzeLayers run on ``gm``."""
    try:
        return gm.meta[TABLE_KEY]
    except KeyError:
        raise KeyError("no layer table on this GraphModule: run "
                       "vbxfx.passes.AnalyzeLayers first") from None


# --------------------------------------------------------------------------- interpreter


class _Recorder(torch.fx.Interpreter):
    """Runs the graph, writes ``tensor_meta`` and collects one LayerInfo per layer call."""

    def __init__(self, gm: torch.fx.GraphModule, root: nn.Module):
        super().__init__(gm)
        self.root = root
        self.calls: list[tuple[torch.fx.Node, LayerInfo, str | None]] = []
        self.hidden: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        n.meta.pop(LAYER_KEY, None)
        args = kwargs = None
        if n.op in ("call_module", "call_function"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        _write_tensor_meta(n, result)
        if n.op == "call_module":
            self._module_call(n, args, result)
        elif n.op == "call_function" and n.target in _FUNCTIONS:
            self._function_call(n, args, kwargs, result)
        return result

    def _module_call(self, n: torch.fx.Node, args: tuple, result: Any) -> None:
        mod = self.fetch_attr(n.target)
        kind = module_kind(mod)
        if kind is None:
            inner = [name for name, m in mod.named_modules() if name and module_kind(m)]
            if inner:
                self.hidden.append(f"{n.target} ({type(mod).__name__}: {len(inner)})")
            return
        x = args[0]
        bias = getattr(mod, "bias", None)
        info = _layer_info(
            name=n.target, kind=kind, node=n, weight=mod.weight, x=x, out=result,
            groups=getattr(mod, "groups", 1), transposed=kind == "conv_transpose",
            bias_numel=bias.numel() if isinstance(bias, torch.Tensor) else 0,
            module_type=type(mod).__name__)
        prefix = f"{n.target}." if n.target else ""
        self.calls.append((n, info, prefix + "weight"))

    def _function_call(self, n: torch.fx.Node, args: tuple, kwargs: dict, result: Any) -> None:
        family, transposed, spelling = _FUNCTIONS[n.target]
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        if transposed is None:  # aten.convolution(input, weight, bias, s, p, d, transposed, op, g)
            transposed = bool(_arg(args, kwargs, 6, "transposed", False))
            groups = _arg(args, kwargs, 8, "groups", 1)
        elif family == "linear":
            groups = 1
        else:  # conv: groups at 6 both for convNd and conv_transposeNd
            groups = _arg(args, kwargs, 6, "groups", 1)
        if not isinstance(weight, torch.Tensor) or not isinstance(x, torch.Tensor):
            return
        w_node = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        bias_numel = bias.numel() if isinstance(bias, torch.Tensor) else 0
        kind = _functional_kind(family, transposed, weight.dim())
        owner, param_fqn, why_not = self._weight_owner(n, w_node, family, transposed, weight)
        if owner is not None:  # an export graph's view of an nn.Conv2d / nn.Linear call
            mod = self.root.get_submodule(owner)
            info = _layer_info(name=owner, kind=module_kind(mod), node=n, weight=weight, x=x,
                               out=result, groups=groups, transposed=transposed,
                               bias_numel=bias_numel, module_type=type(mod).__name__)
        else:
            name = param_fqn[: -len(".weight")] if param_fqn and param_fqn.endswith(
                ".weight") else (param_fqn or n.name)
            info = _layer_info(name=name, kind=kind, node=n, weight=weight, x=x, out=result,
                               groups=groups, transposed=transposed, bias_numel=bias_numel,
                               module_type=spelling)
            info = _ineligible(info, f"functional {spelling} call on {why_not}: vbxfx rewrites "
                                     "modules only")
        self.calls.append((n, info, param_fqn))

    def _weight_owner(self, n: torch.fx.Node, w_node: Any, family: str, transposed: bool,
                      weight: torch.Tensor) -> tuple[str | None, str | None, str]:
        """(owner module fqn or None, parameter fqn or None, what the weight is)."""
        if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr":
            what = w_node.name if isinstance(w_node, torch.fx.Node) else repr(w_node)
            return None, None, f"a weight computed in the graph (node {what})"
        fqn = w_node.target
        try:
            param = self.root.get_parameter(fqn)
        except AttributeError:
            return None, fqn, f"the constant tensor {fqn!r}"
        stack = n.meta.get("nn_module_stack")
        if stack:  # torch.export: the innermost module on the call stack
            path = list(stack.values())[-1][0]
        elif fqn == "weight":  # symbolic_trace of a root that is itself a Conv/Linear
            path = ""
        else:  # symbolic_trace: module calls are call_module nodes
            return None, fqn, "a parameter"
        try:
            mod = self.root.get_submodule(path)
        except AttributeError:
            return None, fqn, "a parameter"
        kind = module_kind(mod)
        module_family = "linear" if kind == "linear" else "conv"
        if (kind is not None and getattr(mod, "weight", None) is param
                and module_family == family and (kind == "conv_transpose") == transposed):
            return path, f"{path}.weight" if path else "weight", ""
        return None, fqn, "a parameter"


# --------------------------------------------------------------------------- helpers


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _functional_kind(family: str, transposed: bool, weight_dim: int) -> str:
    if family == "linear":
        return "functional_linear"
    if transposed:
        return "conv_transpose"
    return {3: "conv1d", 4: "functional_conv2d", 5: "conv3d"}.get(weight_dim, "functional_conv2d")


def _ineligible(info: LayerInfo, reason: str) -> LayerInfo:
    return dataclasses.replace(info, eligible=False, reason=reason)


def _structural_reason(kind: str, groups: int, in_channels: int) -> str | None:
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


def _layer_info(*, name: str, kind: str, node: torch.fx.Node, weight: torch.Tensor,
                x: torch.Tensor, out: torch.Tensor, groups: int, transposed: bool,
                bias_numel: int, module_type: str) -> LayerInfo:
    """The per-call record; MACs at batch 1."""
    w = tuple(weight.shape)
    out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    groups = int(groups)
    if kind in ("linear", "functional_linear"):
        out_ch, in_ch = w
        k_pos = 1
        positions = math.prod(out_shape[1:-1]) if len(out_shape) >= 2 else 1
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
    reason = _structural_reason(kind, groups, in_ch)
    return LayerInfo(
        name=name, kind=kind, node_name=node.name, weight_shape=w, in_shape=tuple(x.shape),
        out_shape=out_shape, calls=1, in_channels=in_ch, out_channels=out_ch, groups=groups,
        kernel_positions=k_pos, output_positions=positions, macs=macs, hw_macs=hw,
        params=weight.numel() + bias_numel, eligible=reason is None, reason=reason,
        note=LINEAR_NOTE if kind == "linear" else None, module_type=module_type)


def _parameter_owners(root: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every fully-qualified name under which a module holds it."""
    owners: dict[int, list[str]] = {}
    for prefix, mod in root.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{prefix}.{pname}" if prefix else pname)
    return owners


def _others_sharing(root: nn.Module, param_fqn: str, owners: dict[int, list[str]]) -> list[str]:
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


class _SymbolicShape(RuntimeError):
    """A fake-tensor run met a data-dependent shape; the real run takes over."""


def _write_tensor_meta(n: torch.fx.Node, result: Any) -> None:
    """``node.meta["tensor_meta"]`` as ShapeProp writes it (tuples for tuple results)."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            if not all(isinstance(s, int) for s in obj.shape):
                raise _SymbolicShape(f"{n.format_node()} has the data-dependent shape "
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
