"""Model-level helpers of the ultralytics integration: carrying a compression over to a
freshly built model, the EMA following the model's patterns, and the hint for a model
compressed outside the trainer (used by :mod:`vbxfx.integrations.ultralytics`)."""

from __future__ import annotations

import logging

from torch import nn

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
