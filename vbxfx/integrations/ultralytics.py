"""Compress YOLO models inside the ultralytics trainer: two lines in the usual script.

::

    from ultralytics import YOLO
    from vbxfx.integrations.ultralytics import compressed_trainer

    model = YOLO("yolov8n.pt")            # a .yaml, a trained .pt, or a compressed best.pt
    model.train(data="coco8.yaml", epochs=100, trainer=compressed_trainer(0.66))

ultralytics rebuilds the model from its yaml when training starts and copies the weights over
by ``state_dict``, so a model compressed beforehand (``vbxfx.compress_vbx3(model.model)``)
trains dense. ``compressed_trainer`` returns a trainer (the task's own ultralytics trainer with
a few methods added) that compresses at the right moment:

* **after the model is built or loaded, before the optimizer and the EMA exist**
  (``get_model``): a plain model is compressed by :func:`vbxfx.compress` (torch.export trace at
  the training ``imgsz``, the MAC-aware allocation); a model that is already compressed (a
  compressed ``best.pt``, ``resume=True``) gets the same layers, levels, patterns and step
  counters back. Layers ultralytics freezes (``freeze=``, the DFL conv) stay dense;
* **the EMA follows the model's patterns**: ultralytics validates, saves and exports the EMA,
  whose dense weights are averaged but whose integer pattern buffers are not; after every
  optimizer step, and before every validation and save, each EMA layer takes its model layer's
  current pattern (:meth:`~vbxfx.modules.CompressedMixin.adopt_pattern`);
* ``last.pt`` / ``best.pt`` hold the compressed modules (about 1.25x the dense file in
  float16): ``YOLO("best.pt")`` loads them compressed, ``.val()``, ``.predict()`` and
  ``.export(format="onnx")`` work; ``vbxfx check best.onnx --model best.pt`` checks the
  exported file.

From the command line (the ``yolo`` command takes no trainer class)::

    vbxfx yolo train model=yolov8n.pt data=coco8.yaml epochs=100 compression=0.66

(or ``python -m vbxfx.integrations.ultralytics train ...``)

takes the ``yolo train`` arguments plus ``compression``, ``budget``, ``fmt``, ``json_file``,
``exclude`` (comma-separated globs), ``include_frozen``, ``calib`` (refit on that many
training images before the first epoch) and ``methods`` (comma-separated: ``sparsity``,
``channels``, ``lowrank``; :func:`vbxfx.compress`). A channel-pruned ``best.pt`` trains on
in its own smaller shapes (ultralytics would rebuild the dense yaml and drop every pruned
layer's weights).

Multi-GPU DDP training (``device=0,1``): ultralytics pickles the trainer class (with its
compression options) and the model for the workers it starts, so a model compressed in the
launching process reaches every worker as it is; a model a worker builds itself (a ``.yaml``,
where ultralytics seeds each rank differently, or ``resume=True``) is compressed on rank 0 and
the other ranks take its layers, levels and patterns
(:func:`vbxfx.modules.distributed.broadcast_compression`), before DDP wraps the model. The
ranks then refresh together from the same averaged weights; each validation takes rank 0's
patterns again (logging any rank that drifted), and rank 0 saves, as ultralytics does.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.modules import DEFAULT_REFRESH_EVERY, FORMATS, compressed_modules
from vbxfx.integrations.ultralytics_models import pruned_structure, take_pruned
from vbxfx.integrations.ultralytics_models import (  # noqa: F401  (their home until now)
    ULTRALYTICS_HINT, follow_patterns, transfer_compression, warn_if_ultralytics)
from vbxfx.modules.distributed import broadcast_compression
from vbxfx.shrink.apply import ShrinkRecord

__all__ = ["compressed_trainer", "trainer_class", "CompressOptions", "transfer_compression",
           "follow_patterns", "main"]

logger = logging.getLogger(__name__)

#: ultralytics' trainer of each task (module, class), imported when first needed.
TASK_TRAINERS = {
    "detect": ("ultralytics.models.yolo.detect", "DetectionTrainer"),
    "segment": ("ultralytics.models.yolo.segment", "SegmentationTrainer"),
    "pose": ("ultralytics.models.yolo.pose", "PoseTrainer"),
    "obb": ("ultralytics.models.yolo.obb", "OBBTrainer"),
    "classify": ("ultralytics.models.yolo.classify", "ClassificationTrainer"),
}


@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """What the trainer passes to :func:`vbxfx.compress`; checked when built."""

    compression: float = 0.66
    budget: str = "macs"
    fmt: str = "comp"
    json_file: Any = None
    exclude: tuple[str, ...] = ()
    pairing: bool = True
    refresh_every: int | None = DEFAULT_REFRESH_EVERY
    include_frozen: bool = False
    calib: int = 0
    methods: tuple[str, ...] = ("sparsity",)

    def __post_init__(self) -> None:
        c = self.compression
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) \
                or not 0.0 < c < 1.0:
            raise ConfigError(f"compression must be a fraction in (0, 1) of the budget removed, "
                              f"e.g. 0.66, got {c!r}")
        if self.budget not in ("macs", "params"):
            raise ConfigError(f"budget must be 'macs' or 'params', got {self.budget!r}")
        if self.fmt not in FORMATS:
            raise ConfigError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        for name in ("pairing", "include_frozen"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.calib, bool) or not isinstance(self.calib, int) or self.calib < 0:
            raise ConfigError(f"calib must be a number of training images (0: no refit), got "
                              f"{self.calib!r}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if not all(isinstance(e, str) for e in exclude):
            raise ConfigError(f"exclude must be layer names or globs, got {self.exclude!r}")
        object.__setattr__(self, "exclude", exclude)
        from vbxfx.pipeline.methods import check_methods

        object.__setattr__(self, "methods", check_methods(self.methods))


# ------------------------------------------------------------------------- the trainer
class _CompressingTrainer:
    """Methods added in front of an ultralytics trainer class (see the module docstring)."""

    vbx_options: CompressOptions = CompressOptions()
    vbx_report: dict | None = None

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        start = time.perf_counter()
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        source = weights.get("ema") or weights.get("model") if isinstance(weights, Mapping) \
            else weights
        if isinstance(source, nn.Module) and pruned_structure(source, model):
            model = take_pruned(source, model)
            self.vbx_report = None
        elif _ddp_rank() > 0 and self.vbx_options.methods == ("sparsity",):
            # rank 0's compression comes over in setup_model (pruning is deterministic: every
            # rank prunes the same channels itself)
            logger.debug("vbxfx: rank %d takes rank 0's compression", _ddp_rank())
            if self.vbx_options.calib:
                self._vbx_dense = copy.deepcopy(model)
        elif isinstance(source, nn.Module) and any(True for _ in compressed_modules(source)):
            kept = transfer_compression(source, model)
            logger.info("vbxfx: %d compressed layer(s) carried over from the loaded model",
                        len(kept))
            self.vbx_report = None
        else:
            if self.vbx_options.calib:
                self._vbx_dense = model           # vbxfx.compress returns a compressed copy
            model = self._vbx_compress(model)
        self.vbx_setup_seconds = time.perf_counter() - start
        return model

    def _vbx_compress(self, model: nn.Module) -> nn.Module:
        import vbxfx

        opts = self.vbx_options
        exclude = list(opts.exclude)
        if not opts.include_frozen:
            exclude += _frozen_layers(model, self.args.freeze)
        size = self.args.imgsz
        h, w = (size, size) if isinstance(size, int) else (list(size) * 2)[:2]
        channels = int((getattr(self, "data", None) or {}).get("channels", 3))
        example = torch.zeros(1, channels, int(h), int(w))
        result = vbxfx.compress(model, example, compression=opts.compression, budget=opts.budget,
                                json_file=opts.json_file, exclude=exclude, fmt=opts.fmt,
                                pairing=opts.pairing, refresh_every=opts.refresh_every,
                                include_frozen=opts.include_frozen, methods=opts.methods)
        self.vbx_report = result.report
        record = result.report.get("shrink", {}).get("record")
        self._vbx_structure = ShrinkRecord.from_dict(record) if record else None
        totals = result.report["totals"]
        logger.info("vbxfx: %d of %d layers compressed, %.1f%% of the dense hardware MACs "
                    "removed at %dx%d", totals["compressed"], totals["layers"],
                    100 * totals["macs_removed"], h, w)
        return result.model

    def setup_model(self) -> Any:
        ckpt = super().setup_model()
        if _ddp_rank() >= 0:              # every DDP worker, before the wrap and the EMA
            broadcast_compression(self.model)
        dense, self._vbx_dense = getattr(self, "_vbx_dense", None), None
        if dense is not None:             # calib=N on a freshly compressed model
            from vbxfx.integrations.ultralytics_calib import refit_in_trainer

            calib = refit_in_trainer(self, self.model, dense, self.vbx_options.calib,
                                     getattr(self, "_vbx_structure", None))
            if self.vbx_report is not None:
                self.vbx_report["calib"] = calib
            if _ddp_rank() >= 0:          # every rank refit; rank 0's patterns win
                broadcast_compression(self.model)
        return ckpt

    def _setup_train(self) -> None:
        self._vbx_followed: dict[str, tuple[int, int]] = {}
        super()._setup_train()
        model = _unwrap(self.model)
        live, averaged = dict(compressed_modules(model)), dict(compressed_modules(self.ema.ema))
        if set(live) != set(averaged):
            raise ConfigError(f"vbxfx: the EMA holds {len(averaged)} compressed layers, the model "
                              f"{len(live)}; the EMA must be built from the compressed model")
        self._vbx_follow()

    def optimizer_step(self) -> None:
        super().optimizer_step()
        self._vbx_follow()

    def validate(self) -> Any:
        if _ddp_rank() >= 0:              # called on every rank, like its own EMA broadcast
            drifted = broadcast_compression(_unwrap(self.model))
            if drifted:
                logger.warning("vbxfx: rank %d's patterns of %s differed from rank 0's; took "
                               "rank 0's", _ddp_rank(), ", ".join(drifted))
        self._vbx_follow()
        return super().validate()

    def save_model(self) -> Any:
        self._vbx_follow()
        return super().save_model()

    def _vbx_follow(self) -> None:
        if getattr(self, "ema", None) is not None:
            follow_patterns(_unwrap(self.model), self.ema.ema, self._vbx_followed)


def _ddp_rank() -> int:
    """This process's rank in an initialized multi-process group, else -1."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return -1


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _frozen_layers(model: nn.Module, freeze: Any) -> list[str]:
    """The Conv2d/Linear layers whose weight ultralytics' trainer will freeze (``freeze=``
    and the DFL), by the trainer's own rule: a name piece found in the parameter's name."""
    layers = freeze if isinstance(freeze, list) else range(freeze) \
        if isinstance(freeze, int) else []
    pieces = [f"model.{x}." for x in layers] + [".dfl"]
    # weights frozen already (the DFL conv) are left dense by vbxfx.compress itself
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and m.weight.requires_grad and any(p in f"{name}.weight" for p in pieces)]


