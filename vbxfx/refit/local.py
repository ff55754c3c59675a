"""Local problems: every layer's inputs in the dense model, gathered with hooks.

One forward of the dense reference fills the :class:`~vbxfx.refit.rows.Problem` of every
layer at once (layers whose second moments would exceed ``max_bytes`` together go to
further forwards); the target of each layer is the dense layer itself, ``g = W̃₀ h``. This
is the refit for models that do not trace symbolically, and the measurement behind
:mod:`vbxfx.refit.sensitivity`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.refit.rows import Problem, input_rows, sample_positions

__all__ = ["local_problems"]


def runs_within(names: list[str], size: Callable[[str], int],
                max_bytes: int) -> list[list[str]]:
    """``names`` cut, in order, into runs whose ``size(name)`` add up to at most ``max_bytes``
    (a single name larger than that makes a run of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        bytes_ = size(name)
        if groups[-1] and used + bytes_ > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += bytes_
    return groups


def _groups(names: list[str], layers: dict[str, nn.Module], max_bytes: int) -> list[list[str]]:
    """Runs of layers whose float64 second moments ``[k+1, k+1]`` fit ``max_bytes``."""
    return runs_within(names, lambda n: 8 * (layers[n].weight[0].numel() + 1) ** 2, max_bytes)


@torch.no_grad()
def local_problems(reference: nn.Module, targets: dict[str, torch.Tensor], batches: list[tuple],
                   *, max_rows: int = 4096, max_bytes: int = 2 ** 30,
                   gen: torch.Generator | None = None) -> tuple[dict[str, Problem], int]:
    """``({layer: Problem}, forwards)`` for the layers named in ``targets`` (their dense
    ``[W, b]`` rows), on the inputs ``reference`` gives them. ``reference`` runs in eval
    mode as it is (put it there first).

    Raises:
        ConfigError: a batch does not run through ``reference``.
    """
    layers = {n: reference.get_submodule(n) for n in targets}
    gen = gen or torch.Generator().manual_seed(0)
    problems: dict[str, Problem] = {}
    forwards = 0
    for group in _groups(list(targets), layers, max_bytes):
        part = {n: Problem(layers[n].weight[0].numel(), layers[n].weight.shape[0],
                           layers[n].weight.device) for n in group}

        def hook(name):
            def fwd_hook(mod, args, out):
                pos = sample_positions(mod, out.shape, max_rows, gen)
                out_hw = tuple(out.shape[2:]) if isinstance(mod, nn.Conv2d) else (0, 0)
                part[name].add(input_rows(mod, args[0], out_hw, pos), None)
            return fwd_hook

        handles = [layers[n].register_forward_hook(hook(n)) for n in group]
        try:
            for i, batch in enumerate(batches):
                try:
                    reference(*batch)
                except Exception as e:
                    raise ConfigError(f"reconstruct: calibration batch {i} failed to run "
                                      f"through the reference model: {type(e).__name__}: "
                                      f"{e}") from e
        finally:
            for h in handles:
                h.remove()
        forwards += 1
        for n, p in part.items():
            if p.n:
                prior = targets[n].to(p.h.device, torch.float64)
                p.g = prior @ p.h                 # the target is the dense layer itself
                p.tt = float((p.g * prior).sum())
        problems.update(part)
    return problems, forwards
