"""A tiny YOLO detection data set made on the spot, and an ultralytics set-up that stays offline.

Used by tests/test_ultralytics_train.py and tools/bench_yolo.py. Each image holds one to three
filled rectangles of two classes (red = 0, blue = 1) on a noisy background, with labels in the
ultralytics format (``class cx cy w h``, normalised).

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> offline_ultralytics(root)                                      # doctest: +SKIP
>>> data = make_detection_set(root, train=4, val=2, size=64)       # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

__all__ = ["make_detection_set", "offline_ultralytics"]

_COLOURS = {0: (220, 40, 40), 1: (40, 60, 220)}


def offline_ultralytics(folder: str | os.PathLike) -> Path:
    """Point ultralytics' settings at ``folder`` and keep it from the network.

    Sets ``YOLO_OFFLINE`` and ``YOLO_CONFIG_DIR`` (read when ultralytics is first imported,
    so call this before importing it) and puts a local font there as ``Arial.ttf``, which
    the data set check would otherwise download.
    """
    cfg = Path(folder) / "ultralytics_config"
    cfg.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (cfg / name).exists():
            shutil.copyfile(font, cfg / name)
    return cfg


def _image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str]]:
    img = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
    labels = []
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(0, 2))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        img[y0:y0 + h, x0:x0 + w] = _COLOURS[cls]
        labels.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} "
                      f"{w / size:.6f} {h / size:.6f}")
    return img, labels


def make_detection_set(root: str | os.PathLike, train: int = 16, val: int = 8, size: int = 64,
                       seed: int = 0) -> Path:
    """Write images and labels under ``root`` and return the path of its ``data.yaml``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, labels = _image(rng, size)
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.png")
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(labels) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                    "names:\n  0: red\n  1: blue\n")
    return data
