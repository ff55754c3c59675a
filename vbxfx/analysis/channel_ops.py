"""How torch ops carry channels: the op tables and dim arithmetic of the ChannelFlow pass.

An op is named by ``OpOverload._opname``, its function ``__name__`` or its ``call_method``
name, a trailing ``_`` dropped (:func:`opname`); the tables say which ops keep every channel
where it is (``SAME_SHAPE``), join channels elementwise (``ADD_LIKE``, ``MUL_LIKE``),
concatenate or split them, view, permute or reduce dims. The graph itself is built in
:mod:`vbxfx.analysis.channel_graph`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["ADD_LIKE", "CAT", "FIRST_ONLY", "MUL_LIKE", "NO_FLOW", "PERMUTE", "REDUCE",
           "SAME_MODULES", "SAME_SHAPE", "SPLIT", "STACK", "VIEW", "default_dim", "is_getitem",
           "is_tuple_meta", "meta_shape", "node_arg", "opname", "permuted_dim", "reduced_dim",
           "viewed_dim"]

# Op names (OpOverload._opname, function __name__ or call_method name, trailing "_" dropped).
SAME_SHAPE = frozenset("""
relu relu6 silu gelu sigmoid hardsigmoid hardswish hardtanh tanh leaky_relu elu selu celu mish
softplus softsign prelu rrelu logsigmoid threshold batch_norm native_batch_norm
_native_batch_norm_legit_no_training layer_norm native_layer_norm group_norm instance_norm
rms_norm dropout dropout1d dropout2d dropout3d feature_dropout alpha_dropout
feature_alpha_dropout native_dropout identity clone contiguous detach to type_as float half
double bfloat16 type _to_copy alias lift_fresh_copy max_pool1d max_pool2d max_pool3d
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
adaptive_max_pool1d adaptive_max_pool2d lp_pool2d upsample_nearest1d upsample_nearest2d
upsample_bilinear2d upsample_bicubic2d upsample_nearest3d interpolate upsample pad
constant_pad_nd reflection_pad1d reflection_pad2d replication_pad2d zero_pad2d softmax
log_softmax _softmax _log_softmax clamp clamp_min clamp_max clip abs neg exp log sqrt rsqrt
reciprocal pow square erf sign stochastic_depth channel_shuffle_free
""".split())
ADD_LIKE = frozenset("add sub rsub iadd isub maximum minimum where".split())
MUL_LIKE = frozenset("mul div truediv true_divide imul itruediv".split())
# Ops whose tensor arguments give only shape, dtype or device: no channels flow through them.
NO_FLOW = frozenset("""
new_full new_zeros new_ones new_empty new_tensor zeros_like ones_like full_like empty_like
rand_like randn_like arange meshgrid size sym_size dim numel
""".split())
# Ops whose later tensor arguments give only dtype/shape: channels flow from the first one.
FIRST_ONLY = frozenset("type_as expand_as to view_as reshape_as".split())
CAT = frozenset("cat concat concatenate".split())
STACK = frozenset("stack".split())
SPLIT = {"chunk": "chunk", "split": "split", "split_with_sizes": "split",
          "tensor_split": "split", "unbind": "split"}
VIEW = frozenset("reshape view _unsafe_view flatten unflatten squeeze unsqueeze expand "
                  "expand_as view_as reshape_as".split())
PERMUTE = frozenset("permute transpose t swapaxes swapdims movedim".split())
REDUCE = frozenset("mean sum amax amin nansum std var logsumexp".split())
SAME_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.PReLU,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
    nn.GroupNorm, nn.modules.dropout._DropoutNd, nn.Identity, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.Softmax,
    nn.LogSoftmax,
)


def opname(n: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if n.op == "call_method":
        name = str(n.target)
    elif isinstance(n.target, torch._ops.OpOverload):
        name = n.target._opname
    else:
        name = getattr(n.target, "__name__", str(n.target))
    return name.strip("_") if name.startswith("__") else name.rstrip("_")


def meta_shape(value_meta: Any) -> tuple[int, ...] | None:
    shape = getattr(value_meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def is_tuple_meta(meta: Any) -> bool:
    """A tuple of per-output metadata (TensorMetadata is itself a NamedTuple)."""
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


def is_getitem(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem


def default_dim(shape: tuple[int, ...] | None) -> int:
    return 1 if shape is not None and len(shape) >= 2 else 0


def node_arg(n: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


def viewed_dim(shape: tuple[int, ...], out: tuple[int, ...], dim: int) -> int | None:
    """Where dim ``dim`` of ``shape`` lands after a reshape to ``out``, if it stays whole."""
    before, after = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    fits = [j for j, size in enumerate(out) if size == shape[dim]
            and math.prod(out[:j]) == before and math.prod(out[j + 1:]) == after]
    # size-1 dims make several places fit: keep the one nearest where the channels were
    return min(fits, key=lambda j: abs(j - dim)) if fits else None


def permuted_dim(n: torch.fx.Node, name: str, dim: int, ndim: int) -> int | None:
    if name == "t":
        return (1 - dim) if ndim == 2 else dim
    if name == "permute":
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else (
            n.args[1:] or n.kwargs.get("dims", ()))
        dims = [d % ndim for d in dims]
        return dims.index(dim) if dim in dims else None
    if name == "movedim":
        src, dst = node_arg(n, 1, "source", None), node_arg(n, 2, "destination", None)
        if not isinstance(src, int) or not isinstance(dst, int):
            return None
        order = [d for d in range(ndim) if d != src % ndim]
        order.insert(dst % ndim, src % ndim)
        return order.index(dim)
    a, b = node_arg(n, 1, "dim0", 0) % ndim, node_arg(n, 2, "dim1", 1) % ndim
    return b if dim == a else a if dim == b else dim


def reduced_dim(n: torch.fx.Node, dim: int, ndim: int) -> int | None:
    dims = node_arg(n, 1, "dim", None)
    if dims is None or isinstance(dims, torch.fx.Node):
        return None
    dims = {d % ndim for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
    if dim in dims:
        return None
    keepdim = bool(node_arg(n, 2, "keepdim", False))
    return dim if keepdim else dim - sum(1 for d in dims if d < dim)
