"""Does a weight hold what its annotation says? Shared by the exporter and the checker.

Two questions per layer (``docs/onnx_schema.md``):

* **fits**: after symmetric per-output-channel int8 quantization the weight fits the
  declared repeat (comp), or needs no more multiplies than the annotation counts (ucomp);
* **agrees**: the mask equals the weight's nonzeros (an all-zero output channel, as a
  BatchNorm scale of zero leaves it, is accepted), every pair is mutual, lies in one block
  (comp) or joins an even and an odd input channel (ucomp), has equal int8 magnitudes and
  the stated sign relation.

>>> import torch, vbxfx
>>> w = vbxfx.project_weight(torch.randn(8, 16, 3, 3), 2)
>>> ann = LayerAnnotation("conv", "comp", 2, vbxfx.encode_weight(w, 2))
>>> v = verify_layer(w, ann, "conv")
>>> v.fits, v.agrees, v.compiler_repeat
(True, True, 2)
>>> verify_layer(-3.0 * w, ann, "conv").ok      # a folded BatchNorm keeps it
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vbxfx.export.annotations import LayerAnnotation
from vbxfx.format import (BLOCK, explain_violation, padded_channels, quantize_int8,
                          unstructured_macs, weight_repeat)

__all__ = ["LayerVerdict", "verify_layer", "dense_mults"]


@dataclass(frozen=True)
class LayerVerdict:
    """The outcome of :func:`verify_layer`; multiplies are per output position."""

    fits: bool
    agrees: bool
    compiler_repeat: int | None   # comp: the repeat vnnx_compile will pick; ucomp: None
    mults: int                    # multiplies on the hardware, from the weight itself
    declared_mults: int           # multiplies the annotation promises
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.fits and self.agrees


def dense_mults(shape: tuple[int, ...]) -> int:
    """Standard multiplies per output position of a weight of ``shape`` (groups=1)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _comp_mults(shape: tuple[int, ...], repeat: int) -> int:
    kernel = dense_mults(shape[2:]) if len(shape) == 4 else 1
    return shape[0] * kernel * padded_channels(shape[1]) * 2 * repeat // BLOCK


def _where(shape: tuple[int, ...], flat: int) -> str:
    if len(shape) == 4:
        o, i, kh, kw = shape
        ky, kx = divmod(flat % (kh * kw), kw)
        i_, o_ = (flat // (kh * kw)) % i, flat // (i * kh * kw)
        return (f"out channel {o_}, in channel {i_}, ky {ky}, kx {kx} "
                f"(block {i_ // BLOCK})")
    return f"out channel {flat // shape[1]}, in channel {flat % shape[1]} (block {flat % shape[1] // BLOCK})"


def _agreement(weight: torch.Tensor, q: torch.Tensor, ann: LayerAnnotation) -> list[str]:
    enc, shape = ann.encoding, tuple(weight.shape)
    w, qf = weight.reshape(-1), q.reshape(-1).to(torch.int16)
    mask = enc.mask.reshape(-1).to(torch.bool).cpu()
    idx = enc.pair_index.reshape(-1).to(torch.int64).cpu()
    sign = enc.pair_sign.reshape(-1).to(torch.int64).cpu()
    n = w.numel()
    out_ch = torch.arange(n) // (n // shape[0])
    zero_channel = (weight.reshape(shape[0], -1) == 0).all(dim=1)[out_ch]
    nz = w != 0
    paired = idx >= 0
    if bool(((idx < -1) | (idx >= n)).any()):
        return ["pair index out of range"]
    partner = torch.where(paired, idx, torch.arange(n))
    stride = n // (shape[0] * shape[1])
    ch = (torch.arange(n) // stride) % shape[1]
    pch = ch[partner]
    checks = [
        ("the mask does not match the weight's nonzeros", (nz != mask) & ~zero_channel),
        ("a pair is not mutual", paired & (partner[partner] != torch.arange(n))),
        ("a paired weight is masked out", paired & ~(mask & mask[partner])),
        ("a pair's int8 magnitudes differ", paired & (qf.abs() != qf[partner].abs())),
        ("a pair's sign relation differs from pair_sign",
         paired & nz & nz[partner] & (((w < 0) == (w[partner] < 0)) != (sign > 0))),
        ("pair_sign is set on an unpaired weight or missing on a pair",
         (~paired & (sign != 0)) | (paired & (sign == 0))),
    ]
    if ann.fmt == "comp":
        checks.append(("a pair crosses an 8-channel block", paired & (ch // BLOCK != pch // BLOCK)))
    else:
        checks.append(("a pair joins two even or two odd input channels", paired & (ch % 2 == pch % 2)))
    problems = []
    for what, bad in checks:
        hits = bad.nonzero()
        if hits.numel():
            first = int(hits[0, 0])
            problems.append(f"annotation disagrees with the weight: {what} at {_where(shape, first)}"
                            f" ({hits.numel()} weight(s))")
    return problems


@torch.no_grad()
def verify_layer(weight: torch.Tensor, ann: LayerAnnotation, where: str) -> LayerVerdict:
    """Check ``weight`` (torch layout, float) against its annotation; ``where`` names the
    layer or node in the problems."""
    enc = ann.encoding
    shape = tuple(weight.shape)
    if tuple(enc.mask.shape) != shape:
        msg = (f"{where}: the weight has shape {shape}, the annotation {tuple(enc.mask.shape)}")
        return LayerVerdict(False, False, None, 0, 0, (msg,))
    weight = weight.detach().to(torch.float32).cpu()
    q, _ = quantize_int8(weight)
    problems = [f"{where}: {p}" for p in _agreement(weight, q, ann)]
    declared_pairs = int((enc.pair_index >= 0).sum()) // 2
    if ann.fmt == "comp":
        compiler_repeat = weight_repeat(weight)
        fits = compiler_repeat <= ann.repeat
        if not fits:
            problems.insert(0, f"{where}: {explain_violation(weight, ann.repeat)}")
        mults = _comp_mults(shape, compiler_repeat)
        declared = _comp_mults(shape, ann.repeat)
    else:
        compiler_repeat = None
        mults = unstructured_macs(weight)
        declared = int(enc.mask.sum()) - declared_pairs
        fits = mults <= declared
        if not fits:
            problems.insert(0, f"{where}: the int8 weight needs {mults} multiplies per output "
                               f"position, the annotation promises {declared}")
    agrees = len(problems) == (0 if fits else 1)
    return LayerVerdict(fits, agrees, compiler_repeat, mults, declared, tuple(problems))
