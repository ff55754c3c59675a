"""The sequential refit for any model, by hooks: no graph, the model runs as it is.

:mod:`vbxfx.refit.sequential` walks a symbolic graph, which models with Python control flow
(ultralytics YOLO, anything ``torch.fx`` cannot trace) do not give. Here the models run as
they are, stopped early by hooks, one layer at a time in execution order:

1. one forward of the compressed model records the order in which its layers first run;
2. the dense model runs once per batch with hooks on a run of consecutive layers, each
   keeping its target: its output rows at sampled positions (rows of at most ``max_bytes``
   for the run together; one run for most models);
3. for each layer of the run, in order, and every calibration batch: the compressed model
   runs until that layer is called (its input, at the same positions); then the layer is
   refit, before any later layer's input is taken.

So every layer is refit on the input the compressed model gives it with all earlier layers
already refit, and absorbs only the error they left: the same problem as the graph walk.
The price is forwards: each layer needs one partial forward of the compressed model per
batch, about half a whole forward per layer and batch in all (the graph walk needs one per
batch).

A layer that runs several times in one forward (a shared module) is refit on its first call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from vbxfx.analysis.trace import eval_mode
from vbxfx.errors import ConfigError
from vbxfx.refit.local import runs_within
from vbxfx.refit.structure import sliced_output
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


@torch.no_grad()
def _dense_targets(reference: nn.Module, names: list[str], batches: list[tuple],
                   max_rows: int, gen: torch.Generator, model: nn.Module,
                   out_index: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per layer of ``names`` and per batch, ``(positions, out_hw, output rows)`` of its first
    call in the dense model (None where it did not run): one forward per batch, stopped once
    the last of ``names`` has run. The rows are those ``model``'s layer computes (its kept
    channels, :mod:`vbxfx.refit.structure`)."""
    targets: dict[str, list] = {n: [None] * len(batches) for n in names}
    last = names[-1]
    for i, batch in enumerate(batches):
        def hook(_mod, _a, out, name):
            if targets[name][i] is None:
                mod = model.get_submodule(name)
                out = sliced_output(mod, out, out_index.get(name))
                pos = sample_positions(mod, out.shape, max_rows, gen)
                out_hw = tuple(out.shape[2:]) if isinstance(mod, nn.Conv2d) else (0, 0)
                targets[name][i] = (pos, out_hw, output_rows(mod, out, pos))
            if name == last:
                raise _Stop

        handles = [reference.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
        try:
            _run(reference, batch, i, "dense")
        finally:
            for h in handles:
                h.remove()
    return targets


def _groups(model: nn.Module, order: list[str], batches: int, max_rows: int,
            max_bytes: int) -> list[list[str]]:
    """``order`` cut into runs whose dense target rows (at most ``max_rows`` a batch, float32)
    fit ``max_bytes`` together."""
    return runs_within(order, lambda n: 4 * batches * max_rows
                       * model.get_submodule(n).weight.shape[0], max_bytes)


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
                   progress: Callable[[int, int, str], None] | None = None,
                   max_bytes: int = 2 ** 30,
                   out_index: dict[str, torch.Tensor] | None = None) -> tuple[list[str], int]:
    """Refit the layers ``names`` of ``model`` in execution order (see the module doc);
    ``reference`` is the dense model with the same layer names. Returns the layers refit, in
    order (a layer that never runs on the calibration data is left as it is), and the number
    of (partial) forwards run. The dense targets of consecutive layers are taken together,
    up to ``max_bytes`` of rows.

    Raises:
        ConfigError: a batch does not run through one of the models.
    """
    order = execution_order(model, names, batches[0])
    done: list[str] = []
    forwards = 1
    with eval_mode(model), eval_mode(reference):
        for group in _groups(model, order, len(batches), max_rows, max_bytes):
            targets = _dense_targets(reference, group, batches, max_rows, gen, model,
                                     out_index or {})
            forwards += len(batches)
            for name in group:
                layer = model.get_submodule(name)
                w = layer.weight
                p = Problem(w[0].numel(), w.shape[0], w.device,
                            channels=w.shape[0] if is_depthwise(layer) else 0)
                for i, batch in enumerate(batches):
                    if targets[name][i] is None:
                        continue
                    pos, out_hw, rows = targets[name][i]
                    x = _capture_input(model, name, batch, i)
                    forwards += 1
                    if x is not None:
                        p.add(input_rows(layer, x, out_hw, pos), rows)
                del targets[name]
                if p.n == 0:
                    logger.info("reconstruct: %s did not run on the calibration data", name)
                    continue
                refit(name, p)
                done.append(name)
                if progress is not None:
                    progress(len(done), len(order), name)
    return done, forwards
