"""AnalyzeLayers: find every Conv/Linear layer call, its shapes and its hardware MAC cost.

The pass runs the graph on the example inputs as a ``torch.fx.Interpreter`` (like
``torch.fx.passes.shape_prop.ShapeProp``, whose ``node.meta["tensor_meta"]`` it also writes),
and writes one :class:`vbxfx.analysis.layers.LayerInfo` per layer call into
``node.meta["vbxfx.layer"]``. It understands both front ends of :func:`vbxfx.trace`:

- symbolic_trace graphs: ``call_module`` nodes of ``nn.Conv*`` / ``nn.Linear`` modules, and
  ``F.conv2d`` / ``F.linear`` ``call_function`` nodes on a ``get_attr`` parameter;
- torch.export graphs: ``aten.conv2d`` / ``aten.convolution`` / ``aten.linear`` nodes whose
  weight is a ``get_attr`` of the parameter's fully-qualified name, mapped back to the module
  that owns it through the node's ``nn_module_stack``.

A layer is eligible only where its compressed weight is what the computation uses: its module
is called (a ``call_module`` node, or its forward on the ``nn_module_stack``) and nothing else
reads its weight. Conv/Linear modules the forward never calls are listed too, dense, with the
reason (a parent such as ``nn.MultiheadAttention`` reads the weight itself, a function such as
torchvision's ``shifted_window_attention`` gets it as an argument, an unused auxiliary head).
Layers whose weight does not train (``requires_grad=False``, like ultralytics' fixed DFL conv)
stay dense as "frozen" unless ``include_frozen=True``; so does ultralytics' DFL convolution,
a fixed decoding step, even in a model frozen as a whole (one loaded for inference).

Every other node runs inside a :class:`vbxfx.op_macs.MacCounter`: its matrix products and
attention kernels become :class:`vbxfx.layers.OpInfo` records in the table, dense cost that
compression cannot remove but every total includes.

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
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.analysis.layer_records import (FUNCTIONS, arg, functional_kind, ineligible, layer_info,
                                 others_sharing, parameter_owners, resolve_module_path,
                                 uncalled_info, weight_owner, write_tensor_meta)
from vbxfx.analysis.layers import OTHER_OPS_WARN_SHARE, LayerInfo, LayerTable, OpInfo, module_kind
from vbxfx.meta import LAYER_KEY
from vbxfx.analysis.op_macs import MacCounter
from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.analysis.trace import INPUTS_KEY, eval_mode, get_root, preserved_state, run_shapes_only
from vbxfx.analysis.weight_use import UNUSED_FORWARD, direct_weight_readers

__all__ = ["AnalyzeLayers", "TABLE_KEY", "layer_table", "FROZEN_REASON"]

logger = logging.getLogger(__name__)

#: ``gm.meta`` key of the LayerTable the last AnalyzeLayers run produced.
TABLE_KEY = "vbxfx.layer_table"
#: The reason of a layer left dense because its weight does not train.
DECODER_REASON = ("a fixed decoding step (ultralytics' DFL: weights 0..15, never trained); "
                  "include_frozen=True compresses it")
FROZEN_REASON = ("frozen (weight.requires_grad=False); include_frozen=True compresses it")

class AnalyzeLayers(GraphPass):
    """Analysis pass: a :class:`~vbxfx.layers.LayerTable` of every Conv/Linear layer and of the
    other multiply-heavy ops.

    Args:
        exclude: fully-qualified layer names or fnmatch globs (``"model.22.*"``) to keep dense;
            they are reported ineligible with reason ``"excluded by user"``.
        example_inputs: inputs to run the graph on; by default the ones :func:`vbxfx.trace`
            recorded in ``gm.meta["vbxfx.example_inputs"]``.
        include_frozen: also compress layers whose weight has ``requires_grad=False`` (by
            default they stay dense, reason "frozen"). When every layer is frozen (a model
            frozen as a whole for inference) frozen-ness says nothing and is ignored.

    Raises:
        ConfigError: an ``exclude`` pattern that matches no layer (with the closest names), or
            no example inputs.
    """

    in_place = True
    changes_input = False

    def __init__(self, exclude: str | Iterable[str] = (), *, example_inputs: Any = None,
                 include_frozen: bool = False):
        if isinstance(exclude, str):
            exclude = (exclude,)
        try:
            patterns = tuple(exclude)
        except TypeError:
            raise ConfigError(f"exclude takes layer names or globs, got {exclude!r}") from None
        bad = [p for p in patterns if not isinstance(p, str) or not p]
        if bad:
            raise ConfigError(f"exclude takes non-empty strings (names or globs), got {bad!r}")
        if not isinstance(include_frozen, bool):
            raise ConfigError(f"include_frozen must be True or False, got {include_frozen!r}")
        self.exclude = patterns
        self.example_inputs = example_inputs
        self.include_frozen = include_frozen

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
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        batch = int(first.shape[0]) if first is not None and first.dim() >= 2 else 1

        def record(*xs: Any) -> _Recorder:
            recorder = _Recorder(gm, root, max(1, batch))
            recorder.run(*xs)
            return recorder

        # Shapes are all the analysis needs: FakeTensors give them without the arithmetic.
        # A graph whose shapes depend on values (nonzero...) runs again on real tensors.
        with eval_mode(gm), preserved_state(root):
            recorder = run_shapes_only(record, tuple(inputs))

        table = self._aggregate(recorder, root)
        for node, info, _ in recorder.calls:
            final = table[info.name]
            node.meta[LAYER_KEY] = dataclasses.replace(
                info, eligible=final.eligible, reason=final.reason)
        gm.meta[TABLE_KEY] = table
        hidden = [l.name for l in table if l.calls == 0 and "leaf module" in (l.reason or "")]
        if hidden:
            logger.warning("%d Conv/Linear layer(s) run inside leaf modules, which vbxfx does not "
                           "trace into: they stay dense (their MACs count as other ops): %s",
                           len(hidden), ", ".join(hidden[:5]) + (" ..." if len(hidden) > 5
                                                                 else ""))
        if table.other_share >= OTHER_OPS_WARN_SHARE:
            logger.warning(
                "%.1f%% of the dense hardware MACs are in multiply-heavy ops that are not "
                "Conv2d/Linear layer calls (attention matmuls, functional calls, ...): they "
                "stay dense and compression cannot remove them; every total includes them",
                100 * table.other_share)
        logger.info("AnalyzeLayers: %d layers, %d eligible, %s standard MACs (%s in other ops)",
                    len(table), len(table.eligible()), f"{table.total_macs:,}",
                    f"{table.other_macs:,}")
        return PassResult(gm, modified=False, details=table)

    def _aggregate(self, recorder: _Recorder, root: nn.Module) -> LayerTable:
        layers: dict[str, LayerInfo] = {}
        fqn_of: dict[str, str | None] = {}
        for node, info, param_fqn in recorder.calls:
            prev = layers.get(info.name)
            if prev is None:
                layers[info.name] = info
                fqn_of[info.name] = param_fqn
            elif prev.kind != info.kind:
                layers[info.name] = ineligible(prev.merged(info), (
                    f"weight also used by a {info.kind} call at node {node.name} "
                    f"(layer is {prev.kind}): vbxfx rewrites modules only"))
            else:
                layers[info.name] = prev.merged(info)

        owners = parameter_owners(root)
        for name, layer in list(layers.items()):
            param_fqn = fqn_of[name]
            if not layer.eligible or param_fqn is None:
                continue
            others = others_sharing(root, param_fqn, owners)
            if others:
                layers[name] = ineligible(layer, "weight shared with layer " + ", ".join(others))

        self._add_uncalled(layers, recorder, root)
        readers = {**recorder.direct, **direct_weight_readers(root)}
        for name, reason in readers.items():
            if name in layers and layers[name].eligible:
                layers[name] = ineligible(layers[name], reason)
        self._mark_frozen(layers, root)

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
                        layers[n] = ineligible(layers[n], "excluded by user")
        return LayerTable(layers.values(), recorder.ops)

    @staticmethod
    def _add_uncalled(layers: dict[str, LayerInfo], recorder: _Recorder,
                      root: nn.Module) -> None:
        """A record for every Conv/Linear module the traced forward does not call itself."""
        readers = direct_weight_readers(root)
        for name, mod in root.named_modules():
            if module_kind(mod) is None or name in layers:
                continue
            reason = recorder.direct.get(name) or readers.get(name)
            if reason is None:
                leaf = next((path for path in recorder.leaves
                             if name.startswith(path + ".")), None)
                reason = (f"runs inside the leaf module {leaf!r} "
                          f"({type(root.get_submodule(leaf)).__name__}), which vbxfx does not "
                          "trace into" if leaf is not None
                          else "never called by the traced forward")
            layers[name] = uncalled_info(name, mod, reason)

    def _mark_frozen(self, layers: dict[str, LayerInfo], root: nn.Module) -> None:
        if not self.include_frozen:
            for name in fixed_decoders(root, [n for n, info in layers.items() if info.eligible]):
                layers[name] = ineligible(layers[name], DECODER_REASON)
        frozen = []
        candidates = 0
        for name, layer in layers.items():
            if not layer.eligible or layer.kind not in ("conv2d", "linear"):
                continue
            candidates += 1
            weight = getattr(root.get_submodule(name), "weight", None)
            if isinstance(weight, torch.Tensor) and not weight.requires_grad:
                frozen.append(name)
        if not frozen or self.include_frozen:
            return
        if len(frozen) == candidates:
            logger.info("every eligible layer's weight has requires_grad=False (a model frozen "
                        "as a whole): frozen layers are compressed like the others")
            return
        for name in frozen:
            layers[name] = ineligible(layers[name], FROZEN_REASON)
        logger.info("%d frozen layer(s) stay dense: %s", len(frozen), ", ".join(frozen[:5]))


def fixed_decoders(root: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` that decode rather than learn: the convolution of ultralytics' DFL
    (its weights are the bin indices 0..15, never trained), frozen or not: a model loaded
    for inference is frozen as a whole, where frozen-ness does not tell it apart."""
    found = []
    for name in names:
        parent = name.rpartition(".")[0]
        if parent and type(root.get_submodule(parent)).__name__ == "DFL":
            found.append(name)
    return found


