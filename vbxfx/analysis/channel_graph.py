"""The channel-flow graph of a traced model, built node by node (the ChannelFlow pass's
builder; the pass and the graph's schema are in :mod:`vbxfx.passes.channel_flow`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import networkx as nx
import torch
import torch.fx

from vbxfx.analysis.channel_ops import (ADD_LIKE, CAT, FIRST_ONLY, MUL_LIKE, NO_FLOW, PERMUTE,
                                        REDUCE, SAME_MODULES, SAME_SHAPE, SPLIT, STACK, VIEW,
                                        default_dim, is_getitem, is_tuple_meta, meta_shape,
                                        node_arg, opname, permuted_dim, reduced_dim, viewed_dim)
from vbxfx.meta import LAYER_KEY

__all__ = ["FlowGraphBuilder"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Flow:
    """A tensor whose dim ``dim`` carries the channels of flow-graph node ``src``."""

    src: str
    dim: int
    through: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """The tuple a chunk/split returns: piece i holds ``bounds[i]`` of ``flow``'s channels."""

    flow: _Flow
    kind: str
    bounds: tuple[tuple[int, int], ...] | None  # None: split along another dim


@dataclasses.dataclass(frozen=True)
class _OpaqueTuple:
    """The tuple an opaque op returns; ``dim``/``shape``: its first input's channel dim/shape."""

    src: str
    dim: int | None
    shape: tuple[int, ...] | None


