"""The sequential refit inside the ultralytics trainer (``compressed_trainer(..., calib=N)``).

After the trainer has built and compressed the model, and before the optimizer and the EMA
exist, the compressed layers are refit (:func:`vbxfx.reconstruct`, sequential, by hooks: YOLO
does not trace symbolically) on ``N`` training images: the first ``N`` of the training set,
read as the validator reads images (letterboxed, no augmentation) through the trainer's own
data loader and preprocessing. The refit writes the weights in place; every compressed layer
gets a bias (zeros where it had none, as a YOLO convolution has none) for the refit to set,
so that every DDP rank holds the same parameters; the optimizer, built afterwards, trains
them like any bias.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from vbxfx.modules import compressed_modules

__all__ = ["calibration_images", "refit_in_trainer"]

logger = logging.getLogger(__name__)


def calibration_images(trainer: Any, count: int) -> list[torch.Tensor]:
    """The first ``count`` training images as the model sees them, in batches on the
    trainer's device (the trainer's data loader in validation mode, then its
    ``preprocess_batch``)."""
    batch = int(getattr(trainer.args, "batch", 16) or 16)
    batch_size = min(count, batch if batch >= 1 else 16)     # batch=-1: ultralytics' autobatch
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=batch_size, rank=-1,
                                    mode="val")
    batches, seen = [], 0
    for batch in loader:
        img = trainer.preprocess_batch(batch)["img"]
        img = img[:count - seen]
        batches.append(img)
        seen += img.shape[0]
        if seen >= count:
            break
    return batches


def refit_in_trainer(trainer: Any, model: nn.Module, dense: nn.Module, count: int,
                     structure: Any = None) -> dict:
    """Refit ``model``'s compressed layers to ``dense`` on ``count`` training images, on the
    trainer's device; returns the summary the report keeps. ``structure``: the
    :class:`~vbxfx.shrink.apply.ShrinkRecord` of a model compressed with ``methods=``."""
    import vbxfx

    start = time.perf_counter()
    device = trainer.device
    model.to(device)
    dense.to(device)
    for _, layer in compressed_modules(model):   # the same parameters on every DDP rank,
        if layer.bias is None:                    # whichever layers the refit improves
            w = layer.weight
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                      requires_grad=w.requires_grad)
    images = calibration_images(trainer, count)
    if not images:
        logger.warning("vbxfx: no training image to refit on; calib=%d skipped", count)
        return {"images": 0}
    result = vbxfx.reconstruct(model, dense, images, structure=structure)
    seconds = time.perf_counter() - start
    n = sum(b.shape[0] for b in images)
    logger.info("vbxfx: %s, on %d training images in %.1f s", result.summary(), n, seconds)
    done = result.compressed
    return {"images": n, "method": result.method, "layers": len(done), "seconds": seconds,
            "error_before": sum(r.error_before for r in done) / max(len(done), 1),
            "error_after": sum(r.error_after for r in done) / max(len(done), 1)}
