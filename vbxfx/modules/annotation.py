"""What a finalized compressed layer tells the exporter: :class:`LayerAnnotation`.

>>> import torch, vbxfx
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1))
>>> vbxfx.compress_vbx3(model, 0.5)["layers"]["0"]["repeat"]
2
>>> plain, notes = vbxfx.finalize(model)
>>> notes["0"].fmt, notes["0"].repeat, type(plain[0]).__name__
('comp', 2, 'Conv2d')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vbxfx.errors import FormatError
from vbxfx.format import PairEncoding

__all__ = ["LayerAnnotation"]

_REPEATS_BY_FORMAT = {"comp": (1, 2, 4), "ucomp": (0,)}


@dataclass(frozen=True)
class LayerAnnotation:
    """One compressed layer after :func:`vbxfx.finalize`.

    ``name`` is the layer's fully-qualified name in the model, ``fmt`` ``"comp"`` or
    ``"ucomp"``, ``repeat`` 1 or 2 (``"comp"``) or 0 (``"ucomp"``), and ``encoding`` the
    mask / pair indices / pair signs derived from the layer's final weight, so that they
    agree with the weights the toolchain will read.
    """

    name: str
    fmt: str
    repeat: int
    encoding: PairEncoding

    def __post_init__(self) -> None:
        if self.fmt not in _REPEATS_BY_FORMAT:
            raise FormatError(f"layer {self.name!r}: fmt must be one of "
                              f"{tuple(_REPEATS_BY_FORMAT)}, got {self.fmt!r}")
        if self.repeat not in _REPEATS_BY_FORMAT[self.fmt]:
            raise FormatError(f"layer {self.name!r}: repeat {self.repeat!r} does not go with "
                              f"fmt {self.fmt!r} (accepted: {_REPEATS_BY_FORMAT[self.fmt]})")
        if self.encoding.format != self.fmt or self.encoding.repeat != self.repeat:
            raise FormatError(f"layer {self.name!r}: the encoding is {self.encoding.format!r} "
                              f"repeat {self.encoding.repeat}, the annotation says {self.fmt!r} "
                              f"repeat {self.repeat}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the tensors are summarised, not listed)."""
        enc = self.encoding
        return {"name": self.name, "fmt": self.fmt, "repeat": self.repeat,
                "nonzeros": int(enc.mask.sum()), "weights": int(enc.mask.numel()),
                "pairs": enc.num_pairs, "paired_fraction": enc.paired_fraction}
