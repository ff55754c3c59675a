"""Model-level helpers of the ultralytics integration: carrying a compression over to a
freshly built model, the EMA following the model's patterns, and the hint for a model
compressed outside the trainer (used by :mod:`vbxfx.integrations.ultralytics`)."""

from __future__ import annotations

import copy
import logging

from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.modules import compressed_modules, from_dense
from vbxfx.modules.swap import replace_module

__all__ = ["transfer_compression", "follow_patterns", "warn_if_ultralytics", "ULTRALYTICS_HINT"]

logger = logging.getLogger(__name__)

ULTRALYTICS_HINT = ("ultralytics' trainer rebuilds the model from its yaml and copies only the "
                    "dense weights, so YOLO(...).train() would train it dense: pass "
                    "trainer=vbxfx.integrations.ultralytics.compressed_trainer(compression) to "
                    "train() instead (it compresses inside the trainer, EMA and checkpoints "
                    "included)")


def transfer_compression(source: nn.Module, target: nn.Module) -> list[str]:
    """Compress ``target``'s layers as ``source``'s are: same names, levels, patterns, counters.

    ``target`` is a freshly built model that has already taken ``source``'s dense weights
    (ultralytics' ``model.load``). A layer whose shape changed (a new number of classes) is
    compressed at the same level from its own weight. Returns the names compressed.
    """
    names, plan = [], []
    for name, layer in compressed_modules(source):
        try:
            dense = target.get_submodule(name)
        except AttributeError:
            logger.warning("vbxfx: %s is compressed in the loaded model but missing in the new "
                           "one; skipped", name)
            continue
        if not isinstance(dense, (nn.Conv2d, nn.Linear)):
            continue
        options = {"repeat": layer.repeat} if layer.fmt == "comp" else \
            {"compression": layer.compression}
        new = from_dense(dense, fmt=layer.fmt, pairing=layer.pairing,
                         refresh_every=layer._vbx_refresh_every, **options)
        new._vbx_name = name
        if tuple(dense.weight.shape) == tuple(layer.weight.shape):
            new.adopt_pattern(layer)
            if layer.frozen:
                new.freeze()
        else:
            logger.info("vbxfx: %s changed shape %s -> %s; its pattern is derived anew", name,
                        tuple(layer.weight.shape), tuple(dense.weight.shape))
        plan.append((name, dense, new))
    for name, dense, new in plan:
        replace_module([target], name, dense, new)
        names.append(name)
    return names


def follow_patterns(model: nn.Module, ema: nn.Module,
                    seen: dict[str, tuple[int, int]] | None = None) -> int:
    """Give every compressed layer of ``ema`` the current pattern of ``model``'s layer of the
    same name; ``seen`` remembers what was copied, so unchanged layers cost nothing. Returns
    how many layers took a new pattern."""
    seen = {} if seen is None else seen
    live = dict(compressed_modules(model))
    done = 0
    for name, layer in compressed_modules(ema):
        source = live.get(name)
        if source is None:
            continue
        stamp = (id(source), source.pattern_version)
        if seen.get(name) != stamp:
            layer.adopt_pattern(source)
            seen[name] = stamp
            done += 1
        else:
            layer._vbx_steps = source._vbx_steps
    return done


def warn_if_ultralytics(model: nn.Module, what: str) -> None:
    """Log :data:`ULTRALYTICS_HINT` when ``model`` is an ultralytics model."""
    if type(model).__module__.startswith("ultralytics."):
        logger.warning("%s: %s", what, ULTRALYTICS_HINT)


def pruned_structure(source: nn.Module, target: nn.Module) -> bool:
    """Whether ``source`` (a loaded model) has channels pruned against ``target`` (the model
    built fresh from its yaml): a BatchNorm or a layer inside the trunk of another width.
    A new number of classes changes only the head's last convolutions, without BatchNorm."""
    fresh = dict(target.named_modules())
    for name, mod in source.named_modules():
        other = fresh.get(name)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if not isinstance(other, nn.modules.batchnorm._BatchNorm) \
                    or other.num_features != mod.num_features:
                return True
        elif isinstance(mod, nn.Sequential) and isinstance(other, (nn.Conv2d, nn.Linear)):
            return True                      # a layer as two low-rank factors
    return False


def take_pruned(source: nn.Module, target: nn.Module) -> nn.Module:
    """A trainable float copy of the channel-pruned ``source``, in ``target``'s place.

    Raises:
        ConfigError: the data set asks for another number of classes (the pruned head
            cannot take it).
    """
    nc_src, nc_new = getattr(source, "nc", None), getattr(target, "nc", None)
    if nc_src is not None and nc_new is not None and nc_src != nc_new:
        raise ConfigError(f"vbxfx: the loaded model has channels pruned and {nc_src} classes; "
                          f"the data set has {nc_new}: retrain the dense model on it, then "
                          "compress with methods= again")
    model = copy.deepcopy(source).float()
    for p in model.parameters():
        p.requires_grad_(True)
    for name in ("args", "yaml"):
        if hasattr(target, name):
            setattr(model, name, getattr(target, name))
    logger.info("vbxfx: the loaded model has pruned channels; training it in its own shapes")
    return model

