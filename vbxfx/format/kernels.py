"""Exact projection kernels of the structured format on ``[8, n]`` float32 blocks.

One column is one block of 8 weights ``b0..b7``. The kernels score every candidate and
then rebuild the winner, so the result is the exact least-squares projection:

* repeat 2: 8 splits of the block into rows A and B, a sign relation per row, and for
  each of the row's two pairs either "keep both with one common magnitude" (the least
  squares value ``(x + s*y)/2``) or "keep the larger, drop the smaller";
* repeat 1: one pair per half (4 choices each), one sign relation for the block, the two
  weights outside the pair dropped.

All costs are doubled squared errors. Selections use float masks and exact arithmetic
(``a*m + b*(1-m)`` with ``m`` in {0, 1}) because on CPU ``torch.where`` and comparisons
with a bool result are several times slower than plain arithmetic; the values selected
are bit-identical to the inputs, so equal magnitudes stay exactly equal.
"""

from __future__ import annotations

import torch

__all__ = ["project_r1", "project_r2", "magnitude"]

_PAIRS = ((0, 2), (0, 3), (1, 2), (1, 3), (4, 6), (4, 7), (5, 6), (5, 7))
_OTHERS = ((1, 3), (1, 2), (0, 3), (0, 2), (5, 7), (5, 6), (4, 7), (4, 6))


def _lt(a, b):
    """1.0 where a < b else 0.0 (float mask; much faster than a bool result on CPU)."""
    return torch.lt(a, b, out=torch.empty_like(a))


def _not(m):
    return torch.rsub(m, 1.0)


def _sel(m, nm, a, b, out=None):
    """``a`` where m == 1 else ``b``, exactly (finite values, m in {0, 1}, nm = 1 - m)."""
    return torch.addcmul(b * nm, a, m, out=out) if out is not None else torch.addcmul(b * nm, a, m)


def _conductance(hx, hy):
    """``2*hx*hy/(hx+hy)``: doubled cost per squared gap of tying two weighted weights."""
    return (hx * hy).mul_(2).div_(hx + hy)


def _costs(x, y, qx2, qy2, c=None):
    """Doubled costs of a pair: (drop the smaller, keep with same sign, keep opposite).

    ``qx2 = 2*hx*x²``; ``c`` is the pair's conductance (None: unit importance, c = 1).
    """
    drop = torch.minimum(qx2, qy2)
    same, opp = (x - y).square_(), (x + y).square_()
    if c is not None:
        same.mul_(c)
        opp.mul_(c)
    return drop, same, opp


class _Pair:
    """One chosen pair of one row, with everything needed to apply the row's relation."""

    def __init__(self, x, y, hx=None, hy=None):
        self.x, self.y, self.hx, self.hy = x, y, hx, hy
        self.qx, self.qy = (x * x).mul_(2), (y * y).mul_(2)
        c = None
        if hx is not None:
            self.qx.mul_(hx)
            self.qy.mul_(hy)
            c = _conductance(hx, hy)
        self.drop, self.d_same, self.d_opp = _costs(x, y, self.qx, self.qy, c)

    def cost(self, opp):
        return torch.minimum(self.d_opp if opp else self.d_same, self.drop)

    def apply(self, opp, nopp, sgn):
        d = _sel(opp, nopp, self.d_opp, self.d_same)
        avg = _lt(d, self.drop)
        navg = _not(avg)
        if self.hx is None:      # exact magnitudes: no tie from squares that underflow
            kx = torch.ge(self.x.abs(), self.y.abs(), out=torch.empty_like(d)).mul_(navg)
        else:
            kx = torch.ge(self.qx, self.qy, out=torch.empty_like(d)).mul_(navg)
        ky = navg.sub_(kx)
        if self.hx is None:      # least-squares common magnitude: the plain mean
            m = (self.y * sgn).add_(self.x).mul_(0.5)
        else:                    # importance-weighted mean
            m = (self.y * sgn).mul_(self.hy).add_(self.x * self.hx).div_(self.hx + self.hy)
        ma = m.mul_(avg)
        xo = torch.addcmul(ma, self.x, kx)
        yo = torch.addcmul(ma * sgn, self.y, ky)
        return xo, yo


def _row(pl, ph):
    same = pl.cost(False).add_(ph.cost(False))
    opp = _lt(pl.cost(True).add_(ph.cost(True)), same)
    nopp = _not(opp)
    sgn = (opp * -2).add_(1)
    return pl.apply(opp, nopp, sgn), ph.apply(opp, nopp, sgn)


def _pair_costs_all(w, q2, h=None):
    e_same, e_opp = [], []
    for i, j in _PAIRS:
        c = None if h is None else _conductance(h[i], h[j])
        drop, ds, do = _costs(w[i], w[j], q2[i], q2[j], c)
        e_same.append(torch.minimum(ds, drop, out=ds))
        e_opp.append(torch.minimum(do, drop, out=do))
    return e_same, e_opp


def _energy2(w, h):
    q2 = (w * w).mul_(2)
    return q2 if h is None else q2.mul_(h)


def _argmin2(a, b):
    """(1.0 where b < a, min) — ties keep the first."""
    return _lt(b, a), torch.minimum(a, b)


