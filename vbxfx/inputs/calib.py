"""Calibration data: load it from a file or folder, or cut natural-image crops.

``load_calibration(path, input_shape, normalize=...)`` accepts

* a ``.pt``/``.pth`` file holding a float tensor ``[N, C, H, W]`` (already preprocessed);
* a ``.npy`` file with such an array;
* a folder of images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``): each is resized (shorter side
  to the input size), center-cropped, scaled to [0, 1] and, for ImageNet-style models,
  normalised with the ImageNet mean and standard deviation.

``natural_image_crops(n, size)`` cuts random crops out of the photos bundled with
scikit-image (no download), the label-free data of the benchmarks and tests.
``calibration_from_spec(spec, input_shape)`` reads the command line's ``--calib``: a path as
above, or ``skimage`` / ``skimage:N`` for N such crops (64 by default).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from vbxfx.errors import ConfigError

__all__ = ["load_calibration", "natural_image_crops", "calibration_from_spec", "IMAGENET_MEAN",
           "IMAGENET_STD", "PHOTOS", "SKIMAGE_DEFAULT"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: scikit-image's bundled RGB photos.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
          "immunohistochemistry", "colorwheel", "retina")
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")
#: crops that ``--calib skimage`` cuts when no count is given
SKIMAGE_DEFAULT = 64


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _check_shape(data: torch.Tensor, path: str, input_shape: tuple[int, ...]) -> torch.Tensor:
    if data.dim() != len(input_shape) or tuple(data.shape[1:]) != tuple(input_shape[1:]):
        raise ConfigError(f"calibration data {path!r} has shape {tuple(data.shape)}; the model takes "
                          f"[N, {', '.join(map(str, input_shape[1:]))}]")
    if not data.is_floating_point() or not bool(torch.isfinite(data).all()):
        raise ConfigError(f"calibration data {path!r} must be finite floating-point values")
    return data.float()


def _load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        h, w = size
        scale = max(h / im.height, w / im.width)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))),
                       Image.BILINEAR)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_calibration(path: str | os.PathLike, input_shape: tuple[int, ...],
                     normalize: bool = True, limit: int = 256) -> torch.Tensor:
    """Calibration batch ``[N, C, H, W]`` from ``path`` (see the module docstring).

    Raises:
        ConfigError: missing path, unknown format, no images, or the wrong shape.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"calibration data {path!r} does not exist; give a folder of images, "
                          "a .pt tensor file or a .npy array")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(_IMAGE_EXT))[:limit]
        if not files:
            raise ConfigError(f"calibration folder {path!r} holds no {'/'.join(_IMAGE_EXT)} images")
        if len(input_shape) != 4 or input_shape[1] != 3:
            raise ConfigError(f"image calibration needs a 3-channel image model; input shape is {input_shape}")
        data = torch.stack([_load_image(os.path.join(path, f), input_shape[2:]) for f in files])
        return _normalize(data) if normalize else data
    if path.endswith((".pt", ".pth")):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"calibration data {path!r} could not be loaded: {e}") from e
        if not isinstance(data, torch.Tensor):
            raise ConfigError(f"calibration data {path!r} holds a {type(data).__name__}, not a tensor")
        return _check_shape(data[:limit], path, input_shape)
    if path.endswith(".npy"):
        try:
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as e:
            raise ConfigError(f"calibration data {path!r} could not be loaded: {e}") from e
        return _check_shape(data[:limit], path, input_shape)
    raise ConfigError(f"calibration data {path!r}: unknown format; give a folder of images, "
                      "a .pt tensor file or a .npy array")


def calibration_from_spec(spec: str, input_shape: tuple[int, ...],
                          normalize: bool = True) -> torch.Tensor:
    """The calibration batch that ``--calib spec`` names: ``skimage[:N]`` crops of the input's
    size, else :func:`load_calibration` of the path.

    Raises:
        ConfigError: a bad count (``skimage:abc``, ``skimage:0``), an input that is not a
            3-channel image, or what :func:`load_calibration` raises.
    """
    spec = str(spec)
    if spec != "skimage" and not spec.startswith("skimage:"):
        return load_calibration(spec, tuple(input_shape), normalize=normalize)
    text = spec.partition(":")[2]
    try:
        n = int(text) if text else SKIMAGE_DEFAULT
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--calib {spec!r}: give skimage:N with N a positive number of crops, "
                          f"e.g. skimage:64 (skimage alone cuts {SKIMAGE_DEFAULT})")
    if len(input_shape) != 4 or input_shape[1] != 3:
        raise ConfigError(f"--calib {spec!r} cuts RGB photos; the model's input shape "
                          f"{tuple(input_shape)} is not [N, 3, H, W]: give calibration data of "
                          "its own as a .pt/.npy file")
    return natural_image_crops(n, size=(input_shape[2], input_shape[3]), normalize=normalize)


def natural_image_crops(n: int, size: int | tuple[int, int] = 224, seed: int = 0,
                        normalize: bool = True,
                        photos: tuple[str, ...] = PHOTOS) -> torch.Tensor:
    """``n`` random crops (30-100% of the shorter side, random flips) of scikit-image's photos,
    resized to ``size`` x ``size`` (or ``(height, width)``); ImageNet-normalised by default.

    Raises:
        ConfigError: a count or size that is not a positive integer; scikit-image is not
            installed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"natural_image_crops: n must be a positive int, got {n!r}")
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not (isinstance(hw, (tuple, list)) and len(hw) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)):
        raise ConfigError(f"natural_image_crops: size must be a positive int or (height, width), "
                          f"got {size!r}")
    try:
        import skimage.data
    except ImportError as e:
        raise ConfigError("natural_image_crops needs scikit-image (pip install scikit-image)") from e
    images = [torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, k)())).permute(2, 0, 1).float() / 255
              for k in photos]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        im = images[int(torch.randint(len(images), (1,), generator=g))]
        h, w = im.shape[1:]
        side = int(torch.randint(int(min(h, w) * 0.3), min(h, w) + 1, (1,), generator=g))
        y = int(torch.randint(0, h - side + 1, (1,), generator=g))
        x = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = torch.nn.functional.interpolate(im[None, :, y:y + side, x:x + side], size=tuple(hw),
                                               mode="bilinear", antialias=True, align_corners=False)
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(3)
        out.append(crop)
    data = torch.cat(out)
    return _normalize(data) if normalize else data