_CLASSES: dict[tuple[type, CompressOptions], type] = {}


def trainer_class(base: type, **options: Any) -> type:
    """``base`` (an ultralytics trainer class, yours included) with compression added.

    ``YOLO(...).train(trainer=trainer_class(MyTrainer, compression=0.66))``.
    """
    opts = CompressOptions(**options)
    if not isinstance(base, type) or not hasattr(base, "get_model"):
        raise ConfigError(f"trainer_class takes an ultralytics trainer class, got {base!r}")
    key = (base, opts)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Compressed{base.__name__}", (_CompressingTrainer, base),
                             {"vbx_options": opts, "__module__": __name__})
    return _CLASSES[key]


class _TrainerFactory:
    """What ``train(trainer=...)`` calls: the task's trainer, compressing."""

    def __init__(self, options: CompressOptions):
        self.options = options

    def __call__(self, overrides: dict | None = None, _callbacks: Any = None, **kwargs: Any):
        task = (overrides or {}).get("task") or "detect"
        if task not in TASK_TRAINERS:
            raise ConfigError(f"vbxfx has no compressed trainer for the ultralytics task "
                              f"{task!r}; accepted: {sorted(TASK_TRAINERS)} (or "
                              "trainer_class(YourTrainer, ...))")
        module, name = TASK_TRAINERS[task]
        base = getattr(importlib.import_module(module), name)
        cls = trainer_class(base, **dataclasses.asdict(self.options))
        return cls(overrides=overrides, _callbacks=_callbacks, **kwargs)

    def __repr__(self) -> str:
        return f"compressed_trainer({self.options})"


