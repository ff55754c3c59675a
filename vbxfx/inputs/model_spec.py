"""Resolve a model spec given on the command line to an ``nn.Module`` and an input shape.

Accepted forms:

* ``torchvision:NAME`` (e.g. ``torchvision:resnet18``): built with ``weights=None``
  (224x224 by default);
* ``ultralytics:CFG.yaml`` (e.g. ``ultralytics:yolov8n.yaml``): an ultralytics
  ``DetectionModel`` built from its config, offline (640x640 by default);
* ``PATH.py:FACTORY``: the callable ``FACTORY`` in the Python file ``PATH.py``, called with no
  arguments;
* ``PATH.pt`` / ``PATH.pth``: a whole model saved with ``torch.save(model, PATH)``, or a
  checkpoint that ultralytics' trainer wrote (``runs/detect/train/weights/best.pt``: its EMA
  model when present, else its model, in float32; the input size it trained at);
* ``demo``: the small CNN that ships with vbxfx (:mod:`vbxfx.inputs.demo`, 64x64).

``weights`` (a ``state_dict`` file) is loaded on top with ``strict=True``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from vbxfx.errors import ConfigError

__all__ = ["ResolvedModel", "resolve_model", "parse_input_shape", "check_input_memory",
           "ACCEPTED_FORMS"]

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = ("torchvision:NAME (e.g. torchvision:resnet18)",
                  "ultralytics:CFG.yaml (e.g. ultralytics:yolov8n.yaml)",
                  "path/to/file.py:factory",
                  "path/to/model.pt (a whole model saved with torch.save, or an ultralytics "
                  "checkpoint such as best.pt)",
                  "demo")


@dataclass
class ResolvedModel:
    model: nn.Module
    input_shape: tuple[int, ...] | None
    family: str
    description: str


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``.

    Raises:
        ConfigError: anything but comma-separated positive integers.
    """
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in str(text).replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"--input-shape {text!r} is not a shape; give comma-separated positive "
                          "integers such as 1,3,224,224")
    return shape


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: tracing and the shape analysis hold several activations at once, most of them wider
#: than the input (a stem of 32-64 channels at half resolution): a floor on the peak
ACTIVATION_FACTOR = 16


def check_input_memory(shape: tuple[int, ...], option: str = "--input-shape",
                       available: int | None = None) -> None:
    """Refuse, before anything is allocated, an input whose float32 tensor times
    :data:`ACTIVATION_FACTOR` exceeds the memory available.

    Raises:
        ConfigError: naming the input's size and the memory available.
    """
    available = _available_memory() if available is None else available
    need = 4 * math.prod(shape)
    if available is not None and need * ACTIVATION_FACTOR > available:
        raise ConfigError(f"{option} {','.join(map(str, shape))}: the input alone is "
                          f"{need / 1e9:.1f} GB in float32 and the analysis needs about "
                          f"{ACTIVATION_FACTOR}x that; {available / 1e9:.1f} GB of memory is "
                          "available: give a smaller shape")


def _fail(spec: str, tried: str) -> ConfigError:
    forms = "\n  ".join(ACCEPTED_FORMS)
    return ConfigError(f"cannot resolve model spec {spec!r}: {tried}.\nAccepted forms:\n  {forms}")


def _torchvision(spec: str, name: str) -> ResolvedModel:
    try:
        import torchvision
    except ImportError as e:
        raise _fail(spec, "torchvision is not installed (pip install torchvision)") from e
    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError) as e:
        import difflib
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise _fail(spec, f"torchvision has no model {name!r}{hint}") from e
    side = 299 if name.startswith("inception") else 224
    return ResolvedModel(model, (1, 3, side, side), "torchvision", f"torchvision.models.{name}")


def _ultralytics(spec: str, cfg: str) -> ResolvedModel:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError as e:
        raise _fail(spec, "ultralytics is not installed (pip install ultralytics)") from e
    if not cfg.endswith((".yaml", ".yml")):
        raise _fail(spec, f"{cfg!r} is not a config file: give a model config such as yolov8n.yaml "
                          "(pretrained .pt files need a download; pass their state_dict with --weights)")
    try:
        model = DetectionModel(cfg, verbose=False)
    except Exception as e:  # ultralytics raises many kinds for an unknown config
        raise _fail(spec, f"ultralytics could not build {cfg!r}: {e}") from e
    return ResolvedModel(model, (1, 3, 640, 640), "ultralytics", f"ultralytics DetectionModel({cfg})")


