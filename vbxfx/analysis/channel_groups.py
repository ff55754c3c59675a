"""Channel groups: the channels that must be removed together, read off the ChannelFlow graph.

Removing output channel ``c`` of a layer removes channel ``c`` everywhere that channel
travels: the BatchNorm and depthwise convolutions on the way (``through``), every layer
that reads it (its *consumers*, which lose input channel ``c``), and, across a residual
sum or an elementwise product, the same channel of every other operand. A
:class:`ChannelGroup` is one such set: the layers whose outputs meet at adds (its
*producers*), the modules on the way, and the consumers with the offset at which they read
the group's channels (non-zero after a concatenation).

A group can be pruned only when every place its channels reach is understood. It is not
prunable, with a reason, when its channels reach the model's output or input, an op the
flow does not follow (reshapes that fold channels into other dims, splits and chunks whose
sizes the code fixes, attention), a concatenation read by anything but layers, a module on
the way that is not a BatchNorm or depthwise convolution, or a layer that is shared,
functional, frozen, excluded by the user or grouped.

>>> gm = vbxfx.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
>>> groups = channel_groups(gm, AnalyzeLayers()(gm).details)                     # doctest: +SKIP
>>> groups["layer1.0.conv1"].consumers, groups["layer1.0.conv1"].through          # doctest: +SKIP
((('layer1.0.conv2', 0),), ('layer1.0.bn1',))
"""

from __future__ import annotations

import dataclasses
import logging

import networkx as nx
import torch.fx
from torch import nn

from vbxfx.analysis.channel_graph import FlowGraphBuilder
from vbxfx.analysis.layers import LayerTable
from vbxfx.analysis.trace import get_root

__all__ = ["ChannelGroup", "channel_groups", "MIN_CHANNELS"]

logger = logging.getLogger(__name__)

#: Groups with fewer channels are never pruned (the hardware pads input channels to 8).
MIN_CHANNELS = 16
#: Reasons of layers that must not change at all (AnalyzeLayers' wording).
_UNTOUCHABLE = ("excluded by user", "frozen", "a fixed decoding step")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together (module docstring). ``name`` is the first producer."""

    name: str
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    through: tuple[str, ...]
    prunable: bool
    reason: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _module_problem(root: nn.Module, name: str, role: str, table: LayerTable) -> str | None:
    """Why the layer ``name`` cannot lose channels as ``role`` ("producer"/"consumer")."""
    layer = table[name] if name in table else None
    try:
        mod = root.get_submodule(name)
    except AttributeError:
        return f"{role} {name!r} is not a module"
    if type(mod) not in (nn.Conv2d, nn.Linear):
        return f"{role} {name!r} is a {type(mod).__name__}, not a plain Conv2d/Linear"
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        return f"{role} {name!r} is a grouped convolution (groups={mod.groups})"
    if layer is not None:
        if layer.calls != 1:
            return f"{role} {name!r} runs {layer.calls} times (a shared layer)"
        if layer.reason and layer.reason.startswith(_UNTOUCHABLE):
            return f"{role} {name!r}: {layer.reason}"
    return None


def _through_problem(root: nn.Module, name: str) -> str | None:
    try:
        mod = root.get_submodule(name)
    except AttributeError:
        return f"{name!r} on the way is a functional op with parameters"
    if type(mod) in (nn.BatchNorm2d, nn.BatchNorm1d):
        return None if mod.track_running_stats or mod.affine else f"{name!r}: BatchNorm without state"
    if type(mod) is nn.Conv2d and mod.groups == mod.in_channels == mod.out_channels:
        return None
    return f"{name!r} on the way is a {type(mod).__name__} (only BatchNorm and depthwise convs follow)"


def channel_groups(gm: torch.fx.GraphModule, table: LayerTable,
                   flow: nx.DiGraph | None = None) -> dict[str, ChannelGroup]:
    """Every channel group of a GraphModule that AnalyzeLayers ran on (its ``table``), by
    name (module docstring). ``flow``: the ChannelFlow graph, built when not given."""
    if flow is None:
        builder = FlowGraphBuilder(gm)
        for node in gm.graph.nodes:
            builder.visit(node)
        flow = builder.graph
    root = get_root(gm)
    kinds = nx.get_node_attributes(flow, "type")
    # channel spaces: a layer's output, merged across add / mul joins
    spaces = nx.Graph()
    spaces.add_nodes_from(n for n, t in kinds.items() if t in ("layer", "input", "add", "mul"))
    for u, v, d in flow.edges(data=True):
        if kinds.get(v) in ("add", "mul") and d["kind"] in ("add", "mul") and u in spaces:
            spaces.add_edge(u, v)
    groups: dict[str, ChannelGroup] = {}
    for members in nx.connected_components(spaces):
        producers = [n for n in flow.nodes if n in members and kinds[n] == "layer"]
        if not producers:
            continue
        groups[producers[0]] = _group(root, table, flow, kinds, members, producers)
    logger.info("channel groups: %d, %d prunable", len(groups),
                sum(g.prunable for g in groups.values()))
    return groups


def _group(root, table, flow, kinds, members, producers) -> ChannelGroup:
    problems: list[str] = []
    consumers: list[tuple[str, int]] = []
    through: list[str] = []

    def add_through(names):
        through.extend(t for t in names if t not in through)

    for m in sorted(members, key=list(flow.nodes).index):
        if kinds[m] == "input":
            problems.append("the channels come from the model's input")
        if kinds[m] in ("add", "mul"):
            problems += [f"{m} also takes channels from {u} ({kinds.get(u)})"
                         for u in flow.predecessors(m) if u not in members]
        for _, v, d in flow.out_edges(m, data=True):
            if v in members:
                add_through(d["through"])
                continue
            kind = kinds.get(v)
            if kind == "layer" and d["kind"] == "unchanged":
                consumers.append((v, 0))
                add_through(d["through"])
            elif kind == "cat":
                add_through(d["through"])
                for _, w, e in flow.out_edges(v, data=True):
                    if kinds.get(w) != "layer" or e["kind"] != "unchanged":
                        problems.append(f"a concatenation ({v}) is read by {w!r}, not a layer")
                        continue
                    add_through(e["through"])
                    consumers.extend((w, off) for off in d["offsets"])
            elif kind == "output":
                problems.append("the channels reach the model's output")
            elif kind == "layer":
                problems.append(f"{v!r} reads the channels reshaped")
            else:
                op = flow.nodes[v].get("op", v)
                problems.append(f"the channels flow into {op} ({d['kind']})")
    channels = flow.nodes[producers[0]].get("out_channels")
    for p in producers:
        problems.append(_module_problem(root, p, "producer", table))
        if flow.nodes[p].get("out_channels") != channels:
            problems.append(f"producers of {channels} and {flow.nodes[p].get('out_channels')} "
                            "channels meet")
    for c, _ in consumers:
        problems.append(_module_problem(root, c, "consumer", table))
    for t in through:
        problems.append(_through_problem(root, t))
    if channels is None or channels < MIN_CHANNELS:
        problems.append(f"{channels} channels (fewer than {MIN_CHANNELS})")
    problems = [p for p in problems if p]
    return ChannelGroup(producers[0], int(channels or 0), tuple(producers),
                        tuple(dict.fromkeys(consumers)), tuple(through), not problems,
                        problems[0] if problems else None)
