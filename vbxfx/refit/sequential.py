"""The sequential refit: every layer refit on the inputs the *compressed* model gives it.

The compressed model and the dense reference run side by side, node by node, over all
calibration batches (a ``torch.fx`` graph of the compressed model, each node evaluated in
both models; every value is dropped after its last use). At a layer to refit, the
compressed model's input ``x_c`` and the dense layer's output ``y_d`` at sampled positions
make the layer's problem ``min E||W̃ x̃_c - y_d||²`` (:mod:`vbxfx.refit.rows`); the layer is
refit (:mod:`vbxfx.refit.layer`) *before* its own output is computed, so every later layer
sees, and absorbs, what the refit layers before it left. The BatchNorms downstream keep
their running statistics: the refit targets the dense pre-BatchNorm outputs, so those
statistics stay the right ones.

Refitting to the compressed inputs all at once from one forward over-corrects (each layer
absorbs an error that the refit of the layers before it removes too); in graph order each
layer absorbs only the error that is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.analysis.layers import LAYER_TYPES
from vbxfx.analysis.trace import eval_mode, preserved_state

__all__ = ["trace_for_refit", "run_side_by_side", "Visit"]

logger = logging.getLogger(__name__)

#: ``visit(name, x_c, x_d, y_d) -> None``: called at a layer to refit with the compressed
#: model's inputs, the dense model's inputs and the dense layer's outputs (lists, one per
#: batch), before the compressed layer runs.
Visit = Callable[[str, list, list, list], None]


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, qualified_name)


def trace_for_refit(model: nn.Module) -> torch.fx.Graph | None:
    """The symbolic graph of ``model`` (Conv/Linear layers as leaves), or None when it does
    not trace (then the caller refits by hooks, :mod:`vbxfx.refit.hooks`)."""
    try:
        with preserved_state(model):
            return _Tracer().trace(model)
    except Exception as e:  # any tracing failure: the model simply is not fx-traceable
        logger.info("reconstruct: %s does not trace symbolically (%s: %s); refitting by hooks",
                    type(model).__name__, type(e).__name__, str(e).splitlines()[0][:200])
        return None


def _attr(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fast_layout(x: Any) -> Any:
    """Images in channels-last memory order: the same values, about twice as fast through
    convolutions on CPU (a node that needs the default layout is retried with it)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _last_uses(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """Per node, the values whose last use it is (freed after it runs)."""
    seen: set[torch.fx.Node] = set()
    free: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in reversed(graph.nodes):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                free.setdefault(node, []).append(inp)
    return free


@torch.no_grad()
def run_side_by_side(graph: torch.fx.Graph, model: nn.Module, reference: nn.Module,
                     batches: list[tuple], refit: set[str], visit: Visit,
                     progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``graph`` on every batch in ``model`` and ``reference`` together, calling
    ``visit`` at every ``call_module`` node whose target is in ``refit`` (first use only).

    Raises:
        ConfigError: a batch does not run through the models (the node is named).
    """
    nodes = list(graph.nodes)
    free = _last_uses(graph)
    env_c: dict[torch.fx.Node, list] = {}
    env_d: dict[torch.fx.Node, list] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    total = sum(1 for n in nodes if n.op == "call_module" and n.target in refit)
    done = 0
    visited: set[str] = set()

    def load(env, a, i):
        return torch.fx.node.map_arg(a, lambda n: env[n][i])

    def run(node, fn, env):
        out = []
        for i in range(len(batches)):
            a, k = load(env, node.args, i), load(env, node.kwargs, i)
            try:
                out.append(fn(*a, **k))
            except Exception as e:
                try:                     # a view that needs the default memory layout
                    out.append(fn(*_default_layout(a), **_default_layout(k)))
                except Exception:
                    raise ConfigError(
                        f"reconstruct: calibration batch {i} failed to run through the model "
                        f"at node {node.format_node()}: {type(e).__name__}: {e}") from e
        return out

    with eval_mode(model), eval_mode(reference):
        for node in nodes:
            if node.op == "placeholder":
                k = placeholders.index(node)
                vals = [_fast_layout(b[k]) if k < len(b) else node.args[0] if node.args
                        else None for b in batches]
                env_c[node], env_d[node] = vals, list(vals)
            elif node.op == "get_attr":
                env_c[node] = [_attr(model, node.target)] * len(batches)
                env_d[node] = [_attr(reference, node.target)] * len(batches)
            elif node.op == "call_module":
                env_d[node] = run(node, reference.get_submodule(node.target), env_d)
                if node.target in refit and node.target not in visited:
                    visited.add(node.target)
                    first = lambda env: [load(env, node.args, i)[0]  # noqa: E731
                                         for i in range(len(batches))]
                    visit(node.target, first(env_c), first(env_d), env_d[node])
                    done += 1
                    if progress is not None:
                        progress(done, total)
                env_c[node] = run(node, model.get_submodule(node.target), env_c)
            elif node.op == "call_function":
                for env in (env_c, env_d):
                    env[node] = run(node, node.target, env)
            elif node.op == "call_method":
                for env in (env_c, env_d):
                    env[node] = run(node, _method(node.target), env)
            for dead in free.get(node, ()):
                env_c.pop(dead, None)
                env_d.pop(dead, None)


def _method(name: str) -> Callable:
    return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)


def _default_layout(a: Any) -> Any:
    return torch.fx.node.map_aggregate(
        a, lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v)