class FlowGraphBuilder:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = nx.DiGraph()
        self.state: dict[torch.fx.Node, Any] = {}
        self.n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")

    # ----------------------------------------------------------------- graph helpers
    def add_node(self, name: str, type_: str, **attrs: Any) -> str:
        if name not in self.graph:
            self.graph.add_node(name, type=type_, **attrs)
        return name

    def connect(self, flow: _Flow, dst: str, kind: str, channels: int | None, offset: int = 0):
        if self.graph.has_edge(flow.src, dst):
            data = self.graph.edges[flow.src, dst]
            data["offsets"] = data["offsets"] + (offset,)
            data["through"] = data["through"] + tuple(
                t for t in flow.through if t not in data["through"])
            return
        self.graph.add_edge(flow.src, dst, kind=kind, channels=channels, offset=offset,
                            offsets=(offset,), through=flow.through)

    def shape(self, n: Any) -> tuple[int, ...] | None:
        if isinstance(n, _PieceRef):
            metas = n.node.meta.get("tensor_meta")
            return meta_shape(metas[n.index]) if is_tuple_meta(metas) else None
        return meta_shape(n.meta.get("tensor_meta")) if isinstance(n, torch.fx.Node) else None

    def flow_of(self, arg: Any) -> _Flow | None:
        value = self.state.get(arg) if isinstance(arg, (torch.fx.Node, _PieceRef)) else None
        return value if isinstance(value, _Flow) else None

    def channels(self, n: Any, flow: _Flow) -> int | None:
        shape = self.shape(n)
        return shape[flow.dim] if shape is not None and flow.dim < len(shape) else None

    def tensor_args(self, n: torch.fx.Node) -> list[torch.fx.Node]:
        """The arguments that carry channels (each once, in order)."""
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
        name = opname(n, self.gm) if n.op != "call_module" else ""
        if name in NO_FLOW:
            return []
        if name in FIRST_ONLY:
            found = found[:1]
        return [a for a in dict.fromkeys(found) if a in self.state]

    def label(self, n: torch.fx.Node) -> str | None:
        """How ``through`` names a parametrised op: module fqn, or None when unparametrised."""
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            has_state = next(iter(mod.parameters()), None) is not None or next(
                iter(mod.buffers()), None) is not None
            return str(n.target) if has_state else None
        if any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.all_input_nodes):
            stack = n.meta.get("nn_module_stack")
            return list(stack.values())[-1][0] if stack else n.name
        return None

    def passed(self, n: torch.fx.Node, flow: _Flow, dim: int) -> _Flow:
        label = self.label(n)
        through = flow.through + ((label,) if label and label not in flow.through else ())
        return _Flow(flow.src, dim, through)

    def opaque(self, n: torch.fx.Node, flows: list[tuple[_Flow, Any]],
               kind: str = "opaque") -> None:
        """A node for an op the flow does not follow; its outputs start new flows."""
        name = self.add_node(f"op:{n.name}", "opaque", op=opname(n, self.gm))
        for flow, arg in flows:
            self.connect(flow, name, kind, self.channels(arg, flow))
        # Guess where the output keeps its channels: where its first input did when the
        # shapes agree (attention keeps [B, T, C]), else dim 1 (NCHW).
        first = flows[0] if flows else None
        in_shape = self.shape(first[1]) if first else None
        meta = n.meta.get("tensor_meta")
        if is_tuple_meta(meta):
            self.state[n] = _OpaqueTuple(name, first[0].dim if first else None, in_shape)
        elif meta is not None:
            shape = meta_shape(meta)
            same = first is not None and shape == in_shape
            self.state[n] = _Flow(name, first[0].dim if same else default_dim(shape))

    # ----------------------------------------------------------------- visiting
    def visit(self, n: torch.fx.Node) -> None:
        if n.op == "placeholder":
            shape = self.shape(n)
            if shape is not None:
                name = "input" if self.n_inputs == 1 else f"input:{n.name}"
                dim = default_dim(shape)
                self.add_node(name, "input", channels=shape[dim] if shape else None)
                self.state[n] = _Flow(name, dim)
            return
        if n.op == "output":
            outs: list[torch.fx.Node] = []
            torch.fx.node.map_arg(n.args, lambda a: outs.append(a) or a)
            for arg in outs:
                flow = self.flow_of(arg)
                if flow is not None:
                    self.add_node("output", "output")
                    self.connect(flow, "output", "unchanged", self.channels(arg, flow))
            return
        if n.op not in ("call_module", "call_function", "call_method"):
            return
        if LAYER_KEY in n.meta:
            self.visit_layer(n, n.meta[LAYER_KEY])
            return
        inputs = [(self.state[a], a) for a in self.tensor_args(n)]
        if not inputs or "tensor_meta" not in n.meta and not is_getitem(n):
            return  # no channels come in, or nothing with channels comes out
        name = opname(n, self.gm)
        if is_getitem(n):
            self.visit_getitem(n)
        elif name in CAT or name in STACK:
            self.visit_cat(n, stack=name in STACK)
        elif name in SPLIT:
            self.visit_split(n, SPLIT[name])
        elif name in ADD_LIKE or name in MUL_LIKE:
            self.visit_elementwise(n, "add" if name in ADD_LIKE else "mul")
        elif name in VIEW or name in PERMUTE or name in REDUCE:
            self.visit_reshape(n, name)
        elif name == "slice" or name == "narrow":
            self.visit_slice(n)
        elif name == "select":
            self.visit_select(n)
        elif self.same_shape(n, name):
            self.visit_unary(n)
        else:
            self.opaque(n, [(s, a) for s, a in inputs if isinstance(s, _Flow)])

    def same_shape(self, n: torch.fx.Node, name: str) -> bool:
        if n.op == "call_module":
            return isinstance(self.gm.get_submodule(n.target), SAME_MODULES)
        return name in SAME_SHAPE

    def visit_layer(self, n: torch.fx.Node, info: Any) -> None:
        x = n.args[0] if n.args else n.kwargs.get("input")
        flow = self.flow_of(x)
        in_shape, out_shape = info.in_shape, info.out_shape
        is_linear = info.kind in ("linear", "functional_linear")
        spatial = 0 if is_linear else len(info.weight_shape) - 2
        in_dim = len(in_shape) - 1 - spatial
        out_dim = len(out_shape) - 1 - spatial
        depthwise = (not is_linear and info.groups > 1
                     and info.groups == info.in_channels == info.out_channels)
        if depthwise and flow is not None and flow.dim == in_dim:
            self.state[n] = _Flow(flow.src, out_dim, flow.through + (info.name,))
            return
        self.add_node(info.name, "layer", kind=info.kind, eligible=info.eligible,
                      in_channels=info.in_channels, out_channels=info.out_channels)
        if flow is not None:
            kind = "unchanged" if flow.dim == in_dim else "reshape"
            self.connect(flow, info.name, kind, self.channels(x, flow))
        self.state[n] = _Flow(info.name, out_dim)

    def visit_unary(self, n: torch.fx.Node) -> None:
        flows = {self.state[a]: a for a in self.tensor_args(n) if self.flow_of(a)}
        out = self.shape(n)
        if len(flows) == 1 and out is not None:
            flow, arg = next(iter(flows.items()))
            shape = self.shape(arg)
            if shape is not None and len(out) == len(shape) and out[flow.dim] == shape[flow.dim]:
                self.state[n] = self.passed(n, flow, flow.dim)
                return
        self.opaque(n, [(f, a) for f, a in flows.items()])

    def visit_elementwise(self, n: torch.fx.Node, kind: str) -> None:
        out = self.shape(n)
        flows = []  # (flow with its dim in the broadcast output, channels it brings)
        for arg in self.tensor_args(n):
            flow, shape = self.flow_of(arg), self.shape(arg)
            if flow is not None and shape is not None and out is not None:
                shifted = _Flow(flow.src, flow.dim + len(out) - len(shape), flow.through)
                flows.append((shifted, shape[flow.dim]))
        dims = {f.dim for f, _ in flows}
        srcs = {f.src for f, _ in flows}
        if not flows or len(dims) != 1:
            self.opaque(n, [(self.state[a], a) for a in self.tensor_args(n) if self.flow_of(a)])
        elif len(srcs) == 1:
            first = flows[0][0]
            through = tuple(dict.fromkeys(t for f, _ in flows for t in f.through))
            self.state[n] = self.passed(n, _Flow(first.src, first.dim, through), first.dim)
        else:
            join = self.add_node(f"{kind}:{n.name}", kind, channels=out[dims.pop()])
            for flow, channels in flows:
                self.connect(flow, join, kind, channels)
            self.state[n] = _Flow(join, flows[0][0].dim)

    def visit_cat(self, n: torch.fx.Node, stack: bool) -> None:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = node_arg(n, 1, "dim", 0)
        items = self.expand_tuple(tensors)
        out = self.shape(n)
        if out is None or items is None:
            self.opaque(n, [(self.state[a], a) for a in self.tensor_args(n) if self.flow_of(a)])
            return
        dim %= len(out)
        flows = [(self.flow_of(a), a) for a in items]
        sourced = [(f, a) for f, a in flows if f is not None]
        if not stack and sourced and all(f.dim == dim for f, _ in sourced):
            join = self.add_node(f"cat:{n.name}", "cat", channels=out[dim])
            offset = 0
            for flow, arg in flows:
                size = self.shape(arg)[dim] if self.shape(arg) is not None else 0
                if flow is not None:
                    self.connect(flow, join, "concat", size, offset)
                offset += size
            self.state[n] = _Flow(join, dim)
            return
        # cat / stack along another dim: channel c of every input meets channel c
        shifted = [(_Flow(f.src, f.dim + (1 if stack and dim <= f.dim else 0), f.through), a)
                   for f, a in sourced]
        dims = {f.dim for f, _ in shifted}
        if len(dims) != 1:
            self.opaque(n, sourced)
        elif len({f.src for f, _ in shifted}) == 1:
            self.state[n] = self.passed(n, shifted[0][0], shifted[0][0].dim)
        else:
            join = self.add_node(f"{'stack' if stack else 'cat'}:{n.name}", "add",
                                 channels=out[dims.copy().pop()])
            for (flow, arg), (orig, _) in zip(shifted, sourced, strict=True):
                self.connect(flow, join, "add", self.channels(arg, orig))
            self.state[n] = _Flow(join, dims.pop())

    def expand_tuple(self, tensors: Any) -> list | None:
        """The list of cat inputs; pieces of a chunk passed whole become split nodes."""
        if isinstance(tensors, (list, tuple)):
            return list(tensors)
        if isinstance(tensors, torch.fx.Node) and isinstance(self.state.get(tensors), _Pieces):
            pieces = self.state[tensors]
            items = []
            for i in range(len(pieces.bounds or ())):
                items.append(_PieceRef(tensors, i))
                self.state[items[-1]] = self.piece(tensors, i, f"{tensors.name}.{i}")
            return items
        return None

    def visit_split(self, n: torch.fx.Node, kind: str) -> None:
        x = n.args[0]
        flow, shape = self.flow_of(x), self.shape(x)
        metas = n.meta.get("tensor_meta")
        if flow is None or shape is None or not is_tuple_meta(metas):
            self.opaque(n, [(self.state[a], a) for a in self.tensor_args(n) if self.flow_of(a)])
            return
        dim = node_arg(n, 2, "dim", 0) % len(shape)
        if kind == "split" and opname(n, self.gm) == "unbind":
            dim = node_arg(n, 1, "dim", 0) % len(shape)
        if dim == flow.dim and opname(n, self.gm) != "unbind":
            bounds, offset = [], 0
            for meta in metas:
                size = meta_shape(meta)[dim]
                bounds.append((offset, size))
                offset += size
            self.state[n] = _Pieces(self.passed(n, flow, flow.dim), kind, tuple(bounds))
        elif dim == flow.dim:
            self.opaque(n, [(flow, x)])
        else:
            new_dim = flow.dim - (1 if opname(n, self.gm) == "unbind" and dim < flow.dim else 0)
            self.state[n] = _Pieces(_Flow(flow.src, new_dim, flow.through), kind, None)

    def piece(self, tuple_node: torch.fx.Node, index: int, name: str) -> _Flow:
        pieces: _Pieces = self.state[tuple_node]
        if pieces.bounds is None:
            return pieces.flow
        offset, size = pieces.bounds[index]
        node = self.add_node(f"{pieces.kind}:{name}", "split", channels=size, offset=offset)
        self.connect(pieces.flow, node, pieces.kind, size, offset)
        return _Flow(node, pieces.flow.dim)

    def visit_getitem(self, n: torch.fx.Node) -> None:
        src, index = n.args[0], n.args[1]
        value = self.state.get(src)
        if isinstance(value, _Pieces) and isinstance(index, int):
            self.state[n] = self.piece(src, index, n.name)
        elif isinstance(value, _OpaqueTuple):
            shape = self.shape(n)
            if shape is not None:
                same = value.dim is not None and shape == value.shape
                self.state[n] = _Flow(value.src, value.dim if same else default_dim(shape))
        elif isinstance(value, _Flow):
            self.visit_index(n, value, index)

    def visit_index(self, n: torch.fx.Node, flow: _Flow, index: Any) -> None:
        """``x[...]`` on a tensor: follow the channel dim through ints, slices, None, ...."""
        shape = self.shape(n.args[0])
        index = index if isinstance(index, tuple) else (index,)
        if shape is None or any(isinstance(i, torch.fx.Node) for i in index):
            self.opaque(n, [(flow, n.args[0])])
            return
        if Ellipsis in index:
            k = index.index(Ellipsis)
            used = sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:k] + (slice(None),) * (len(shape) - used) + index[k + 1:]
        in_dim = out_dim = 0
        for i in index:
            if i is None:
                out_dim += 1
                continue
            if in_dim == flow.dim:
                if isinstance(i, slice) and i == slice(None):
                    self.state[n] = self.passed(n, flow, out_dim)
                elif isinstance(i, slice) and i.step in (None, 1):
                    start, stop, _ = i.indices(shape[in_dim])
                    node = self.add_node(f"split:{n.name}", "split", channels=stop - start,
                                         offset=start)
                    self.connect(flow, node, "split", stop - start, start)
                    self.state[n] = _Flow(node, out_dim)
                else:
                    self.opaque(n, [(flow, n.args[0])])
                return
            in_dim += 1
            out_dim += 0 if isinstance(i, int) else 1
        self.state[n] = self.passed(n, flow, out_dim + flow.dim - in_dim)

    def visit_slice(self, n: torch.fx.Node) -> None:
        """aten.slice(x, dim, start, end, step) and narrow(x, dim, start, length)."""
        x = n.args[0]
        flow, shape = self.flow_of(x), self.shape(x)
        if flow is None or shape is None:
            return
        dim = node_arg(n, 1, "dim", 0) % len(shape)
        if dim != flow.dim:
            self.state[n] = self.passed(n, flow, flow.dim)
            return
        out = self.shape(n)
        start = node_arg(n, 2, "start", 0) or 0
        if opname(n, self.gm) == "slice" and (node_arg(n, 4, "step", 1) or 1) != 1:
            self.opaque(n, [(flow, x)])
            return
        start = start + shape[dim] if start < 0 else min(start, shape[dim])
        node = self.add_node(f"split:{n.name}", "split", channels=out[dim], offset=start)
        self.connect(flow, node, "split", out[dim], start)
        self.state[n] = _Flow(node, dim)

    def visit_select(self, n: torch.fx.Node) -> None:
        """aten.select(x, dim, index): ``x[:, 0]`` in export graphs."""
        x = n.args[0]
        flow, shape = self.flow_of(x), self.shape(x)
        if flow is None or shape is None:
            return
        dim = node_arg(n, 1, "dim", 0) % len(shape)
        if dim == flow.dim:
            self.opaque(n, [(flow, x)])
        else:
            self.state[n] = self.passed(n, flow, flow.dim - (1 if dim < flow.dim else 0))

    def visit_reshape(self, n: torch.fx.Node, name: str) -> None:
        x = n.args[0]
        flow, shape, out = self.flow_of(x), self.shape(x), self.shape(n)
        if flow is None or shape is None or out is None:
            return
        if name in PERMUTE:
            new_dim = permuted_dim(n, name, flow.dim, len(shape))
        elif name in REDUCE:
            new_dim = reduced_dim(n, flow.dim, len(shape))
        elif name in ("expand", "expand_as") and len(out) == len(shape):
            new_dim = flow.dim if out[flow.dim] == shape[flow.dim] else None
        else:
            new_dim = viewed_dim(shape, out, flow.dim)
        if new_dim is None:
            self.opaque(n, [(flow, x)], kind="reshape")
        else:
            self.state[n] = self.passed(n, flow, new_dim)


@dataclasses.dataclass(frozen=True)


class _PieceRef:
    """Stands for piece ``index`` of a chunk passed whole to ``torch.cat``."""

    node: torch.fx.Node
    index: int
