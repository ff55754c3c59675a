"""Typed records of the layers AnalyzeLayers finds: :class:`LayerInfo` and :class:`LayerTable`.

A ``LayerInfo`` describes one Conv/Linear layer (or one call of it: the pass writes a per-call
record into ``node.meta["vbxfx.layer"]`` and aggregates the calls per layer in the table).
MAC counts are for batch 1:

- ``macs``: standard multiply-accumulates, ``O * I/groups * kh*kw * H_out*W_out`` per call
  (``in_features * out_features * positions`` for Linear), summed over calls;
- ``hw_macs[R]``: the VectorBlox count at repeat ``R`` (4 dense, 2, 1) from
  :func:`vbxfx.format.cost.hardware_macs`, which pads input channels to blocks of 8.

An :class:`OpInfo` records a multiply-heavy op that is not a Conv/Linear layer (an attention
``matmul`` / ``bmm`` / ``scaled_dot_product_attention``, an ``einsum``, the whole of a leaf
module such as ``nn.MultiheadAttention``): the hardware runs it dense and vbxfx cannot compress
it, so its standard MACs count in every total, before and after compression.

The three MAC figures every vbxfx report uses (README, "What the MAC figures mean"):

**standard MACs** (the float model's multiplies, :attr:`LayerTable.total_macs`), **dense
hardware MACs** (every layer at ``R=4``, input channels padded to 8: :meth:`LayerTable.hw_macs`
with no repeats), **hardware MACs after** compression (with the chosen repeats); "removed" is
always ``1 - after / dense hardware MACs``.

>>> from vbxfx.analysis.layers import LayerInfo, LayerTable
>>> conv = LayerInfo(name="conv", kind="conv2d", node_name="conv", weight_shape=(8, 3, 3, 3),
...                  in_shape=(1, 3, 8, 8), out_shape=(1, 8, 6, 6), calls=1, in_channels=3,
...                  out_channels=8, groups=1, kernel_positions=9, output_positions=36,
...                  macs=7776, hw_macs={4: 20736, 2: 10368, 1: 5184}, params=224,
...                  eligible=True)
>>> table = LayerTable([conv])
>>> table.total_macs, table.hw_macs(), table.hw_macs({"conv": 1})
(7776, 20736, 5184)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.format.cost import REPEATS, check_repeat

__all__ = ["LayerInfo", "LayerTable", "OpInfo", "KINDS", "LINEAR_NOTE", "LAYER_TYPES",
           "module_kind", "OTHER_OPS_WARN_SHARE", "NOT_MODULE_KINDS"]

#: The ``kind`` values a LayerInfo can have.
KINDS = ("conv2d", "linear", "conv1d", "conv3d", "conv_transpose", "functional_conv2d",
         "functional_linear")
#: The ``note`` every Linear layer carries (docs/format.md, "Which layers").
LINEAR_NOTE = ("Linear is treated as a 1x1 convolution (blocks along in_features); the "
               "savings hold where the toolchain maps it to a convolution")


_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.Conv1d, "conv1d"),
    (nn.Conv2d, "conv2d"),
    (nn.Conv3d, "conv3d"),
    (nn.Linear, "linear"),
)
#: Module types reported as layers (vbxfx.trace keeps them, and their subclasses, as leaves).
LAYER_TYPES: tuple[type, ...] = tuple(t for t, _ in _MODULE_KINDS)


def module_kind(module: nn.Module) -> str | None:
    """The LayerInfo kind of a module, or None when it is not a Conv/Linear layer.

    >>> module_kind(nn.Conv2d(3, 8, 3)), module_kind(nn.ReLU())
    ('conv2d', None)
    """
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One Conv/Linear layer of a traced model, with its MAC cost at batch 1.

    ``output_positions`` is per call and per batch element: ``H_out*W_out`` for a Conv2d, the
    product of the output dims other than batch and features for a Linear (the tokens of a
    ViT block, 1 for a classifier head). For a transposed convolution ``macs`` counts the
    input positions, each of which scatters a whole kernel. ``eligible`` says whether the
    VectorBlox structured format can compress the layer; when not, ``reason`` says why.
    """

    name: str
    kind: str
    node_name: str
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_positions: int
    output_positions: int
    macs: int
    hw_macs: dict[int, int] = dataclasses.field(hash=False)
    params: int
    eligible: bool
    reason: str | None = None
    note: str | None = None
    #: The fx node of every call, in graph order (``node_name`` is the first).
    node_names: tuple[str, ...] = ()
    #: The module's class name, or the function for a functional call.
    module_type: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"LayerInfo {self.name!r}: kind must be one of {KINDS}, "
                              f"got {self.kind!r}")
        if not self.node_names:
            object.__setattr__(self, "node_names", (self.node_name,))

    @property
    def block_layout(self) -> bool:
        """True when the hardware reads the weight in blocks of 8 input channels: a Conv2d
        with ``groups == 1`` or a Linear, eligible or not (excluded, tied, functional)."""
        return self.groups == 1 and self.kind in (
            "conv2d", "linear", "functional_conv2d", "functional_linear")

    def cost(self, repeat: int = 4) -> int:
        """Hardware MACs at ``repeat``. An ineligible layer stays dense whatever ``repeat``:
        ``hw_macs[4]`` (with the channel padding) when it has the block layout, else its
        standard ``macs`` (depthwise, grouped, transposed, 1-D and 3-D convolutions, for
        which the format gives no padding rule).

        >>> fc = LayerInfo("fc", "linear", "fc", (10, 4), (1, 4), (1, 10), 1, 4, 10, 1, 1, 1,
        ...                40, {4: 80, 2: 40, 1: 20}, 50, True)
        >>> fc.cost(2), dataclasses.replace(fc, eligible=False, reason="excluded by user").cost(2)
        (40, 80)
        """
        check_repeat(repeat)
        if self.eligible:
            return self.hw_macs[repeat]
        return self.hw_macs[4] if self.block_layout else self.macs

    def merged(self, other: LayerInfo) -> LayerInfo:
        """This layer with the calls of ``other`` (the same layer called again) added."""
        return dataclasses.replace(
            self,
            calls=self.calls + other.calls,
            macs=self.macs + other.macs,
            hw_macs={r: self.hw_macs[r] + other.hw_macs[r] for r in self.hw_macs},
            node_names=self.node_names + other.node_names,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists); :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        d["hw_macs"] = {int(r): int(v) for r, v in self.hw_macs.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"LayerInfo.from_dict: unknown keys {unknown}; "
                              f"known: {sorted(known)}")
        kw = dict(d)
        for key in ("weight_shape", "in_shape", "out_shape", "node_names"):
            if key in kw:
                kw[key] = tuple(kw[key])
        kw["hw_macs"] = {int(r): int(v) for r, v in kw["hw_macs"].items()}
        return cls(**kw)


