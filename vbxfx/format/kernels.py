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

The kernels are bound by memory traffic, not by arithmetic. Repeat 2 therefore works in
steps of :data:`R2_STEP` blocks, small enough for its temporaries to stay in cache; per
step it scores the 8 candidate pairs and the 16 rows they form with broadcast ops, finds
the best split with an argmin tree, swaps each block's weights into that split's rows
(:func:`_swap`), fits the rows, and swaps the result back.
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
    """One chosen pair (repeat 1), with everything needed to apply the sign relation."""

    def __init__(self, x, y, hx=None, hy=None):
        self.x, self.y, self.hx, self.hy = x, y, hx, hy
        self.qx, self.qy = (x * x).mul_(2), (y * y).mul_(2)
        c = None
        if hx is not None:
            self.qx.mul_(hx)
            self.qy.mul_(hy)
            c = _conductance(hx, hy)
        self.drop, self.d_same, self.d_opp = _costs(x, y, self.qx, self.qy, c)

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


#: Blocks per step of project_r2: its ~40 rows of temporaries then stay in cache.
R2_STEP = 1 << 15


def _split_costs(w, h):
    """Doubled costs ``(same, opposite)`` of the 8 candidate pairs, ``[8, n]`` in _PAIRS order,
    each the cheaper of keeping both (that sign relation) and dropping the smaller."""
    def pairs(v):                       # [half, i or j, n] -> x, y broadcast to [half, i, j, n]
        v = v.view(2, 2, 2, -1)
        return v[:, 0, :, None], v[:, 1, None, :]

    (x, y), (qx, qy) = pairs(w), pairs(_energy2(w, h))
    drop, same, opp = _costs(x, y, qx, qy, None if h is None else _conductance(*pairs(h)))
    torch.minimum(same, drop, out=same)
    torch.minimum(opp, drop, out=opp)
    return same.view(8, -1), opp.view(8, -1)


def _row_costs(es, eo, ls):
    """``[8, n]``: cost of the row of L pair ``ls[c // 4]`` and H pair ``4 + c % 4``, with its
    cheaper sign relation."""
    s = torch.add(es[ls, None], es[None, 4:])
    return torch.minimum(s, torch.add(eo[ls, None], eo[None, 4:]), out=s).view(8, -1)


def _best_split(w, h):
    """``[3, n]`` bits (t1, t2, t3) of the cheapest split c = 4*t1 + 2*t2 + t3 (ties: the
    lowest c). Split c puts pairs t1 and 4 + c%4 in row A, pairs 3 - t1 and 7 - c%4 in row B."""
    es, eo = _split_costs(w, h)
    tot = _row_costs(es, eo, slice(0, 2))                       # row A of split c
    tot.add_(_row_costs(es, eo, slice(2, 4)).flip(0))           # row B of split c: row 7 - c
    # argmin as a tree of "1.0 where the right one is strictly lower"
    b3, v1 = _lt(tot[1::2], tot[0::2]), torch.minimum(tot[0::2], tot[1::2])
    b2, v2 = _lt(v1[1::2], v1[0::2]), torch.minimum(v1[0::2], v1[1::2])
    t = torch.empty_like(w[:3])
    torch.lt(v2[1], v2[0], out=t[0])
    torch.lerp(b2[0], b2[1], t[0], out=t[1])                    # bits: lerp by 0 or 1 is exact
    torch.lerp(*torch.lerp(b3[0::2], b3[1::2], t[1]), t[0], out=t[2])
    return t


def _swap(v, t, nt, out=None):
    """``[8, n]`` v with rows 2k and 2k+1 swapped where bit ``t[k-1]`` is 1 (k = 1, 2, 3;
    ``nt = 1 - t``), selecting as _sel does.

    For the best split's bits this rearranges a block into the pairs of its rows A and B,
    ``[half, x or y, row]``: (A_L x, B_L x, A_L y, B_L y, A_H x, B_H x, A_H y, B_H y); the
    same swap puts them back.
    """
    out = torch.empty_like(v) if out is None else out
    out[:2].copy_(v[:2])
    a, o = v[2:].view(3, 2, -1), out[2:].view(3, 2, -1)
    torch.mul(a, nt.unsqueeze(1), out=o)
    o[:, 0].addcmul_(a[:, 1], t)
    o[:, 1].addcmul_(a[:, 0], t)
    return out


def _drops(p, hp):
    """For the pairs of a rearranged block ``p`` (see _swap), ``[half, row, n]``: the cost of
    dropping the smaller, 1.0 where x is the one to keep, and with importance the pairs'
    importances and conductance."""
    if hp is None:                    # exact magnitudes: no tie from squares that underflow
        a = p.abs().view(2, 2, 2, -1)
        keep_x = torch.ge(a[:, 0], a[:, 1], out=torch.empty_like(a[:, 0]))
        drop = torch.minimum(a[:, 0], a[:, 1])        # 2*min(x², y²), exactly
        return drop.mul_(drop).mul_(2), keep_x, None, None, None
    q = _energy2(p, hp).view(2, 2, 2, -1)
    hx, hy = hp.view(2, 2, 2, -1).unbind(1)
    keep_x = torch.ge(q[:, 0], q[:, 1], out=torch.empty_like(q[:, 0]))
    return torch.minimum(q[:, 0], q[:, 1]), keep_x, hx, hy, _conductance(hx, hy)


def _fit_rows(p, hp):
    """Fit a rearranged block ``p`` (see _swap) in place: per row the cheaper sign relation,
    per pair the common magnitude or the larger weight alone."""
    v = p.view(2, 2, 2, -1)
    x, y = v[:, 0], v[:, 1]                               # [half, row, n]
    drop, keep_x, hx, hy, c = _drops(p, hp)
    d_same, d_opp = (x - y).square_(), (x + y).square_()
    if c is not None:
        d_same.mul_(c)
        d_opp.mul_(c)
    e = torch.minimum(d_same, drop)
    same = e[0] + e[1]                                    # [row, n]: L pair + H pair
    torch.minimum(d_opp, drop, out=e)
    opp = _lt(torch.add(e[0], e[1], out=e[0]), same)
    nopp = _not(opp)
    sgn = torch.sub(nopp, opp, out=same)
    d = d_same.mul_(nopp).addcmul_(d_opp, opp)            # the relation's cost, as _sel
    avg = torch.lt(d, drop, out=drop)
    navg = _not(avg)
    kx = keep_x.mul_(navg)
    ky = navg.sub_(kx)
    if hp is None:       # least-squares common magnitude: the plain mean
        m = torch.addcmul(x, y, sgn, out=d_opp).mul_(0.5)
    else:                # importance-weighted mean
        m = torch.mul(y, sgn, out=d_opp).mul_(hy).add_(x * hx).div_(hx + hy)
    ma = m.mul_(avg)
    torch.addcmul(ma, x, kx, out=x)
    torch.addcmul(ma.mul_(sgn), y, ky, out=y)
    return p


def project_r2(w, h=None):
    """Exact projection of ``[8, n]`` blocks onto repeat 2 (``h``: importance, same shape)."""
    out = torch.empty_like(w)
    for s in range(0, w.shape[1], R2_STEP):
        ws, hs = w[:, s:s + R2_STEP], None if h is None else h[:, s:s + R2_STEP]
        t = _best_split(ws, hs)
        nt = _not(t)
        fit = _fit_rows(_swap(ws, t, nt), None if hs is None else _swap(hs, t, nt))
        _swap(fit, t, nt, out=out[:, s:s + R2_STEP])
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