def project_r2(w, h=None):
    """Exact projection of ``[8, n]`` blocks onto repeat 2 (``h``: importance, same shape)."""
    q2 = _energy2(w, h)
    e_s, e_o = _pair_costs_all(w, q2, h)
    tot = []
    for c in range(8):
        t1, th = c // 4, c % 4
        a = torch.minimum(e_s[t1] + e_s[4 + th], e_o[t1] + e_o[4 + th])
        b = torch.minimum(e_s[3 - t1] + e_s[7 - th], e_o[3 - t1] + e_o[7 - th])
        tot.append(a.add_(b))
    b3, v1 = zip(*(_argmin2(tot[2 * k], tot[2 * k + 1]) for k in range(4)))
    b2, v2 = zip(*(_argmin2(v1[2 * k], v1[2 * k + 1]) for k in range(2)))
    t1, _ = _argmin2(v2[0], v2[1])
    nt1 = _not(t1)
    t2 = _sel(t1, nt1, b2[1], b2[0])
    nt2 = _not(t2)
    t3 = _sel(t1, nt1, _sel(t2, nt2, b3[3], b3[2]), _sel(t2, nt2, b3[1], b3[0]))
    nt3 = _not(t3)

    def pairs(v):
        """Row A's and row B's (L, H) pairs of ``v`` (weights or importances) for the split."""
        if v is None:
            return (None,) * 8
        return (v[0], _sel(t1, nt1, v[3], v[2]), _sel(t2, nt2, v[5], v[4]), _sel(t3, nt3, v[7], v[6]),
                v[1], _sel(t1, nt1, v[2], v[3]), _sel(t2, nt2, v[4], v[5]), _sel(t3, nt3, v[6], v[7]))

    x, hh = pairs(w), pairs(h)
    row_a = _row(_Pair(x[0], x[1], hh[0], hh[1]), _Pair(x[2], x[3], hh[2], hh[3]))
    row_b = _row(_Pair(x[4], x[5], hh[4], hh[5]), _Pair(x[6], x[7], hh[6], hh[7]))
    (al, ah), (bl, bh) = row_a, row_b
    out = torch.empty_like(w)
    out[0].copy_(al[0])
    out[1].copy_(bl[0])
    _sel(t1, nt1, bl[1], al[1], out=out[2])
    _sel(t1, nt1, al[1], bl[1], out=out[3])
    _sel(t2, nt2, bh[0], ah[0], out=out[4])
    _sel(t2, nt2, ah[0], bh[0], out=out[5])
    _sel(t3, nt3, bh[1], ah[1], out=out[6])
    _sel(t3, nt3, ah[1], bh[1], out=out[7])
    return out


def _argmin4(x):
    """Over 4 pair candidates p = 2i + j: (i bit, j bit, min value)."""
    bj0, v0 = _argmin2(x[0], x[1])
    bj1, v1 = _argmin2(x[2], x[3])
    bi, v = _argmin2(v0, v1)
    return bi, _sel(bi, _not(bi), bj1, bj0), v


def project_r1(w, h=None):
    """Exact projection of ``[8, n]`` blocks onto repeat 1 (``h``: importance, same shape)."""
    q2 = _energy2(w, h)
    e_s, e_o = _pair_costs_all(w, q2, h)
    others = [q2[a] + q2[b] for a, b in _OTHERS]
    best = {}
    for opp, e in ((0, e_s), (1, e_o)):
        for half in (0, 1):
            best[opp, half] = _argmin4([e[4 * half + p].add_(others[4 * half + p]) for p in range(4)])
    opp = _lt(best[1, 0][2] + best[1, 1][2], best[0, 0][2] + best[0, 1][2])
    nopp = _not(opp)
    sgn = (opp * -2).add_(1)
    out = torch.empty_like(w)
    for half in (0, 1):
        i = _sel(opp, nopp, best[1, half][0], best[0, half][0])
        j = _sel(opp, nopp, best[1, half][1], best[0, half][1])
        ni, nj = _not(i), _not(j)
        k = 4 * half
        hx = hy = None
        if h is not None:
            hx, hy = _sel(i, ni, h[k + 1], h[k]), _sel(j, nj, h[k + 3], h[k + 2])
        pair = _Pair(_sel(i, ni, w[k + 1], w[k]), _sel(j, nj, w[k + 3], w[k + 2]), hx, hy)
        xo, yo = pair.apply(opp, nopp, sgn)
        torch.mul(xo, ni, out=out[k]); torch.mul(xo, i, out=out[k + 1])
        torch.mul(yo, nj, out=out[k + 2]); torch.mul(yo, j, out=out[k + 3])
    return out


def magnitude(w, repeat, h=None):
    """Keep the ``repeat`` largest of each 4 consecutive weights (ties: lower index);
    with importance ``h`` the largest ``h*w²`` (Wanda-style score)."""
    mag = w.abs() if h is None else (w * w).mul_(h)
    out = torch.empty_like(w)
    for g in (0, 4):
        rank = [torch.zeros_like(w[0]) for _ in range(4)]
        for a in range(4):
            for b in range(a + 1, 4):
                beats = _lt(mag[g + a], mag[g + b])      # b strictly larger: b beats a
                rank[a].add_(beats)
                rank[b].add_(_not(beats))
        for a in range(4):
            torch.mul(w[g + a], _lt(rank[a], torch.full_like(rank[a], repeat)), out=out[g + a])
    return out
