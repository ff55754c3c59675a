"""VBXConv2d and VBXLinear: drop-in compressed layers that train like the dense ones.

>>> import torch
>>> conv = VBXConv2d.from_dense(torch.nn.Conv2d(16, 8, 3), repeat=1)
>>> isinstance(conv, torch.nn.Conv2d), conv.fmt, conv.repeat
(True, 'comp', 1)
>>> from vbxfx.format import weight_repeat
>>> weight_repeat(conv.compressed_weight()) <= 1
True
>>> type(conv.to_dense()).__name__
'Conv2d'
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.modules.mixin import _UNSET, DEFAULT_REFRESH_EVERY, CompressedMixin, check_config
from vbxfx.modules.swap import copy_module_state

__all__ = ["VBXConv2d", "VBXLinear", "is_compressed", "from_dense"]


class _FromDense:
    """``from_dense`` / ``to_dense`` shared by both layer types (they differ in their shell)."""

    _dense_type: type[nn.Module]

    @classmethod
    def from_dense(cls, dense: nn.Module, repeat: int | None = _UNSET, *, fmt: str = "comp",
                   compression: float | None = None, pairing: bool = True,
                   refresh_every: int | None = DEFAULT_REFRESH_EVERY) -> Any:
        """A compressed layer computing what ``dense`` computes, with its weight in the format.

        Args:
            dense: the plain layer (or a compressed one: its pattern is recomputed from its
                dense weight). The new layer holds the **same** ``weight`` and ``bias``
                Parameter objects, so an optimizer built before the swap keeps training them;
                it also gets ``dense``'s hooks (copied), training flag and extra attributes.
            repeat: ``"comp"``: 2 (2:4, default), 1 (1:4), or None for the repeat the weight
                already fits. Not used by ``"ucomp"``.
            fmt: ``"comp"`` (structured) or ``"ucomp"`` (unstructured).
            compression: ``"ucomp"`` only: the fraction of multiplies removed, in [0, 1].
            pairing: False gives plain magnitude masks (no equal-magnitude pairs).
            refresh_every: training forwards between pattern refreshes, or None (fixed).

        Raises:
            ConfigError: a bad option, a grouped convolution, or a subclass with its own
                ``forward``.
            FormatError: the weight holds NaN/Inf.
        """
        cls._check_dense(dense)
        fmt, level, compression = check_config(dense.weight, fmt, repeat, compression, pairing,
                                               refresh_every)
        new = cls._shell(dense)
        copy_module_state(dense, new)
        new._vbx_name = getattr(dense, "_vbx_name", "")
        new._vbx_setup(fmt, level, compression, pairing, refresh_every)
        return new

    @classmethod
    def _check_dense(cls, dense: nn.Module) -> None:
        base = cls._dense_type
        if not isinstance(dense, base):
            raise ConfigError(f"{cls.__name__}.from_dense takes an nn.{base.__name__}, got "
                              f"{type(dense).__name__}")
        if not isinstance(dense, cls) and type(dense).forward is not base.forward:
            raise ConfigError(f"{cls.__name__}.from_dense: {type(dense).__name__} overrides "
                              f"forward(), so what it computes is unknown; only plain "
                              f"nn.{base.__name__} layers (and subclasses that keep its "
                              "forward) can be compressed")

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A plain layer holding the compressed weight (same device, dtype, flags, hooks)."""
        plain = self._plain()
        plain.weight.copy_(self.compressed_weight())
        plain.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            plain.bias.copy_(self.bias)
            plain.bias.requires_grad_(self.bias.requires_grad)
        return copy_module_state(self, plain)


class VBXConv2d(_FromDense, CompressedMixin, nn.Conv2d):
    """An ``nn.Conv2d`` (groups=1) whose forward uses its weight in the VectorBlox format.

    Build it with :meth:`from_dense`, or directly with Conv2d's arguments plus the keyword
    options of :meth:`from_dense` (then the pattern comes from the random initial weight).
    See :mod:`vbxfx.modules.mixin` for the training behaviour.
    """

    _dense_type = nn.Conv2d

    def __init__(self, *args: Any, repeat: int | None = _UNSET, fmt: str = "comp",
                 compression: float | None = None, pairing: bool = True,
                 refresh_every: int | None = DEFAULT_REFRESH_EVERY, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._check_groups(self)
        self._vbx_setup(*check_config(self.weight, fmt, repeat, compression, pairing,
                                      refresh_every), pairing, refresh_every)

    @classmethod
    def _check_dense(cls, dense: nn.Module) -> None:
        super()._check_dense(dense)
        cls._check_groups(dense)

    @staticmethod
    def _check_groups(conv: nn.Conv2d) -> None:
        if conv.groups != 1:
            kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
            raise ConfigError(f"a {kind} convolution (groups={conv.groups}) stays dense on "
                              "VectorBlox; only groups=1 convolutions can be compressed")

    @classmethod
    def _shell(cls, dense: nn.Conv2d) -> VBXConv2d:
        new = cls.__new__(cls)
        nn.Conv2d.__init__(new, dense.in_channels, dense.out_channels, dense.kernel_size,
                           stride=dense.stride, padding=dense.padding, dilation=dense.dilation,
                           groups=1, bias=dense.bias is not None, padding_mode=dense.padding_mode,
                           device="meta")
        new.weight = dense.weight
        new.bias = dense.bias
        return new

    def _plain(self) -> nn.Conv2d:
        w = self.weight
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation,
                         groups=1, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=w.device, dtype=w.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._vbx_maybe_tick()
        return self._conv_forward(input, self.compressed_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._vbx_extra_repr()}"


class VBXLinear(_FromDense, CompressedMixin, nn.Linear):
    """An ``nn.Linear`` whose forward uses its weight in the VectorBlox format (a 1x1
    convolution to the hardware: blocks along ``in_features``)."""

    _dense_type = nn.Linear

    def __init__(self, *args: Any, repeat: int | None = _UNSET, fmt: str = "comp",
                 compression: float | None = None, pairing: bool = True,
                 refresh_every: int | None = DEFAULT_REFRESH_EVERY, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._vbx_setup(*check_config(self.weight, fmt, repeat, compression, pairing,
                                      refresh_every), pairing, refresh_every)

    @classmethod
    def _shell(cls, dense: nn.Linear) -> VBXLinear:
        new = cls.__new__(cls)
        nn.Linear.__init__(new, dense.in_features, dense.out_features,
                           bias=dense.bias is not None, device="meta")
        new.weight = dense.weight
        new.bias = dense.bias
        return new

    def _plain(self) -> nn.Linear:
        w = self.weight
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=w.device, dtype=w.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._vbx_maybe_tick()
        return F.linear(input, self.compressed_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._vbx_extra_repr()}"


def is_compressed(module: Any) -> bool:
    """Whether ``module`` is a vbxfx compressed layer (VBXConv2d or VBXLinear)."""
    return isinstance(module, CompressedMixin)


def from_dense(layer: nn.Module, **options: Any) -> VBXConv2d | VBXLinear:
    """``VBXConv2d.from_dense`` or ``VBXLinear.from_dense``, whichever fits ``layer``.

    Raises:
        ConfigError: ``layer`` is neither an nn.Conv2d nor an nn.Linear (or see from_dense).
    """
    if isinstance(layer, nn.Conv2d):
        return VBXConv2d.from_dense(layer, **options)
    if isinstance(layer, nn.Linear):
        return VBXLinear.from_dense(layer, **options)
    raise ConfigError(f"only nn.Conv2d (groups=1) and nn.Linear layers can be compressed, got "
                      f"{type(layer).__name__}")
