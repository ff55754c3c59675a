"""Turn any ``nn.Module`` into a ``torch.fx.GraphModule`` that the vbxfx passes understand.

Two front ends are tried in order:

1. ``torch.fx.symbolic_trace`` with a tracer that keeps ``leaf_modules`` opaque. Its graph has
   ``call_module`` nodes for every ``torch.nn`` layer, and its GraphModule shares those
   submodules with the traced copy of the model.
2. ``torch.export.export(copy, example_inputs, strict=False).module()`` when the first fails
   (ultralytics YOLO, for instance). Its graph has ``aten.conv2d`` / ``aten.linear``
   ``call_function`` nodes whose weights are ``get_attr`` nodes named by the parameter's
   fully-qualified name.

The caller's model is never touched: tracing works on a deep copy, which is recorded as
``gm.meta["vbxfx.root"]`` for the rewrite passes to swap compressed modules into.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import logging
import warnings
from typing import Any, Iterator

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from vbxfx.errors import ConfigError, TraceError
from vbxfx.errors import one_line as _one_line
from vbxfx.analysis.trace_errors import trace_error as _trace_error
from vbxfx.analysis.layers import LAYER_TYPES

__all__ = ["trace", "FRONTENDS", "FRONTEND_KEY", "ROOT_KEY", "INPUTS_KEY", "get_root",
           "eval_mode", "preserved_state", "run_shapes_only"]

logger = logging.getLogger(__name__)

#: Accepted values of ``trace(..., frontend=)``.
FRONTENDS = ("auto", "symbolic_trace", "export")
#: ``gm.meta`` keys written by :func:`trace`.
FRONTEND_KEY = "vbxfx.frontend"
ROOT_KEY = "vbxfx.root"
INPUTS_KEY = "vbxfx.example_inputs"

# Module attributes that nn.Module manages itself; everything else in ``__dict__`` is plain
# state a forward pass may overwrite (ultralytics' Detect caches ``anchors`` there).
_MANAGED = frozenset({"_parameters", "_buffers", "_modules"})


class _LeafTracer(torch.fx.Tracer):
    """A Tracer that also keeps the given module types and fully-qualified names as leaves."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if isinstance(m, LAYER_TYPES):  # user subclasses of Conv/Linear too: one node each
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Any = (),
          frontend: str = "auto") -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` into a GraphModule.

    Args:
        model: the model; it is neither modified nor put in eval mode.
        example_inputs: a Tensor or a tuple of Tensors, the shapes the model will see.
        leaf_modules: module types or fully-qualified names that symbolic tracing keeps as
            single ``call_module`` nodes (torch.export has no leaves and ignores them).
        frontend: ``"auto"`` (symbolic_trace, then torch.export), ``"symbolic_trace"`` or
            ``"export"``.

    Returns:
        The GraphModule, with ``gm.meta["vbxfx.frontend"]`` (``"symbolic_trace"`` or
        ``"export"``), ``gm.meta["vbxfx.root"]`` (the deep copy of ``model``) and
        ``gm.meta["vbxfx.example_inputs"]`` (a tuple).

    Raises:
        TraceError: neither front end could trace the model; the message names the module
            and source line that stopped symbolic tracing.
        ConfigError: a bad ``frontend``, ``leaf_modules`` or ``example_inputs``.

    >>> import torch, vbxfx
    >>> gm = vbxfx.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8))
    >>> gm.meta["vbxfx.frontend"]
    'symbolic_trace'
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"trace() takes an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    inputs = _check_inputs(example_inputs)
    leaf_types, leaf_names = _check_leaf_modules(model, leaf_modules)
    try:
        root = copy.deepcopy(model)
    except Exception as e:
        raise TraceError(
            f"could not deep-copy {type(model).__name__} before tracing ({type(e).__name__}: "
            f"{_one_line(e)}); vbxfx never traces the caller's model in place"
        ) from e

    errors: dict[str, BaseException] = {}
    gm = None
    if frontend in ("auto", "symbolic_trace"):
        try:
            gm = _symbolic_trace(root, inputs, leaf_types, leaf_names)
            used = "symbolic_trace"
        except Exception as e:  # any failure: fall back to torch.export
            errors["symbolic_trace"] = e
            logger.info("symbolic_trace failed for %s (%s: %s)", type(model).__name__,
                        type(e).__name__, _one_line(e))
    if gm is None and frontend in ("auto", "export"):
        if leaf_types or leaf_names:
            logger.info("leaf_modules apply to symbolic_trace only; torch.export inlines them")
        try:
            gm = _export(root, inputs)
            used = "export"
        except Exception as e:
            errors["export"] = e
    if gm is None:
        raise _trace_error(model, root, inputs, errors) from next(iter(errors.values()))

    gm.meta[FRONTEND_KEY] = used
    gm.meta[ROOT_KEY] = root
    gm.meta[INPUTS_KEY] = inputs
    logger.debug("traced %s with %s: %d nodes", type(model).__name__, used,
                 len(gm.graph.nodes))
    return gm


def get_root(gm: torch.fx.GraphModule) -> nn.Module:
    """The module that owns the layers of ``gm``: ``gm.meta["vbxfx.root"]`` or ``gm`` itself."""
    return gm.meta.get(ROOT_KEY, gm)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then restore each one's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


# --------------------------------------------------------------------------- front ends


def _symbolic_trace(root: nn.Module, inputs: tuple, leaf_types: tuple[type, ...],
                    leaf_names: frozenset[str]) -> torch.fx.GraphModule:
    tracer = _LeafTracer(leaf_types, leaf_names)
    with preserved_state(root):
        graph = tracer.trace(root)
        gm = torch.fx.GraphModule(tracer.root, graph, type(root).__name__)
        # A graph that traced but cannot run on the inputs (shape-specialised code, a wrong
        # input) is a failure too: torch.export gets its turn and the error reports both.
        run_shapes_only(gm, inputs)
    return gm


def _export(root: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    # torch.export leaves FakeTensors in plain attributes that forward() caches (ultralytics'
    # Detect.anchors); preserved_state puts the copy's own values back.
    noise = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with preserved_state(root), _quiet_torch_logs(), contextlib.redirect_stderr(noise):
                ep = torch.export.export(root, inputs, strict=False)
            gm = ep.module()
        finally:
            for w in caught:  # e.g. "tensor attributes assigned during export": restored here
                logger.debug("torch.export warned: %s", w.message)
            if noise.getvalue():
                logger.debug("torch.export wrote to stderr:\n%s", noise.getvalue())
    return gm


def run_shapes_only(fn: Any, inputs: tuple, *, fallback: bool = True, fake: bool = True) -> Any:
    """Run ``fn(*inputs)`` on FakeTensors (shapes without arithmetic), under ``no_grad``.

    Parameters stay real; FakeTensorMode fakes them as they are used. When the fake run
    fails (an op without a fake kernel, a data-dependent ``.item()``) and ``fallback`` is
    true, ``fn`` runs again on the real inputs, whose error, if any, is the one raised.
    ``fake=False`` runs on the real inputs straight away.
    """
    if not fake:
        with torch.no_grad():
            return fn(*inputs)
    try:
        # A ShapeEnv that allows scalar outputs lets ``.item()`` (ultralytics' export graph
        # has a few) return a symbol instead of failing; tensor shapes stay static.
        mode = FakeTensorMode(allow_non_fake_inputs=True,
                              shape_env=ShapeEnv(allow_scalar_outputs=True))
        fakes = tuple(mode.from_tensor(t, static_shapes=True) for t in inputs)
        with mode, torch.no_grad():
            return fn(*fakes)
    except Exception as e:
        if not fallback:
            raise
        logger.debug("fake-tensor run failed (%s: %s); running on real tensors",
                     type(e).__name__, _one_line(e))
    with torch.no_grad():
        return fn(*inputs)


@contextlib.contextmanager
def preserved_state(root: nn.Module) -> Iterator[None]:
    """Eval mode during the block; afterwards every submodule's plain attributes as before."""
    saved = [(m, {k: v for k, v in vars(m).items() if k not in _MANAGED})
             for m in root.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, attrs in saved:
            d = vars(m)
            for k in [k for k in d if k not in _MANAGED and k not in attrs]:
                del d[k]
            d.update(attrs)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs (and prints) partial graphs when it fails; vbxfx reports the failure."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- validation


def _check_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        got = "an empty tuple" if not example_inputs else "(" + ", ".join(
            type(t).__name__ for t in example_inputs) + ")"
    else:
        got = type(example_inputs).__name__
    raise ConfigError(
        f"example_inputs must be a Tensor or a tuple of Tensors, got {got}; e.g. "
        "torch.randn(1, 3, 224, 224)"
    )


def _check_leaf_modules(model: nn.Module, leaf_modules: Any) -> tuple[tuple, frozenset]:
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    types_, names = [], []
    names_in_model = [n for n, _ in model.named_modules() if n]
    for item in leaf_modules:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types_.append(item)
        elif isinstance(item, str):
            if item not in names_in_model:
                close = difflib.get_close_matches(item, names_in_model, n=3)
                raise ConfigError(
                    f"leaf_modules names {item!r}, which is not a submodule of "
                    f"{type(model).__name__}" + (f"; closest: {close}" if close else "")
                )
            names.append(item)
        else:
            raise ConfigError(
                "leaf_modules takes nn.Module subclasses or fully-qualified submodule names, "
                f"got {item!r}"
            )
    return tuple(types_), frozenset(names)