def compressed_trainer(compression: float = 0.66, **options: Any) -> Callable[..., Any]:
    """The ``trainer=`` argument of ``YOLO(...).train`` that trains the model compressed.

    Args:
        compression: the fraction of the budget removed (hardware MACs by default).
        options: ``budget`` ("macs" / "params"), ``fmt`` ("comp" / "ucomp"), ``json_file``
            (per-layer levels, a path or a mapping), ``exclude`` (names or globs kept dense),
            ``pairing``, ``refresh_every``, ``include_frozen`` (also compress the layers the
            trainer freezes), ``calib`` (refit the compressed layers on this many training
            images before the first epoch: :mod:`vbxfx.integrations.ultralytics_calib`).

    Raises:
        ConfigError: a bad option (raised here, before any training starts).
    """
    return _TrainerFactory(CompressOptions(compression=compression, **options))


# ------------------------------------------------------------------------ command line
_OPTION_KEYS = {f.name for f in dataclasses.fields(CompressOptions)}


def _parse(argv: Iterable[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    from ultralytics.cfg import smart_value

    argv = list(argv)
    if not argv or argv[0] != "train":
        raise ConfigError("usage: vbxfx yolo train model=M data=D [yolo train arguments] "
                          "compression=0.66")
    yolo, ours = {}, {}
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"arguments are key=value like yolo's, got {item!r}")
        target = ours if key in _OPTION_KEYS else yolo
        target[key] = value if key in ("json_file", "exclude", "methods") else smart_value(value)
    for key in ("exclude", "methods"):
        if key in ours:
            ours[key] = tuple(e for e in ours[key].split(",") if e)
    model = yolo.pop("model", None)
    if not model:
        raise ConfigError("give model=..., e.g. model=yolov8n.pt or model=yolov8n.yaml")
    return str(model), yolo, ours


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m vbxfx.integrations.ultralytics train ...``; returns the exit code."""
    import sys

    try:
        model, yolo_args, options = _parse(sys.argv[1:] if argv is None else argv)
        trainer = compressed_trainer(**options)
    except ConfigError as e:
        print(f"vbxfx: error: {e}", file=sys.stderr)
        return 2
    if not os.path.exists(model) and not model.endswith((".yaml", ".yml")):
        print(f"vbxfx: error: no model file {model!r}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:              # run as python -m: say what happens
        logging.basicConfig(format="%(message)s")
    ours = logging.getLogger("vbxfx")
    before = ours.level
    ours.setLevel(min(ours.getEffectiveLevel(), logging.INFO))   # the compression summary
    try:
        from ultralytics import YOLO

        YOLO(model).train(trainer=trainer, **yolo_args)
    finally:
        ours.setLevel(before)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
