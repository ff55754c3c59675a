"""Resolve a model spec given on the command line to an ``nn.Module`` and an input shape.

Accepted forms:

* ``torchvision:NAME`` (e.g. ``torchvision:resnet18``): built with ``weights=None``
  (224x224 by default);
* ``ultralytics:CFG.yaml`` (e.g. ``ultralytics:yolov8n.yaml``): an ultralytics
  ``DetectionModel`` built from its config, offline (640x640 by default);
* ``PATH.py:FACTORY``: the callable ``FACTORY`` in the Python file ``PATH.py``, called with no
  arguments;
* ``PATH.pt`` / ``PATH.pth``: a whole model saved with ``torch.save(model, PATH)``;
* ``demo``: the small CNN that ships with vbxfx (:mod:`vbxfx.demo`, 64x64).

``weights`` (a ``state_dict`` file) is loaded on top with ``strict=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from vbxfx.errors import ConfigError

__all__ = ["ResolvedModel", "resolve_model", "parse_input_shape", "ACCEPTED_FORMS"]

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = ("torchvision:NAME (e.g. torchvision:resnet18)",
                  "ultralytics:CFG.yaml (e.g. ultralytics:yolov8n.yaml)",
                  "path/to/file.py:factory",
                  "path/to/model.pt (a whole model saved with torch.save)",
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
    model = fn()
    if not isinstance(model, nn.Module):
        raise _fail(spec, f"{path}:{factory}() returned {type(model).__name__}, not an nn.Module")
    shape = getattr(model, "example_input_shape", None)
    return ResolvedModel(model, tuple(shape) if shape else None, "python", f"{path}:{factory}()")


def _saved_model(spec: str, path: str) -> ResolvedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _fail(spec, f"torch.load({path!r}) failed: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        raise _fail(spec, f"{path!r} holds a state_dict, not a model: name the architecture as a spec "
                          f"and pass this file with --weights {path}")
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
        from vbxfx.demo import DemoNet
        resolved = ResolvedModel(DemoNet(), DemoNet.example_input_shape, "demo", "vbxfx.demo.DemoNet")
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
        raise ConfigError(f"--weights {path!r} could not be read as a state_dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path!r} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ConfigError(f"--weights {path!r} does not match the model: {' '.join(first)}") from e
