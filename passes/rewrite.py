"""Rewrite: swap the chosen Conv2d/Linear layers for their compressed versions.

The plan maps a layer's fully-qualified name to its level: a repeat (2 = 2:4, 1 = 1:4,
4 or ``"dense"`` = leave it), ``("comp", repeat)`` or ``("ucomp", compression)``. Each
chosen layer becomes a :class:`~vbxfx.modules.VBXConv2d` / :class:`~vbxfx.modules.VBXLinear`
by module swap at its name in ``gm.meta["vbxfx.root"]`` and, for the symbolic_trace front
end, in the GraphModule too (which shares its layers with the root); layers inside modules
the tracer kept as leaves are swapped in the root, which the GraphModule shares. For the
torch.export front end only the root is rewritten: the exported graph is an analysis view
and keeps its dense weights. No node is created or removed.

>>> gm = vbxfx.trace(model, torch.randn(1, 3, 32, 32))                  # doctest: +SKIP
>>> result = Rewrite({"layer1.0.conv1": 2, "fc": ("ucomp", 0.6)})(gm)    # doctest: +SKIP
>>> result.modified, result.details["layer1.0.conv1"].repeat            # doctest: +SKIP
(True, 2)
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from vbxfx.errors import ConfigError, FormatError
from vbxfx.modules import DEFAULT_REFRESH_EVERY, CompressedMixin, from_dense, is_compressed
from vbxfx.modules.swap import replace_module
from vbxfx.passes.base import GraphPass, PassResult
from vbxfx.analysis.trace import FRONTEND_KEY, get_root

__all__ = ["Rewrite", "LayerRewrite", "normalize_plan", "rewrite_modules", "layer_record"]

logger = logging.getLogger(__name__)

Level = tuple[str, float]  # ("comp", repeat) or ("ucomp", compression)


@dataclasses.dataclass(frozen=True)
class LayerRewrite:
    """What one swap did: the layer, its level, and how far the weight moved."""

    name: str
    fmt: str
    repeat: int               # 1 or 2 ("comp"), 0 ("ucomp")
    compression: float        # fraction of the layer's multiplies removed
    projection_error: float   # ||w - P(w)||² / ||w||²
    paired_fraction: float    # share of the nonzero weights that sit in a pair
    density: float            # share of the weights left nonzero

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def layer_record(name: str, layer: CompressedMixin) -> LayerRewrite:
    """The :class:`LayerRewrite` of a compressed layer as it is now."""
    enc = layer.encoding()
    fmt = layer.fmt
    compression = layer.compression if fmt == "ucomp" else {1: 0.75, 2: 0.5}[layer.repeat]
    return LayerRewrite(name=name, fmt=fmt, repeat=layer.repeat, compression=compression,
                        projection_error=layer.projection_error(),
                        paired_fraction=enc.paired_fraction,
                        density=float(enc.mask.float().mean()))


def _level(name: str, value: Any) -> Level | None:
    """One plan entry as ``(fmt, level)``; None keeps the layer dense."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"plan entry {name!r}: {value!r} {why}; accepted are 2 (2:4), 1 (1:4), "
                           "4 or 'dense' (leave dense), ('comp', 1 | 2 | 4) and ('ucomp', "
                           "compression in [0, 1])")
    if isinstance(value, str):
        if value == "dense":
            return None
        raise bad("is not a level")
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("comp", "ucomp"):
        fmt, level = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        fmt, level = "comp", value
    else:
        raise bad("is not a level")
    if fmt == "comp":
        if isinstance(level, bool) or level not in (1, 2, 4):
            raise bad("has no such repeat")
        return None if level == 4 else ("comp", int(level))
    if isinstance(level, bool) or not isinstance(level, numbers.Real) \
            or not math.isfinite(level) or not 0.0 <= level <= 1.0:
        raise bad("has no such compression")
    return None if level == 0.0 else ("ucomp", float(level))