def _python_factory(spec: str, path: str, factory: str) -> ResolvedModel:
    if not os.path.isfile(path):
        raise _fail(spec, f"no Python file {path!r}")
    name = f"vbxfx_user_model_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise _fail(spec, f"importing {path!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise _fail(spec, f"{path!r} has no callable {factory!r} (callables there: {', '.join(found) or 'none'})")
    try:
        required = [p.name for p in inspect.signature(fn).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):        # no signature (a builtin): just call it
        required = []
    if required:
        raise _fail(spec, f"{path}:{factory}() needs argument(s) {', '.join(required)}; vbxfx "
                          "calls it with none: give them defaults, or add a factory that "
                          "takes no argument")
    try:
        model = fn()
    except Exception as e:
        raise _fail(spec, f"{path}:{factory}() raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise _fail(spec, f"{path}:{factory}() returned {type(model).__name__}, not an nn.Module")
    shape = getattr(model, "example_input_shape", None)
    return ResolvedModel(model, tuple(shape) if shape else None, "python", f"{path}:{factory}()")


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an error, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _ultralytics_checkpoint(obj: dict) -> tuple[nn.Module, str] | None:
    """``(module, key)`` of a checkpoint saved by ultralytics' trainer: ``ema`` while
    training (``last.pt``, ``model`` is None there), ``model`` once the optimizer is stripped
    (``best.pt``); None for any other dict."""
    for key in ("ema", "model"):
        if isinstance(obj.get(key), nn.Module):
            return obj[key], key
    return None


def _train_size(obj: dict) -> int | None:
    args = obj.get("train_args")
    size = args.get("imgsz") if isinstance(args, dict) else None
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return size if isinstance(size, int) and size > 0 else None


def _saved_model(spec: str, path: str) -> ResolvedModel:
    os.environ.setdefault("YOLO_OFFLINE", "1")   # an ultralytics checkpoint imports ultralytics
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise _fail(spec, f"{path!r} holds a model of package {e.name!r}, which is not installed "
                          f"(pip install {e.name})") from e
    except Exception as e:
        raise _fail(spec, f"torch.load({path!r}) failed: {type(e).__name__}: {_first_line(e)}") from e
    if isinstance(obj, dict):
        found = _ultralytics_checkpoint(obj)
        if found is not None:
            model, key = found
            model = model.float()                  # ultralytics saves float16
            side = _train_size(obj) or 640
            return ResolvedModel(model, (1, 3, side, side), "ultralytics",
                                 f"{type(model).__name__} from the checkpoint {path} ({key!r})")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise _fail(spec, f"{path!r} holds a state_dict, not a model: name the architecture as "
                              f"a spec and pass this file with --weights {path}")
        keys = ", ".join(map(repr, list(obj)[:6])) + (" ..." if len(obj) > 6 else "")
        raise _fail(spec, f"{path!r} holds a dict with keys {keys} and no model in it; give a "
                          "whole model saved with torch.save(model, path), an ultralytics "
                          "checkpoint ('ema' or 'model' holding the module), or the architecture "
                          "as a spec with this file's state_dict as --weights")
    if not isinstance(obj, nn.Module):
        raise _fail(spec, f"{path!r} holds a {type(obj).__name__}, not an nn.Module")
    return ResolvedModel(obj, None, "saved", f"torch.load({path})")


def resolve_model(spec: str, weights: str | None = None) -> ResolvedModel:
    """Build the model a spec names (see the module docstring) and load ``weights``.

    Raises:
        ConfigError: the spec cannot be resolved (names what was tried and the accepted forms)
            or the weights do not load.
    """
    spec = str(spec).strip()
    if spec in ("demo", "vbxfx:demo"):
        from vbxfx.inputs.demo import DemoNet
        resolved = ResolvedModel(DemoNet(), DemoNet.example_input_shape, "demo", "vbxfx.inputs.demo.DemoNet")
    elif spec.startswith("torchvision:"):
        resolved = _torchvision(spec, spec.split(":", 1)[1])
    elif spec.startswith("ultralytics:"):
        resolved = _ultralytics(spec, spec.split(":", 1)[1])
    elif ".py:" in spec:
        path, factory = spec.rsplit(":", 1)
        resolved = _python_factory(spec, path, factory)
    elif os.path.isfile(spec):
        resolved = _saved_model(spec, spec)
    else:
        raise _fail(spec, "it is neither a known prefix nor an existing file")
    if weights:
        _load_weights(resolved.model, weights)
        resolved.description += f" + {weights}"
    return resolved


def _load_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"--weights {path!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        if "weights_only" in text or "Unsupported global" in text:
            what = ("an ultralytics checkpoint (whole pickled modules)" if "ultralytics" in text
                    else "pickled Python objects, not only tensors")
            raise ConfigError(f"--weights {path!r} holds {what}, not a state_dict: give the file "
                              f"as the MODEL itself (e.g. vbxfx analyze {path}), which loads "
                              "the whole model") from e
        raise ConfigError(f"--weights {path!r} could not be read as a state_dict: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path!r} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ConfigError(f"--weights {path!r} does not match the model: {' '.join(first)}") from e
