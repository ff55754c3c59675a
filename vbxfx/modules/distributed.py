"""Compressed layers under ``torch.nn.parallel.DistributedDataParallel``: one pattern per layer
on every rank.

What DDP already gives: it broadcasts rank 0's parameters when it wraps the model and averages
the gradients of every step, so the dense weights stay bit-identical on all ranks; a pattern
refresh is a function of the dense weight alone (computed on the CPU in float32) and the step
counters advance together (one per training forward, the same on every rank), so the ranks
refresh at the same steps to the same patterns. What it does not: DDP copies rank 0's buffers
into the others' **in place** when it wraps the model, but a layer's options and step counter
are Python state, and a layer compressed on one rank only gives the ranks different buffer
lists. So wrap a model that every rank compressed the same way (from the same weights: seed
them or load them), or call :func:`broadcast_compression` between the compression and the
wrap::

    model = vbxfx.compress(model, example, compression=0.66).model     # on every rank
    broadcast_compression(model)                 # rank 0's layers, levels, patterns, counters
    model = DistributedDataParallel(model.to(device), device_ids=[device.index])

It also leaves the layers' pattern buffers out of DDP's buffer broadcast, which otherwise sends
them from rank 0 before every forward: about 22 bytes per compressed weight (the derived
``mask``, ``pair_index``, projection coefficients), 5-6x the bytes of the gradients.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vbxfx.errors import ConfigError, FormatError, one_line
from vbxfx.modules.compressed import from_dense, is_compressed
from vbxfx.modules.swap import copy_module_state, replace_module

__all__ = ["broadcast_compression"]

logger = logging.getLogger(__name__)


def broadcast_compression(model: nn.Module, src: int = 0, group: Any = None) -> list[str]:
    """Give every rank's ``model`` rank ``src``'s compression; returns the layers changed here.

    Call it on every rank of ``group`` (a collective), before DDP wraps the model. Each rank
    ends up with ``src``'s compressed layers (a dense layer there is compressed here, a layer
    dense there made dense again, keeping its weight Parameter), at ``src``'s format, level,
    options, pattern and step counter. Layers that already match are left alone, so on a
    model that every rank compressed the same way it changes nothing (returns ``[]``). Dense
    weights are not sent: the wrap broadcasts them. A swapped layer keeps its weight and bias
    Parameter objects, so an optimizer built before keeps training them; called again during
    training, it puts back ``src``'s pattern on a rank that drifted.

    Raises:
        ConfigError: torch.distributed is not initialized, or the ranks' models differ in
            structure (a layer of ``src`` missing here or of another shape).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("broadcast_compression is a collective of torch.distributed: call "
                          "torch.distributed.init_process_group(...) first, on every rank")
    rank = dist.get_rank()
    box = [_plan(model) if rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    changed = [] if rank == src else _apply(model, box[0], src, rank)
    if changed:
        logger.info("vbxfx: rank %d took rank %d's compression of %d layer(s)", rank, src,
                    len(changed))
    _leave_out_of_ddp(model)
    return changed


def _plan(model: nn.Module) -> list[dict[str, Any]]:
    """What a rank needs to rebuild ``model``'s compressed layers: options and saved state."""
    plan = []
    for name, layer in _compressed(model):
        state = {k: v.detach().cpu() for k, v in layer.state_dict().items()
                 if k.startswith("vbx_")}            # repeat, packed pattern, counter and flags
        plan.append({"name": name, "shape": tuple(layer.weight.shape), "fmt": layer.fmt,
                     "repeat": layer.repeat, "compression": layer.compression,
                     "pairing": layer.pairing, "refresh_every": layer._vbx_refresh_every,
                     "state": state})
    return plan


def _apply(model: nn.Module, plan: list[dict[str, Any]], src: int, rank: int) -> list[str]:
    changed = []
    for entry in plan:
        name = entry["name"]
        layer = _layer_at(model, name, entry["shape"], src, rank)
        if not is_compressed(layer) or layer.fmt != entry["fmt"]:
            level = {"repeat": entry["repeat"]} if entry["fmt"] == "comp" else \
                {"compression": entry["compression"]}
            new = from_dense(layer, fmt=entry["fmt"], pairing=entry["pairing"],
                             refresh_every=entry["refresh_every"], **level)
            new._vbx_name = name
            replace_module([model], name, layer, new)
            layer = new
        elif _same_state(layer, entry["state"]):
            continue
        try:
            layer.load_state_dict(entry["state"], strict=False)
        except (RuntimeError, ConfigError, FormatError) as e:
            raise ConfigError(f"{name!r}: rank {src}'s pattern does not load on rank {rank}: "
                              f"{one_line(e)}") from e
        changed.append(name)
    kept = {entry["name"] for entry in plan}
    for name, layer in list(_compressed(model)):
        if name not in kept:                          # dense on src: dense here too
            replace_module([model], name, layer, _dense_twin(layer))
            changed.append(name)
    return changed


def _layer_at(model: nn.Module, name: str, shape: tuple[int, ...], src: int,
              rank: int) -> nn.Module:
    try:
        layer = model.get_submodule(name)
    except AttributeError as e:
        raise ConfigError(f"rank {src} compressed {name!r}, which rank {rank}'s model does not "
                          "have: every rank must build the same model") from e
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or tuple(layer.weight.shape) != shape:
        raise ConfigError(f"rank {src} compressed {name!r} with a weight of shape {shape}; on "
                          f"rank {rank} it is {type(layer).__name__} of shape "
                          f"{tuple(getattr(layer, 'weight', torch.empty(0)).shape)}: every rank "
                          "must build the same model")
    return layer


def _same_state(layer: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    mine = layer.state_dict()
    return all(k in mine and torch.equal(mine[k].detach().cpu(), v) for k, v in state.items())


def _dense_twin(layer: Any) -> nn.Module:
    """A plain layer holding ``layer``'s own (dense) weight and bias Parameters."""
    plain = layer._plain()
    plain.weight = layer.weight
    plain.bias = layer.bias
    return copy_module_state(layer, plain)


def _compressed(model: nn.Module) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules() if is_compressed(m)]


def _leave_out_of_ddp(model: nn.Module) -> None:
    """Name the compressed layers' buffers in the list DDP reads when it wraps ``model``."""
    ours = [f"{name}.{b}" if name else b for name, layer in _compressed(model)
            for b, _ in layer.named_buffers(recurse=False)]
    before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    names = before + [n for n in ours if n not in set(before)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
