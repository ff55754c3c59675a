"""The structured ("comp") format on 8-weight blocks: projection dispatch and exact fit checks.

Every function here works on blocks laid out ``[8, n]`` (one column per block, see
:mod:`vbxfx.format.layout`), in float32, vectorised over blocks.

The projection kernels themselves (exact search over splits, sign relations and
pair-or-drop choices) are in :mod:`vbxfx.format.kernels`; this module chunks the work,
rescales blocks, and checks fits exactly on given values.
"""

from __future__ import annotations

import torch

from vbxfx.format.kernels import magnitude, project_r1, project_r2

__all__ = ["project_blocks", "fits_blocks", "explain_block"]

_PAIR_I = (0, 0, 1, 1, 4, 4, 5, 5)
_PAIR_J = (2, 3, 2, 3, 6, 7, 6, 7)
# Repeat 2 splits, combo c = 4*t1 + 2*t2 + t3: row A = (b0, b2+t1, b4+t2, b6+t3), row B the
# complement. Pair indices into the 8 candidate pairs above.
_A_L = tuple(c // 4 for c in range(8))
_A_H = tuple(4 + c % 4 for c in range(8))
_B_L = tuple(3 - c // 4 for c in range(8))
_B_H = tuple(4 + 3 - c % 4 for c in range(8))
_IDX = {name: torch.tensor(v) for name, v in dict(
    pi=_PAIR_I, pj=_PAIR_J, al=_A_L, ah=_A_H, bl=_B_L, bh=_B_H).items()}

#: Blocks per kernel call: large enough to amortise dispatch, small enough for cache.
CHUNK = 1 << 17


def project_blocks(w: torch.Tensor, repeat: int, pairing: bool = True,
                   chunk: int = CHUNK, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Project ``[8, n]`` float32 blocks onto ``repeat`` (1, 2; 4 returns a copy).

    With ``pairing=False`` this is plain magnitude N:4 pruning (the baseline).
    ``importance`` (``[8, n]``, positive) weights the squared error of each weight.
    """
    if repeat == 4:
        return w.clone()
    if not pairing:
        fn = lambda x, h: magnitude(x, repeat, h)  # noqa: E731
    else:
        fn = _rescaled(project_r2 if repeat == 2 else project_r1)
    n = w.shape[1]
    if n <= chunk:
        return fn(w.contiguous(), None if importance is None else importance.contiguous())
    out = torch.empty_like(w)
    for start in range(0, n, chunk):
        h = None if importance is None else importance[:, start:start + chunk].contiguous()
        out[:, start:start + chunk] = fn(w[:, start:start + chunk].contiguous(), h)
    return out


def _rescaled(fn):
    """Wrap a kernel: scale every block by a power of two so its largest magnitude is in
    [1, 2), project, scale back. Exact, and it keeps the squared costs of tiny weights (down
    to float32's smallest normal) from underflowing to zero, where every choice would tie.
    Within one block, weights below about 2**-60 of its largest still count as ties."""

    def run(w: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        top = torch.maximum(w.amax(0), w.amin(0).neg_())         # largest magnitude
        exponent = torch.frexp(top).exponent.clamp_(-120, 120)
        return fn(w * _pow2(exponent.neg()), h).mul_(_pow2(exponent))

    return run


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0**e`` in float32, exactly, for int32 ``e`` in [-126, 127]: its bit pattern."""
    return e.add(127).bitwise_left_shift_(23).view(torch.float32)


# ---------------------------------------------------------------- fit checks (exact values)

def _pair_ok(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per candidate pair: both nonzero (full), equal magnitude where full, relation."""
    wi = w.index_select(0, _IDX["pi"])
    wj = w.index_select(0, _IDX["pj"])
    full = (wi != 0) & (wj != 0)
    ok = ~full | (wi.abs() == wj.abs())
    opposite = (wi < 0) != (wj < 0)
    return full, ok, opposite


def _rows_ok(full, ok, opp, l_idx, h_idx) -> torch.Tensor:
    fl, fh = full.index_select(0, _IDX[l_idx]), full.index_select(0, _IDX[h_idx])
    same_rel = opp.index_select(0, _IDX[l_idx]) == opp.index_select(0, _IDX[h_idx])
    return (ok.index_select(0, _IDX[l_idx]) & ok.index_select(0, _IDX[h_idx])
            & (~fl | ~fh | same_rel))


def fits_blocks(w: torch.Tensor, repeat: int) -> torch.Tensor:
    """Whether each ``[8, n]`` block fits ``repeat`` exactly (``[n]`` bool)."""
    n = w.shape[1]
    if repeat == 4:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    full, ok, opp = _pair_ok(w)
    if repeat == 2:
        a = _rows_ok(full, ok, opp, "al", "ah")
        b = _rows_ok(full, ok, opp, "bl", "bh")
        return (a & b).any(dim=0)
    nz = (w != 0).view(4, 2, -1)
    single = ~(nz[:, 0] & nz[:, 1]).any(dim=0)
    # with at most one nonzero per sub-pair, the pair of a half is (P0 sum, P1 sum)
    s = w.view(4, 2, -1).sum(1)                       # [4, n]: P0..P3 nonzero value
    half_full = (s[0::2] != 0) & (s[1::2] != 0)       # [2, n]: L, H
    half_ok = ~half_full | (s[0::2].abs() == s[1::2].abs())
    half_opp = (s[0::2] < 0) != (s[1::2] < 0)
    rel_ok = ~(half_full[0] & half_full[1]) | (half_opp[0] == half_opp[1])
    return single & half_ok.all(0) & rel_ok


def _rel(x: float, y: float) -> str:
    return "same" if (x < 0) == (y < 0) else "opposite"


def explain_block(block: list[float], repeat: int) -> str | None:
    """Which rule a single block of 8 values breaks at ``repeat``, in words (None: it fits)."""
    b = [float(x) for x in block]
    if repeat == 4:
        return None
    if repeat == 1:
        for k in range(4):
            if b[2 * k] != 0 and b[2 * k + 1] != 0:
                return (f"sub-pair P{k}=(b{2 * k},b{2 * k + 1}) holds two nonzeros "
                        f"({b[2 * k]:g}, {b[2 * k + 1]:g}); repeat 1 allows one")
        halves = []
        for name, base in (("L", 0), ("H", 4)):
            x, y = b[base] + b[base + 1], b[base + 2] + b[base + 3]
            if x != 0 and y != 0:
                if abs(x) != abs(y):
                    return f"{name} pair ({x:g}, {y:g}) has unequal magnitudes"
                halves.append((name, _rel(x, y)))
        if len(halves) == 2 and halves[0][1] != halves[1][1]:
            return (f"L pair is {halves[0][1]} and H pair is {halves[1][1]}; "
                    "repeat 1 needs one sign relation")
        return None
    w = torch.tensor(b, dtype=torch.float64).view(8, 1)
    if bool(fits_blocks(w, 2)[0]):
        return None
    nz = sum(1 for x in b if x != 0)
    return (f"no split of the block into rows A and B gives every row equal-magnitude pairs "
            f"with one sign relation ({nz} nonzeros; at most 4 unpaired weights, or pairs of "
            "equal magnitude, fit repeat 2)")
