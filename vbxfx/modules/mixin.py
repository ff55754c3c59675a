"""What VBXConv2d and VBXLinear share: the pattern, its projection, its refresh, its state.

A compressed layer keeps its **dense** weight as the trainable Parameter ``weight`` and a
pattern in buffers (``mask``, ``pair_index``, ``pair_sign``, ``vbx_repeat``). Forward uses
the compressed weight ``P(w) = a*w + b*w.flatten()[idx]``: the least-squares projection of the
dense weight onto the pattern (masked weights zeroed, each pair replaced by its common
signed magnitude), precomputed as coefficients ``a``, ``b`` and a gather index ``idx``.

**The update.** ``P`` is linear, so the gradient that reaches the dense weight is the exact
gradient of the loss with respect to it: ``P(grad)``. This is the straight-through-style
update of sparse fine-tuning: the optimizer steps the dense weight, forward always sees its
projection. Kept weights get their gradient, the two weights of a pair the average of their
(sign-mirrored) gradients, pruned weights none (weight decay aside, they keep their
values), so they can come back when the pattern is recomputed. ``P`` is an orthogonal
projection, hence self-adjoint: the backward pass is the same single gather as the forward
(``idx`` pairs each weight with its partner and itself otherwise), never a scatter-add.

**The pattern policy** counts *forwards in training mode with gradients enabled* (one per
optimizer step in the usual loop) and recomputes the optimal pattern from the dense weight
(the kernel's exact projection, then its encoding) before the forward that follows every
``refresh_every`` counted ones. With gradient accumulation over k micro-batches, the pattern
changes every ``refresh_every / k`` optimizer steps: scale the setting. ``refresh_every=None``
keeps the pattern fixed; :meth:`~CompressedMixin.freeze` fixes it for good. The counter is
plain Python state (no device sync), mirrored into the int64 buffer ``vbx_state`` whenever a
``state_dict`` is taken, so a checkpoint resumes exactly; under ``torch.compile`` the counter runs outside the graph
(``torch.compiler.disable``: one graph break per compressed layer while refreshes are on,
none with ``refresh_every=None`` or after ``freeze()``; a refresh causes no recompilation). Under multi-GPU ``nn.DataParallel`` the replicas count, not the
module: call :func:`vbxfx.modules.refresh_patterns` yourself there (on CPU or one GPU
DataParallel calls the module directly and the counter works).

**What is saved.** ``state_dict`` holds tensors only, so EMA code that iterates it
(ultralytics' ``ModelEMA``, timm's), ``torch.jit`` and the TorchScript ONNX exporter work
unchanged: ``weight``/``bias``, ``vbx_repeat``, ``vbx_pattern`` (the pattern, half a byte per
weight in the structured format: :mod:`vbxfx.modules.pattern_code`) and ``vbx_state``
(int64: layout version, step counter, ``refresh_every`` or -1, flags frozen/pairing, and the
float64 bits of ``compression``, NaN when None). ``mask``, ``pair_index``, ``pair_sign`` and
the projection's coefficients are buffers derived from ``vbx_pattern``: they move with
``.to()`` but are neither saved nor pickled (``copy.deepcopy`` and ``torch.save`` of the
whole module rebuild them), which keeps checkpoints small. State dicts and pickles written
by vbxfx 0.1.0 (``mask``/``pair_index``/``pair_sign`` and a dict ``_extra_state``) still load.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import torch
from torch import nn

from vbxfx.errors import ConfigError, FormatError
from vbxfx.format import (PairEncoding, encode_unstructured, pattern_coefficients,
                          project_unstructured, project_weight, weight_repeat)
from vbxfx.format.encoding import offsets_to_pairs, structured_offsets
from vbxfx.modules.pattern_code import pack_offsets, pattern_offsets, unpack_pattern
from vbxfx.modules.state import LayerStateMixin

__all__ = ["CompressedMixin", "DEFAULT_REFRESH_EVERY", "FORMATS"]

logger = logging.getLogger(__name__)

FORMATS = ("comp", "ucomp")
#: Training forwards between pattern refreshes, chosen by measurement. Digits CNN of
#: tests/test_finetune.py (width 8, all layers 1:4, SGD + cosine, mean of 3-4 seeds, test
#: cross-entropy / accuracy after fine-tuning):
#:   2 epochs (90 steps), lr 0.01: N=1 .0545, 5 .0549, 20 .0563, 45 .0592, fixed .0568
#:       (plain magnitude masks .0730); accuracy 98.8-99.0 % for all.
#:   6 epochs (270 steps), lr 0.02: N=1 .0349 / 99.17 %, 10 .0336 / 99.26 %,
#:       100 .0337 / 99.35 %, fixed .0371 / 99.07 % (plain masks .0348 / 99.26 %).
#: Refreshing every step is not better (patterns flap), never refreshing is worst on longer
#: runs, 10..100 are level. One refresh of resnet18 costs 1-4 dense training steps (batch 16,
#: 2 shared CPU cores: 0.9-6 s; tools/bench_finetune.py), so N=100 keeps it at 1-4 % of the
#: training time; N=10 would cost 10-40 %.
DEFAULT_REFRESH_EVERY = 100
_UNSET: Any = object()  # "repeat not given": 2 for "comp", nothing for "ucomp"


class _PatternProjection(torch.autograd.Function):
    """``a*w + b*w.flatten()[idx]`` with the same projection as its backward (self-adjoint)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, idx)
        return _project(w, a, b, idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        a, b, idx = ctx.saved_tensors
        if torch.is_grad_enabled():       # create_graph=True: keep the backward differentiable
            return _PatternProjection.apply(grad, a, b, idx), None, None, None
        return _project(grad, a, b, idx), None, None, None


def _project(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1)
    out = flat.index_select(0, idx)
    out.mul_(b.reshape(-1)).addcmul_(a.reshape(-1), flat)
    return out.view(w.shape)


def check_config(weight: torch.Tensor, fmt: Any, repeat: Any, compression: Any, pairing: Any,
                 refresh_every: Any) -> tuple[str, int, float | None]:
    """Validate the options of a compressed layer; return ``(fmt, repeat, compression)``."""
    if fmt not in FORMATS:
        raise ConfigError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(pairing, bool):
        raise ConfigError(f"pairing must be True or False, got {pairing!r}")
    if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(
            refresh_every, numbers.Integral) or refresh_every < 1):
        raise ConfigError(f"refresh_every must be a positive number of training steps or None "
                          f"(fixed pattern), got {refresh_every!r}")
    if fmt == "ucomp":
        if repeat is not _UNSET and repeat is not None:
            raise ConfigError(f"repeat={repeat!r} does not apply to fmt='ucomp' (the "
                              "unstructured format has no repeat); give compression=")
        if isinstance(compression, bool) or not isinstance(compression, numbers.Real) \
                or not math.isfinite(compression) or not 0.0 <= compression <= 1.0:
            raise ConfigError(f"fmt='ucomp' needs compression, the fraction of multiplies "
                              f"removed in [0, 1], got {compression!r}")
        return fmt, 0, float(compression)
    if compression is not None:
        raise ConfigError(f"compression={compression!r} applies to fmt='ucomp' only; the "
                          "structured format takes repeat=2 (2:4) or repeat=1 (1:4)")
    if repeat is _UNSET:
        repeat = 2
    if repeat is None:
        repeat = weight_repeat(weight.detach(), quantize=False)
        if repeat == 4:
            raise ConfigError("repeat=None takes the repeat the weight already fits, but it "
                              "fits only repeat 4 (dense); give repeat=2 (2:4) or repeat=1 (1:4)")
    if isinstance(repeat, bool) or repeat not in (1, 2):
        raise ConfigError(f"repeat must be 2 (2:4), 1 (1:4) or None (the repeat the weight "
                          f"already fits), got {repeat!r}; repeat 4 is dense: leave the layer "
                          "as it is")
    return fmt, int(repeat), None