#: Share of the dense hardware MACs in other (uncompressible) ops above which reports warn.
OTHER_OPS_WARN_SHARE = 0.1
#: Layer kinds that are no Conv2d/Linear module call: vbxfx can never compress them.
NOT_MODULE_KINDS = ("functional_conv2d", "functional_linear", "conv1d", "conv3d",
                    "conv_transpose")


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """A multiply-heavy op outside the Conv/Linear layers, with its standard MACs at batch 1.

    ``name`` is the module the op runs in (the node name when none is known), ``ops`` the
    ATen operators counted (``"bmm"``, ``"_native_multi_head_attention"``, ...). The hardware
    runs these ops dense, so ``macs`` is also their hardware cost before and after compression.

    >>> OpInfo("attn", ("bmm",), "matmul_1", 4096, "MultiheadAttention").macs
    4096
    """

    name: str
    ops: tuple[str, ...]
    node_name: str
    macs: int
    module_type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ops": list(self.ops), "node_name": self.node_name,
                "macs": int(self.macs), "module_type": self.module_type}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpInfo:
        try:
            return cls(d["name"], tuple(d["ops"]), d["node_name"], int(d["macs"]),
                       d.get("module_type", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"OpInfo.from_dict needs name, ops, node_name, macs: {d!r}") from e


class LayerTable:
    """The layers of a model in graph order, keyed by fully-qualified name, and the other
    multiply-heavy ops (:class:`OpInfo`) the forward runs.

    >>> table = vbxfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    ... # doctest: +SKIP
    >>> table.total_macs, len(table), table["fc"].kind                   # doctest: +SKIP
    (1814073344, 21, 'linear')
    """

    def __init__(self, layers: Iterable[LayerInfo] = (), ops: Iterable[OpInfo] = ()):
        self.ops: tuple[OpInfo, ...] = tuple(ops)
        self._layers: dict[str, LayerInfo] = {}
        for layer in layers:
            if layer.name in self._layers:
                raise ConfigError(f"LayerTable: layer {layer.name!r} given twice; merge its "
                                  "calls with LayerInfo.merged")
            self._layers[layer.name] = layer

    # ----------------------------------------------------------------- collection
    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, name: object) -> bool:
        return name in self._layers

    def __getitem__(self, name: str) -> LayerInfo:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(self._unknown(name)) from None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LayerTable) and list(self) == list(other)
                and self.ops == other.ops)

    def __repr__(self) -> str:
        return (f"LayerTable({len(self)} layers, {len(self.eligible())} eligible, "
                f"{self.total_macs:,} MACs)")

    def names(self) -> list[str]:
        return list(self._layers)

    def eligible(self) -> list[LayerInfo]:
        """The layers the structured format can compress."""
        return [layer for layer in self if layer.eligible]

    # ----------------------------------------------------------------- totals
    @property
    def total_macs(self) -> int:
        """Standard MACs of the whole model at batch 1: every layer and every other op."""
        return self.layer_macs + self.other_macs

    @property
    def layer_macs(self) -> int:
        """Standard MACs of the Conv/Linear layers (called or functional), batch 1."""
        return sum(layer.macs for layer in self)

    @property
    def other_macs(self) -> int:
        """Standard MACs of the multiply-heavy ops outside the layers (dense on hardware)."""
        return sum(op.macs for op in self.ops)

    @property
    def other_share(self) -> float:
        """Share of the dense hardware MACs in multiply-heavy ops that are not Conv2d/Linear
        module calls (:attr:`ops`, functional conv/linear calls, Conv1d/3d, transposed
        convolutions): they stay dense whatever the compression."""
        dense = self.hw_macs()
        other = self.other_macs + sum(layer.cost(4) for layer in self
                                      if layer.kind in NOT_MODULE_KINDS)
        return other / dense if dense else 0.0

    @property
    def eligible_macs(self) -> int:
        """Standard MACs of the eligible layers."""
        return sum(layer.macs for layer in self if layer.eligible)

    def hw_macs(self, repeat_by_layer: Mapping[str, int] | None = None) -> int:
        """Hardware MAC total of the whole model with the given repeats per layer name.

        Layers not listed are dense (repeat 4). Ineligible layers stay dense whatever is
        listed for them (see :meth:`LayerInfo.cost`); the other ops (:attr:`ops`) count at
        their standard MACs.

        Raises:
            ConfigError: an unknown layer name (the message lists the closest names).
            FormatError: a repeat other than 1, 2 or 4.
        """
        repeats = dict(repeat_by_layer or {})
        for name, repeat in repeats.items():
            if name not in self._layers:
                raise ConfigError(self._unknown(name))
            check_repeat(repeat)
        return sum(layer.cost(repeats.get(layer.name, 4)) for layer in self) + self.other_macs

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self],
            "ops": [op.to_dict() for op in self.ops],
            "total_macs": self.total_macs,
            "layer_macs": self.layer_macs,
            "other_macs": self.other_macs,
            "eligible_macs": self.eligible_macs,
            "hw_macs_dense": self.hw_macs(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerTable:
        if "layers" not in d:
            raise ConfigError("LayerTable.from_dict needs a 'layers' list (from to_dict())")
        return cls((LayerInfo.from_dict(x) for x in d["layers"]),
                   (OpInfo.from_dict(x) for x in d.get("ops", ())))

    def to_json(self, **kw: Any) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> LayerTable:
        return cls.from_dict(json.loads(text))

    # ----------------------------------------------------------------- text
    def __str__(self) -> str:
        header = ("layer", "kind", "weight", "out", "calls", "MACs",
                  *(f"hw@R{r}" for r in sorted(REPEATS, reverse=True)), "eligible")
        rows = [header]
        for layer in self:
            rows.append((
                layer.name or "(root)", layer.kind, "x".join(map(str, layer.weight_shape)),
                "x".join(map(str, layer.out_shape)), str(layer.calls), f"{layer.macs:,}",
                *(f"{layer.cost(r):,}" if layer.eligible or r == 4 else "-"
                  for r in sorted(REPEATS, reverse=True)),
                "yes" if layer.eligible else f"no: {layer.reason}",
            ))
        numeric = {4, 5, 6, 7, 8}
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = []
        for row in rows:
            cells = [row[i].rjust(w) if i in numeric else row[i].ljust(w)
                     for i, w in enumerate(widths)]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        lines.insert(1, "-" * (sum(widths) + 2 * len(widths) + len(header[-1])))
        lines += self._ops_lines()
        lines += self.summary_lines()
        return "\n".join(lines)

    def _ops_lines(self, shown: int = 8) -> list[str]:
        if not self.ops:
            return []
        lines = ["", f"other multiply-heavy ops ({len(self.ops)}, dense, not compressible):"]
        biggest = sorted(self.ops, key=lambda op: -op.macs)
        for op in biggest[:shown]:
            where = f"{op.name} ({op.module_type})" if op.module_type else op.name
            lines.append(f"  {where}: {', '.join(op.ops)}, {op.macs:,} MACs")
        if len(biggest) > shown:
            rest = sum(op.macs for op in biggest[shown:])
            lines.append(f"  ... {len(biggest) - shown} more, {rest:,} MACs")
        return lines

    def summary_lines(self) -> list[str]:
        """The totals, each figure named as the README defines it."""
        lines = [
            f"{len(self)} layers, {len(self.eligible())} eligible",
            f"standard MACs: {self.total_macs:,} (Conv/Linear layers {self.layer_macs:,}, of "
            f"which eligible {self.eligible_macs:,}; other ops {self.other_macs:,})",
            f"dense hardware MACs (R=4, input channels padded to 8): {self.hw_macs():,}",
        ]
        if self.other_share >= OTHER_OPS_WARN_SHARE:
            lines.append(f"warning: {self.other_share:.1%} of the dense hardware MACs are in "
                         "ops that are not Conv2d/Linear layer calls (other ops, functional "
                         "calls, Conv1d/3d, transposed convs): they stay dense")
        return lines

    def _unknown(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        return (f"no layer named {name!r} in this table of {len(self)} layers"
                + (f"; closest: {close}" if close else ""))