def normalize_plan(plan: Mapping[str, Any]) -> dict[str, Level | None]:
    """Check every entry of a plan; ``{name: (fmt, level) or None (dense)}``.

    Raises:
        ConfigError: not a mapping of names to levels (the message says what is accepted).
    """
    if not isinstance(plan, Mapping):
        raise ConfigError(f"the plan must be a mapping {{layer fqn: level}}, got "
                          f"{type(plan).__name__}")
    out = {}
    for name, value in plan.items():
        if not isinstance(name, str):
            raise ConfigError(f"plan keys are fully-qualified layer names, got {name!r}")
        out[name] = _level(name, value)
    return out


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def rewrite_modules(containers: list[nn.Module], plan: Mapping[str, Level | None], *,
                    pairing: bool = True,
                    refresh_every: int | None = DEFAULT_REFRESH_EVERY) -> dict[str, LayerRewrite]:
    """Swap compressed layers into ``containers[0]`` (and the others, where they share it).

    Everything is checked and every new layer built before the first swap, so on an error
    nothing has changed. Returns the records of the swapped layers.

    Raises:
        ConfigError: a name that is not a module (the closest layer names are listed), a
            module that is not an nn.Conv2d/nn.Linear, a grouped convolution, the root.
        FormatError: a weight with NaN/Inf (the layer is named).
    """
    root = containers[0]
    modules = dict(root.named_modules())
    unknown = [n for n in plan if n not in modules]
    if unknown:
        layers = _layer_names(root)
        parts = [f"{n!r}" + (f" (closest: {close})" if (close := difflib.get_close_matches(
            n, layers, n=3, cutoff=0.5)) else "") for n in unknown]
        raise ConfigError(f"the plan names {len(unknown)} layer(s) the model does not have: "
                          + "; ".join(parts) + f". It has {len(layers)} Conv2d/Linear layers, "
                          f"e.g. {layers[:3]}")
    built: list[tuple[str, nn.Module, nn.Module]] = []
    for name, level in plan.items():
        if level is None:
            continue
        if not name:
            raise ConfigError("the plan names the model itself (''); a bare Conv2d/Linear "
                              "cannot be swapped in place: wrap it, e.g. nn.Sequential(model)")
        old = modules[name]
        fmt, value = level
        options = {"repeat": int(value)} if fmt == "comp" else {"compression": value}
        try:
            new = from_dense(old, fmt=fmt, pairing=pairing, refresh_every=refresh_every,
                             **options)
        except (ConfigError, FormatError) as e:
            raise type(e)(f"layer {name!r} ({type(old).__name__}): {e}") from e
        new._vbx_name = name
        built.append((name, old, new))

    aliases: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    records = {}
    for name, old, new in built:
        for alias in aliases[id(old)]:
            replace_module(containers, alias, old, new)
        records[name] = layer_record(name, new)
        logger.debug("rewrite %s: %s", name, records[name])
    return records


class Rewrite(GraphPass):
    """Transform pass (in place): swap the planned layers for compressed ones.

    Args:
        plan: ``{fqn: level}`` (see the module docstring); checked here.
        pairing: False gives plain magnitude masks.
        refresh_every: the compressed layers' pattern policy (see vbxfx.modules).

    Returns ``PassResult(gm, modified, details={fqn: LayerRewrite})``; ``modified`` is
    False when nothing was swapped (an empty plan, or only dense entries).

    Raises:
        ConfigError / FormatError: see :func:`rewrite_modules`; raised before any change.
    """

    in_place = True
    changes_input = True

    def __init__(self, plan: Mapping[str, Any], *, pairing: bool = True,
                 refresh_every: int | None = DEFAULT_REFRESH_EVERY):
        self.plan = normalize_plan(plan)
        if not isinstance(pairing, bool):
            raise ConfigError(f"pairing must be True or False, got {pairing!r}")
        self.pairing = pairing
        self.refresh_every = refresh_every

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        root = get_root(gm)
        containers = [root]
        if gm is not root and gm.meta.get(FRONTEND_KEY) != "export":
            containers.append(gm)
        records = rewrite_modules(containers, self.plan, pairing=self.pairing,
                                  refresh_every=self.refresh_every)
        if records:
            self._check_graph(gm, containers)
            gm.graph.lint()
            gm.recompile()
        logger.info("Rewrite: %d layer(s) compressed, %d left dense", len(records),
                    sum(1 for v in self.plan.values() if v is None))
        return PassResult(gm, modified=bool(records), details=records)

    @staticmethod
    def _check_graph(gm: torch.fx.GraphModule, containers: list[nn.Module]) -> None:
        """Every call_module node of a swapped layer must now reach the compressed layer."""
        if len(containers) < 2:
            return
        root = containers[0]
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            try:
                mine, theirs = gm.get_submodule(node.target), root.get_submodule(node.target)
            except AttributeError:
                continue
            if mine is not theirs and (is_compressed(mine) or is_compressed(theirs)):
                raise ConfigError(f"node {node.format_node()}: the GraphModule and the root "
                                  "hold different modules at this name after the swap")