class CompressedMixin(LayerStateMixin):
    """Pattern buffers, projection, refresh and state of a compressed layer (see module doc)."""

    weight: nn.Parameter

    # ------------------------------------------------------------------ setup
    def _vbx_setup(self, fmt: str, repeat: int, compression: float | None, pairing: bool,
                   refresh_every: int | None) -> None:
        w = self.weight
        self._vbx_compression = compression
        self._vbx_pairing = pairing
        self._vbx_refresh_every = refresh_every
        self._vbx_frozen = False
        self._vbx_steps = 0
        self._vbx_paired = False
        if not hasattr(self, "_vbx_name"):
            self._vbx_name = ""
        dev = w.device
        self.register_buffer("vbx_repeat", torch.tensor(repeat, dtype=torch.int64, device=dev))
        self.register_buffer("vbx_state", torch.zeros(5, dtype=torch.int64, device=dev))
        self._vbx_state_written: tuple | None = None
        self._vbx_set_pattern(self._vbx_optimal_pattern())

    # ------------------------------------------------------------------ the format
    @property
    def fmt(self) -> str:
        """``"comp"`` (structured, repeat 1 or 2) or ``"ucomp"`` (unstructured)."""
        return "ucomp" if int(self.vbx_repeat) == 0 else "comp"

    @property
    def repeat(self) -> int:
        """1 or 2 in the structured format, 0 in the unstructured one."""
        return int(self.vbx_repeat)

    @property
    def compression(self) -> float | None:
        """Fraction of multiplies removed (``"ucomp"``); None in the structured format."""
        return self._vbx_compression

    @property
    def pairing(self) -> bool:
        return self._vbx_pairing

    @property
    def refresh_every(self) -> int | None:
        """Training forwards between refreshes; None when the pattern is fixed or frozen."""
        return None if self._vbx_frozen else self._vbx_refresh_every

    @property
    def frozen(self) -> bool:
        return self._vbx_frozen

    def encoding(self) -> PairEncoding:
        """The current pattern (copies of the buffers) as a PairEncoding."""
        return PairEncoding(self.repeat, self.mask.clone(), self.pair_index.clone(),
                            self.pair_sign.clone(), self.fmt)

    def compressed_weight(self) -> torch.Tensor:
        """The effective weight, in the format: the dense weight projected onto the pattern.

        Differentiable: its gradient reaches ``weight`` (see the module docstring).
        """
        w = self.weight
        if not self._vbx_paired:
            return self.vbx_coef_a * w
        if torch.is_grad_enabled() and w.requires_grad and not torch.jit.is_tracing():
            # (a traced graph records the plain ops: the same whether gradients are on or not)
            return _PatternProjection.apply(w, self.vbx_coef_a, self.vbx_coef_b,
                                            self.vbx_gather_index)
        return _project(w, self.vbx_coef_a, self.vbx_coef_b, self.vbx_gather_index)

    @torch.no_grad()
    def projection_error(self) -> float:
        """``||w - P(w)||² / ||w||²`` of the dense weight and its compressed weight."""
        w = self.weight.detach().float()
        norm = float(w.square().sum())
        err = float((w - self.compressed_weight().float()).square().sum())
        return err / norm if norm > 0 else 0.0

    # ------------------------------------------------------------------ pattern policy
    @torch.no_grad()
    def refresh_pattern(self) -> None:
        """Recompute the optimal pattern from the current dense weight and reset the counter.

        Raises:
            ConfigError: the layer was frozen with :meth:`freeze`.
            FormatError: the dense weight holds NaN/Inf (training diverged).
        """
        if self._vbx_frozen:
            raise ConfigError(f"{self._vbx_label()}: the pattern was frozen with freeze(); it "
                              "cannot be recomputed (build a new layer with from_dense)")
        self._vbx_set_pattern(self._vbx_optimal_pattern())
        self._vbx_steps = 0

    @property
    def pattern_version(self) -> int:
        """Grows by one whenever the pattern is set (refresh, load, adopt_pattern)."""
        return self._vbx_pattern_version

    @torch.no_grad()
    def adopt_pattern(self, other: "CompressedMixin") -> None:
        """Take the pattern and step counter of ``other``, a layer of the same shape, format
        and repeat (an EMA copy following its model); the dense weight stays this layer's.

        Raises:
            ConfigError: the layers differ in shape, format or repeat.
        """
        if tuple(other.weight.shape) != tuple(self.weight.shape) or other.repeat != self.repeat:
            raise ConfigError(f"{self._vbx_label()}: cannot take the pattern of "
                              f"{other._vbx_label()} (shape {tuple(other.weight.shape)}, repeat "
                              f"{other.repeat}; this layer: {tuple(self.weight.shape)}, repeat "
                              f"{self.repeat})")
        dev, dtype = self.weight.device, self.weight.dtype
        for name in ("vbx_pattern", "mask", "pair_index", "pair_sign", "vbx_gather_index"):
            self._buffers[name] = getattr(other, name).to(dev, copy=True)
        self._buffers["vbx_coef_a"] = other.vbx_coef_a.to(dev, dtype, copy=True)
        self._buffers["vbx_coef_b"] = other.vbx_coef_b.to(dev, dtype, copy=True)
        self._vbx_paired = other._vbx_paired
        self._vbx_steps = other._vbx_steps
        self._vbx_pattern_version += 1

    def freeze(self) -> "CompressedMixin":
        """Fix the current pattern for good: no more refreshes, saved in ``state_dict``."""
        self._vbx_frozen = True
        return self

    @torch.compiler.disable
    def _vbx_tick(self) -> None:
        """Count one training forward; refresh first when ``refresh_every`` have passed."""
        if self._vbx_steps >= self._vbx_refresh_every:
            self.refresh_pattern()
            logger.debug("%s: pattern refreshed", self._vbx_label())
        self._vbx_steps += 1

    def _vbx_maybe_tick(self) -> None:
        if self.training and self._vbx_refresh_every is not None and not self._vbx_frozen \
                and torch.is_grad_enabled():
            self._vbx_tick()

    # ------------------------------------------------------------------ internals
    def _vbx_label(self) -> str:
        return f"{type(self).__name__} {self._vbx_name!r}" if self._vbx_name \
            else type(self).__name__

    def _vbx_optimal_pattern(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The optimal pattern of the current dense weight as ``(mask, offset, opposite)``
        (:func:`~vbxfx.format.encoding.structured_offsets`)."""
        w = self.weight.detach().to("cpu", torch.float32)
        try:
            if int(self.vbx_repeat) == 0:
                enc = encode_unstructured(project_unstructured(w, self._vbx_compression,
                                                               pairing=self._vbx_pairing))
                mask, offset, opposite = pattern_offsets(enc.mask, enc.pair_index, enc.pair_sign)
            else:
                repeat = int(self.vbx_repeat)
                mask, offset, opposite = structured_offsets(
                    project_weight(w, repeat, pairing=self._vbx_pairing), repeat)
        except FormatError as e:
            raise FormatError(f"{self._vbx_label()}: {e}") from e
        if not self._vbx_pairing:  # plain magnitude masks: no ties between kept weights
            offset, opposite = torch.zeros_like(offset), torch.zeros_like(opposite)
        return mask, offset, opposite

    @torch.no_grad()
    def _vbx_set_pattern(self, pattern: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Adopt ``(mask, offset, opposite)`` from the encoder (trusted: no symmetry checks).

        New tensors, never in-place writes: a graph still waiting for its backward keeps the
        coefficients it was built with."""
        dev = self.weight.device
        mask, offset, opposite = (t.to(dev) for t in pattern)
        try:
            code = pack_offsets(mask, offset, opposite, self.fmt)
        except FormatError as e:
            raise FormatError(f"{self._vbx_label()}: {e}") from e
        self._vbx_put("vbx_pattern", code, persistent=True)
        index, sign = offsets_to_pairs(offset, opposite)
        self._vbx_put("mask", mask.to(torch.bool))
        self._vbx_put("pair_index", index)
        self._vbx_put("pair_sign", sign)
        self._vbx_rebuild_coefficients(check=False)
        self._vbx_pattern_version = getattr(self, "_vbx_pattern_version", 0) + 1

    def _vbx_put(self, name: str, value: torch.Tensor, persistent: bool = False) -> None:
        """Set (or register) one of the layer's own buffers."""
        self._buffers[name] = value
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    @torch.no_grad()
    def _vbx_decode_pattern(self) -> None:
        """The derived buffers from ``vbx_pattern`` (after a load or unpickling)."""
        try:
            mask, index, sign = unpack_pattern(self.vbx_pattern, tuple(self.weight.shape),
                                               self.fmt)
        except FormatError as e:
            raise FormatError(f"{self._vbx_label()}: {e}") from e
        self._vbx_put("mask", mask)
        self._vbx_put("pair_index", index)
        self._vbx_put("pair_sign", sign)
        self._vbx_rebuild_coefficients()
        self._vbx_pattern_version = getattr(self, "_vbx_pattern_version", 0) + 1

    @torch.no_grad()
    def _vbx_rebuild_coefficients(self, check: bool = True) -> None:
        """(a, b, idx) from the pattern buffers, checked to be a symmetric pairing (``check``;
        False for a pattern the encoder has just made, where the check is the slow part)."""
        n = self.mask.numel()
        index = self.pair_index.reshape(-1)
        if self.mask.shape != self.weight.shape or self.pair_index.shape != self.weight.shape \
                or self.pair_sign.shape != self.weight.shape:
            raise FormatError(f"{self._vbx_label()}: pattern buffers of shape "
                              f"{tuple(self.mask.shape)} do not match the weight "
                              f"{tuple(self.weight.shape)}")
        if n and (int(index.min()) < -1 or int(index.max()) >= n):
            raise FormatError(f"{self._vbx_label()}: pair_index holds values outside "
                              f"[-1, {n}); it must index weight.flatten()")
        enc = PairEncoding(self.repeat, self.mask, self.pair_index, self.pair_sign, self.fmt)
        a, b, idx = pattern_coefficients(enc)
        idx, b_flat = idx.reshape(-1), b.reshape(-1)
        if check and (not torch.equal(idx[idx], torch.arange(n, device=idx.device))
                      or not torch.equal(b_flat[idx], b_flat)):
            raise FormatError(f"{self._vbx_label()}: pair_index/pair_sign are not symmetric "
                              "(the partner of a weight's partner must be the weight, with the "
                              "same sign relation)")
        dtype = self.weight.dtype
        self._vbx_put("vbx_coef_a", a.to(dtype))
        self._vbx_put("vbx_coef_b", b.to(dtype))
        self._vbx_put("vbx_gather_index", idx.to(torch.int32 if n < 2 ** 31 else torch.int64))
        self._vbx_paired = bool((self.pair_index >= 0).any())

    def _vbx_extra_repr(self) -> str:
        level = f"repeat={self.repeat}" if self.fmt == "comp" else \
            f"compression={self._vbx_compression:g}"
        policy = "frozen" if self._vbx_frozen else f"refresh_every={self._vbx_refresh_every}"
        return f"fmt={self.fmt!r}, {level}, pairing={self._vbx_pairing}, {policy}"