def layer_table(gm: torch.fx.GraphModule) -> LayerTable:
    """The LayerTable of the last AnalyzeLayers run on ``gm``."""
    try:
        return gm.meta[TABLE_KEY]
    except KeyError:
        raise KeyError("no layer table on this GraphModule: run "
                       "vbxfx.passes.AnalyzeLayers first") from None


# --------------------------------------------------------------------------- interpreter


class _Recorder(torch.fx.Interpreter):
    """Runs the graph, writes ``tensor_meta``, collects one LayerInfo per layer call, an
    OpInfo per other node with multiplies, the leaf modules called and the layers whose
    weight a node other than their own call reads."""

    def __init__(self, gm: torch.fx.GraphModule, root: nn.Module, batch: int):
        super().__init__(gm)
        self.root = root
        self.batch = batch
        self.calls: list[tuple[torch.fx.Node, LayerInfo, str | None]] = []
        self.ops: list[OpInfo] = []
        self.leaves: list[str] = []
        self.direct: dict[str, str] = {}
        self._owners = parameter_owners(root)
        self._dynamic: set[torch.fx.Node] = set()  # nodes that depend on the inputs

    def run_node(self, n: torch.fx.Node) -> Any:
        n.meta.pop(LAYER_KEY, None)
        args = kwargs = None
        if n.op in ("call_module", "call_function"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
        calls = len(self.calls)
        with MacCounter() as counter:
            result = super().run_node(n)
        write_tensor_meta(n, result)
        if n.op == "call_module":
            self._module_call(n, args, result)
        elif n.op == "call_function" and n.target in FUNCTIONS:
            self._function_call(n, args, kwargs, result)
        if n.op == "placeholder" or any(a in self._dynamic for a in n.all_input_nodes):
            self._dynamic.add(n)
        if len(self.calls) == calls:
            if counter.macs and n in self._dynamic:  # constants are folded at export
                self._other_op(n, counter)
            self._direct_reads(n)
        return result

    def _other_op(self, n: torch.fx.Node, counter: MacCounter) -> None:
        where, kind = n.name, ""
        if n.op == "call_module":
            where, kind = str(n.target), type(self.fetch_attr(n.target)).__name__
        elif n.meta.get("nn_module_stack"):
            path, type_name = list(n.meta["nn_module_stack"].values())[-1]
            where = resolve_module_path(self.root, path) or path
            kind = type_name.__name__ if isinstance(type_name, type) else str(
                type_name).rsplit(".", 1)[-1]
        self.ops.append(OpInfo(name=where or "(root)", ops=counter.ops, node_name=n.name,
                               macs=counter.macs // self.batch, module_type=kind))

    def _layer_of(self, node: Any) -> str | None:
        """The Conv/Linear module whose weight or bias a get_attr node reads, if any."""
        if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
            return None
        module, _, attr = str(node.target).rpartition(".")
        if attr not in ("weight", "bias"):
            return None
        try:
            return module if module_kind(self.root.get_submodule(module)) else None
        except AttributeError:
            return None

    def _direct_reads(self, n: torch.fx.Node) -> None:
        """A node that is no layer call of its own but reads a layer's weight or bias."""
        if n.op not in ("call_function", "call_method", "call_module"):
            return
        for source in n.all_input_nodes:
            layer = self._layer_of(source)
            if layer is None or layer in self.direct:
                continue
            what = getattr(n.target, "__name__", str(n.target))
            self.direct[layer] = (f"weight used directly by {what} (node {n.name}): "
                                  f"{UNUSED_FORWARD}")

    def _module_call(self, n: torch.fx.Node, args: tuple, result: Any) -> None:
        mod = self.fetch_attr(n.target)
        kind = module_kind(mod)
        if kind is None:
            if any(module_kind(m) for name, m in mod.named_modules() if name):
                self.leaves.append(str(n.target))
            return
        x = args[0]
        bias = getattr(mod, "bias", None)
        info = layer_info(
            name=n.target, kind=kind, node=n, weight=mod.weight, x=x, out=result,
            groups=getattr(mod, "groups", 1), transposed=kind == "conv_transpose",
            bias_numel=bias.numel() if isinstance(bias, torch.Tensor) else 0,
            module_type=type(mod).__name__, batch=self.batch)
        prefix = f"{n.target}." if n.target else ""
        self.calls.append((n, info, prefix + "weight"))

    def _function_call(self, n: torch.fx.Node, args: tuple, kwargs: dict, result: Any) -> None:
        family, transposed, spelling = FUNCTIONS[n.target]
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        bias = arg(args, kwargs, 2, "bias")
        if transposed is None:  # aten.convolution(input, weight, bias, s, p, d, transposed, op, g)
            transposed = bool(arg(args, kwargs, 6, "transposed", False))
            groups = arg(args, kwargs, 8, "groups", 1)
        elif family == "linear":
            groups = 1
        else:  # conv: groups at 6 both for convNd and conv_transposeNd
            groups = arg(args, kwargs, 6, "groups", 1)
        if not isinstance(weight, torch.Tensor) or not isinstance(x, torch.Tensor):
            return
        w_node = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        bias_numel = bias.numel() if isinstance(bias, torch.Tensor) else 0
        kind = functional_kind(family, transposed, weight.dim())
        owner, param_fqn, why_not = weight_owner(self.root, self._owners, n, w_node, family,
                                                 transposed)
        if owner is not None:  # an export graph's view of an nn.Conv2d / nn.Linear call
            mod = self.root.get_submodule(owner)
            info = layer_info(name=owner, kind=module_kind(mod), node=n, weight=weight, x=x,
                              out=result, groups=groups, transposed=transposed,
                              bias_numel=bias_numel, module_type=type(mod).__name__,
                              batch=self.batch)
        else:
            name = param_fqn[: -len(".weight")] if param_fqn and param_fqn.endswith(
                ".weight") else (param_fqn or n.name)
            info = layer_info(name=name, kind=kind, node=n, weight=weight, x=x, out=result,
                              groups=groups, transposed=transposed, bias_numel=bias_numel,
                              module_type=spelling, batch=self.batch)
            info = ineligible(info, why_not if why_not.startswith("weight of ") else
                              f"functional {spelling} call on {why_not}: vbxfx rewrites "
                              "modules only")
        self.calls.append((n, info, param_fqn))
