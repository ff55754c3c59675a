"""Per-layer overrides of the allocation, in the seed library's ``json_file`` format.

A JSON object maps a layer's fully-qualified name to the fraction of its multiplies to remove,
or to ``"dense"`` to keep the layer out of compression::

    {"features.18.0": 0.5, "features.0.0": "dense", "classifier.1": 0.75}

Structured format (``fmt="comp"``): 0.5 means the 2:4 level (repeat 2), 0.75 the 1:4 level
(repeat 1), 0 or ``"dense"`` repeat 4. Any other value in [0, 1] goes to the nearest of those
(ties to the milder level) with a logged warning; 0.66, which the seed accepts, becomes 1:4.
Unstructured format (``fmt="ucomp"``): a value in [0.5, 1) is used as it is, 0 or ``"dense"``
keeps the layer dense.

Wherever a ``json_file`` is taken (:func:`vbxfx.compress`, :func:`vbxfx.compress_vbx3`,
``vbxfx compress --json-file``), it is a path to such a file or, in Python, the mapping
itself: ``json_file={"features.0.0": "dense"}``.

Keys are exact names or fnmatch globs (``"features.1?.conv.2"``); an exact name wins over a
glob, and a later glob over an earlier one. Listed layers are fixed; the others take part in
the global choice and make up the difference to the target.

>>> from vbxfx.analysis.layers import LayerInfo, LayerTable
>>> conv = LayerInfo("conv", "conv2d", "conv", (8, 8, 1, 1), (1, 8, 4, 4), (1, 8, 4, 4), 1,
...                  8, 8, 1, 1, 16, 1024, {4: 1024, 2: 512, 1: 256}, 72, True)
>>> resolve_overrides({"conv": 0.75}, LayerTable([conv]))
{'conv': 1}
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from vbxfx.errors import ConfigError
from vbxfx.analysis.layers import LayerTable

__all__ = ["DENSE", "FORMATS", "COMP_LEVELS", "load_overrides", "resolve_overrides",
           "merged_overrides", "describe"]

logger = logging.getLogger(__name__)

#: The value that keeps a layer dense.
DENSE = "dense"
#: The two compression formats (docs/format.md): structured and unstructured.
FORMATS = ("comp", "ucomp")
#: Structured format: fraction of multiplies removed -> repeat.
COMP_LEVELS = {0.0: 4, 0.5: 2, 0.75: 1}
_UCOMP_RANGE = (0.5, 1.0)
_GLOB_CHARS = frozenset("*?[")


def describe(json_file: str | os.PathLike | Mapping[str, Any]) -> str:
    """How messages name a ``json_file``: ``json_file 'layers.json'`` or ``json_file (a dict)``."""
    if isinstance(json_file, Mapping):
        return f"json_file (a {type(json_file).__name__})"
    return f"json_file {os.fspath(json_file)!r}"


def load_overrides(json_file: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a ``json_file`` of per-layer overrides, or copy the mapping given instead (no
    validation of the values yet).

    Raises:
        ConfigError: the file is missing or unreadable, not JSON, or not a JSON object;
            the message names the file. Anything but a path or a mapping.
    """
    if isinstance(json_file, Mapping):
        return dict(json_file)
    if not isinstance(json_file, (str, os.PathLike)):
        raise ConfigError(f"json_file must be a path to a JSON file or a mapping "
                          f"{{\"layer.fqn\": 0.5 | 0.75 | \"dense\"}}, got "
                          f"{type(json_file).__name__}")
    path = os.fspath(json_file)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"json_file {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"json_file {path!r} is not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"json_file {path!r} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"json_file {path!r} must hold a JSON object {{\"layer.fqn\": 0.5 | "
                          f"0.75 | \"dense\"}}, got a {type(data).__name__}")
    return data


def _level(name: str, value: Any, fmt: str, source: str) -> int | float:
    """The repeat (comp) or compression (ucomp) that ``value`` asks for ``name``."""
    if isinstance(value, str) and value.strip().lower() == DENSE:
        return 4 if fmt == "comp" else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: layer {name!r} has value {value!r}; accepted are a "
                          f"fraction of multiplies removed (0.5, 0.75, ...) or {DENSE!r}")
    value = float(value)
    if fmt == "ucomp":
        if value == 0.0 or _UCOMP_RANGE[0] <= value < _UCOMP_RANGE[1]:
            return value
        raise ConfigError(f"{source}: layer {name!r} has compression {value}; the unstructured "
                          f"format takes values in [0.5, 1) or 0 / {DENSE!r}")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{source}: layer {name!r} has compression {value}; accepted are "
                          f"0.5 (2:4), 0.75 (1:4), 0 or {DENSE!r} (dense)")
    nearest = min(COMP_LEVELS, key=lambda c: (abs(c - value), -COMP_LEVELS[c]))
    if nearest != value:
        logger.warning("%s: layer %r asks for compression %g, which the structured format "
                       "does not have; using the nearest level %g (repeat %d)", source, name,
                       value, nearest, COMP_LEVELS[nearest])
    return COMP_LEVELS[nearest]


def resolve_overrides(raw: Mapping[str, Any], table: LayerTable, fmt: str = "comp",
                      source: str = "overrides") -> dict[str, int | float]:
    """Map each overridden eligible layer to its level: a repeat (comp) or a compression (ucomp).

    Ineligible layers named with a compression are ignored with a warning (they stay dense);
    globs skip them silently.

    Raises:
        ConfigError: a key that is neither a layer name nor a glob matching one (the
            message lists the closest names), or a value that is not accepted.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source} must be a mapping {{layer name: 0.5 | 0.75 | 'dense'}}, "
                          f"got {type(raw).__name__}")
    names = table.names()
    unknown = []
    exact: dict[str, int | float] = {}
    globbed: dict[str, int | float] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: layer names must be strings, got {key!r}")
        if key in table:
            exact[key] = _level(key, value, fmt, source)
            continue
        if _GLOB_CHARS & set(key):
            hits = [n for n in names if fnmatch.fnmatchcase(n, key)]
            if hits:
                level = _level(key, value, fmt, source)
                globbed.update({n: level for n in hits})
                continue
        unknown.append(key)
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            parts.append(f"{key!r}" + (f" (closest: {close})" if close else ""))
        raise ConfigError(f"{source} names {len(unknown)} layer(s) this model does not have: "
                          + "; ".join(parts) + f". The model has {len(names)} layers, e.g. "
                          f"{names[:3]}")
    levels = {**globbed, **exact}
    dense = 4 if fmt == "comp" else 0.0
    out: dict[str, int | float] = {}
    for name in names:  # table order
        if name not in levels:
            continue
        info = table[name]
        if not info.eligible:
            if name in exact and levels[name] != dense:  # globs skip them silently
                logger.warning("%s: layer %r is not compressible (%s); it stays dense",
                               source, name, info.reason)
            continue
        out[name] = levels[name]
    return out


def merged_overrides(table: LayerTable,
                     json_file: str | os.PathLike | Mapping[str, Any] | None = None,
                     overrides: Mapping[str, Any] | None = None,
                     fmt: str = "comp") -> dict[str, int | float]:
    """The ``json_file`` overrides (a path or a mapping) with ``overrides`` on top (the
    argument wins per layer)."""
    out: dict[str, int | float] = {}
    if json_file is not None:
        out.update(resolve_overrides(load_overrides(json_file), table, fmt,
                                     source=describe(json_file)))
    if overrides is not None:
        out.update(resolve_overrides(overrides, table, fmt, source="overrides"))
    return out
