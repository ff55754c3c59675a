"""Discrete selections (TopK, ArgMax, ArgMin): where onnxruntime and torch are compared.

A detector like RT-DETR picks its queries with ``torch.topk`` over scores. Two runtimes
compute those scores with float32 rounding differences of 1e-7; where two scores are that
close, they pick different queries, and everything after the pick differs by whole values:
outputs after a discrete selection cannot be compared element by element, for the dense
model as for a compressed one. So :func:`vbxfx.check_onnx` compares, for each such
selection, its *input* (the scores, continuous) in both runtimes, and the outputs that no
selection feeds as usual; the outputs after a selection are named in a note.

The ONNX side: the data input of every TopK/ArgMax/ArgMin node, added as an extra output.
The torch side: the input of every ``topk`` / ``argmax`` / ``argmin`` call, recorded by a
``TorchFunctionMode`` while the model runs. The two are matched in call order per kind;
where the counts disagree, every output is compared element by element as without them. A selection whose input itself comes after another selection
(RT-DETR's second ``topk``) is matched but not compared, like the outputs after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Selection", "selections", "outputs_after", "with_selection_outputs",
           "RecordSelections", "match"]

logger = logging.getLogger(__name__)

#: ONNX operators that select discretely, and the torch calls that export to them.
ONNX_KINDS = {"TopK": "topk", "ArgMax": "argmax", "ArgMin": "argmin"}
_TORCH_KINDS = {torch.topk: "topk", torch.Tensor.topk: "topk", torch.argmax: "argmax",
                torch.Tensor.argmax: "argmax", torch.argmin: "argmin",
                torch.Tensor.argmin: "argmin"}


@dataclass(frozen=True)
class Selection:
    """One discrete-selection node of an ONNX graph: its kind and its data input."""

    node: str
    kind: str          # "topk", "argmax", "argmin"
    tensor: str        # the name of the data input
    after: bool        # its input itself comes after another selection: not comparable


def _tainted(proto: onnx.ModelProto) -> tuple[set[str], list[Selection]]:
    """The values some discrete selection feeds (directly or not), and the selections."""
    tainted: set[str] = set()
    found = []
    for node in proto.graph.node:         # nodes are topologically sorted in a valid model
        inputs = set(node.input)
        if node.op_type in ONNX_KINDS and node.input:
            found.append(Selection(node.name or node.output[0], ONNX_KINDS[node.op_type],
                                   node.input[0], node.input[0] in tainted))
        if node.op_type in ONNX_KINDS or inputs & tainted or any(
                attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                and _reads(attr, tainted) for attr in node.attribute):   # If/Loop bodies
            tainted.update(o for o in node.output if o)
    return tainted, found


def selections(proto: onnx.ModelProto) -> list[Selection]:
    """The discrete-selection nodes of the main graph, in graph (topological) order."""
    return _tainted(proto)[1]


def outputs_after(proto: onnx.ModelProto) -> list[str]:
    """The graph outputs that some discrete selection feeds (directly or not)."""
    tainted = _tainted(proto)[0]
    return [o.name for o in proto.graph.output if o.name in tainted]


def _reads(attr: onnx.AttributeProto, names: set[str]) -> bool:
    graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    return any(set(n.input) & names for g in graphs for n in g.node)


def with_selection_outputs(proto: onnx.ModelProto, chosen: list[Selection]) -> bytes:
    """A copy of the model that also outputs the data input of every selection in ``chosen``
    (serialized, for an onnxruntime session)."""
    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    present = {o.name for o in extra.graph.output}
    for s in chosen:
        if s.tensor not in present:
            extra.graph.output.append(onnx.ValueInfoProto(name=s.tensor))
            present.add(s.tensor)
    return extra.SerializeToString()


class RecordSelections(TorchFunctionMode):
    """Records a copy of the input of every ``topk`` / ``argmax`` / ``argmin`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, np.ndarray]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _TORCH_KINDS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor):
            x = args[0].detach()
            self.seen.append((kind, (x.float() if x.dtype == torch.bfloat16 else x)
                              .cpu().numpy().copy()))
        return func(*args, **(kwargs or {}))


def match(chosen: list[Selection], recorded: list[tuple[str, np.ndarray]]
          ) -> list[tuple[Selection, np.ndarray]] | None:
    """Pair each ONNX selection with the torch call of the same kind and rank in call order;
    None when the counts of a kind differ (the check then compares every output element by
    element). A pair whose shapes differ fails the comparison itself."""
    pairs = []
    for kind in sorted({s.kind for s in chosen} | {k for k, _ in recorded}):
        ours = [s for s in chosen if s.kind == kind]
        theirs = [a for k, a in recorded if k == kind]
        if len(ours) != len(theirs):
            logger.info("check: %d %s node(s) in the file, %d %s call(s) in torch", len(ours),
                        kind, len(theirs), kind)
            return None
        pairs += list(zip(ours, theirs))
    return pairs
