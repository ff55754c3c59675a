"""The sequential refit for any model, by hooks: no graph, the model runs as it is.

:mod:`vbxfx.refit.sequential` walks a symbolic graph, which models with Python control flow
(ultralytics YOLO, anything ``torch.fx`` cannot trace) do not give. Here the models run as
they are, stopped early by hooks, one layer at a time in execution order:

1. one forward of the compressed model records the order in which its layers first run;
2. for each layer to refit, in that order, and every calibration batch: the dense model runs
   until that layer has given its output (its target, rows sampled at random output
   positions), the compressed model until that layer is called (its input, at the same
   positions); then the layer is refit, before any later layer's input is taken.

So every layer is refit on the input the compressed model gives it with all earlier layers
already refit, and absorbs only the error they left: the same problem as the graph walk.
The price is forwards: each layer needs two partial forwards per batch, about one whole
forward per layer and batch in all (the graph walk needs one per batch).

A layer that runs several times in one forward (a shared module) is refit on its first call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from vbxfx.analysis.trace import eval_mode
from vbxfx.errors import ConfigError
from vbxfx.refit.rows import Problem, input_rows, is_depthwise, output_rows, sample_positions

__all__ = ["execution_order", "refit_by_hooks"]

logger = logging.getLogger(__name__)

#: ``refit(name, problem) -> None``: refit the compressed layer ``name`` on its problem.
Refit = Callable[[str, Problem], None]


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not run."""


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"expected a tensor input, got {type(x).__name__}")
    return x


def _run(model: nn.Module, batch: tuple, i: int, what: str) -> bool:
    """Run ``model`` on ``batch`` until a hook stops it; False when it ran to the end."""
    try:
        model(*batch)
    except _Stop:
        return True
    except Exception as e:
        raise ConfigError(f"reconstruct: calibration batch {i} failed to run through the "
                          f"{what} model: {type(e).__name__}: {e}") from e
    return False


@torch.no_grad()
def execution_order(model: nn.Module, names: list[str], batch: tuple) -> list[str]:
    """``names`` in the order their modules are first called when ``model`` runs ``batch``
    (those never called are left out)."""
    order: list[str] = []
    handles = []
    for name in names:
        def note(_m, _a, name=name):
            if name not in order:
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(note))
    try:
        with eval_mode(model):
            _run(model, batch, 0, "compressed")
    finally:
        for h in handles:
            h.remove()
    return order


def _capture_output(model: nn.Module, name: str, batch: tuple, i: int) -> torch.Tensor | None:
    """The output of ``name``'s first call when ``model`` runs ``batch`` (stopped there)."""
    got: list[torch.Tensor] = []

    def hook(_m, _a, out):
        got.append(out)
        raise _Stop

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        _run(model, batch, i, "dense")
    finally:
        h.remove()
    return got[0] if got else None


def _capture_input(model: nn.Module, name: str, batch: tuple, i: int) -> torch.Tensor | None:
    """The input of ``name``'s first call when ``model`` runs ``batch`` (stopped there)."""
    got: list[torch.Tensor] = []

    def hook(_m, args, kwargs):
        got.append(_first_arg(args, kwargs))
        raise _Stop

    h = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run(model, batch, i, "compressed")
    finally:
        h.remove()
    return got[0] if got else None


@torch.no_grad()
def refit_by_hooks(model: nn.Module, reference: nn.Module, batches: list[tuple],
                   names: list[str], refit: Refit, max_rows: int, gen: torch.Generator,
                   progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """Refit the layers ``names`` of ``model`` in execution order (see the module doc);
    ``reference`` is the dense model with the same layer names. Returns the layers refit, in
    order (a layer that never runs on the calibration data is left as it is).

    Raises:
        ConfigError: a batch does not run through one of the models.
    """
    order = execution_order(model, names, batches[0])
    done: list[str] = []
    with eval_mode(model), eval_mode(reference):
        for name in order:
            layer = model.get_submodule(name)
            w = layer.weight
            p = Problem(w[0].numel(), w.shape[0], w.device,
                        channels=w.shape[0] if is_depthwise(layer) else 0)
            for i, batch in enumerate(batches):
                y = _capture_output(reference, name, batch, i)
                x = _capture_input(model, name, batch, i)
                if y is None or x is None:
                    continue
                pos = sample_positions(layer, y.shape, max_rows, gen)
                out_hw = tuple(y.shape[2:]) if isinstance(layer, nn.Conv2d) else (0, 0)
                p.add(input_rows(layer, x, out_hw, pos), output_rows(layer, y, pos))
                del x, y
            if p.n == 0:
                logger.info("reconstruct: %s did not run on the calibration data", name)
                continue
            refit(name, p)
            done.append(name)
            if progress is not None:
                progress(len(done), len(order), name)
    return done
