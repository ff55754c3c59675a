"""Slow reference implementations written straight from docs/format.md.

Deliberately independent of vbxfx.format: plain Python loops over one block, and a brute
force optimum that enumerates every possible structure of a block (which weights are zero,
kept alone, or tied in pairs with a sign relation), keeps the feasible ones (checked with
the reference checker on a generic representative) and projects onto each.
"""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np


def _rel(x: float, y: float) -> str:
    return "same" if (x > 0) == (y > 0) else "opposite"


def _pair_ok(x: float, y: float) -> tuple[bool, str | None]:
    """(rule holds, relation if it is a full pair)."""
    if x != 0 and y != 0:
        return abs(x) == abs(y), _rel(x, y)
    return True, None


def fits_r1(b) -> bool:
    b = [float(v) for v in b]
    for k in range(4):
        if b[2 * k] != 0 and b[2 * k + 1] != 0:
            return False
    rels = []
    for base in (0, 4):
        x = b[base] if b[base] != 0 else b[base + 1]
        y = b[base + 2] if b[base + 2] != 0 else b[base + 3]
        ok, rel = _pair_ok(x, y)
        if not ok:
            return False
        if rel:
            rels.append(rel)
    return len(rels) < 2 or rels[0] == rels[1]


def fits_r2(b) -> bool:
    b = [float(v) for v in b]
    for t1, t2, t3 in itertools.product((0, 1), repeat=3):
        row_a = (0, 2 + t1, 4 + t2, 6 + t3)
        row_b = (1, 3 - t1, 5 - t2, 7 - t3)
        good = True
        for row in (row_a, row_b):
            ok_l, rel_l = _pair_ok(b[row[0]], b[row[1]])
            ok_h, rel_h = _pair_ok(b[row[2]], b[row[3]])
            if not (ok_l and ok_h) or (rel_l and rel_h and rel_l != rel_h):
                good = False
                break
        if good:
            return True
    return False


def fits(b, repeat: int) -> bool:
    return True if repeat == 4 else (fits_r1(b) if repeat == 1 else fits_r2(b))


def _structures(n: int = 8):
    """Every assignment of positions to: zero, single, or a pair (i, j, sign)."""
    def rec(k, used, singles, pairs):
        while k < n and k in used:
            k += 1
        if k == n:
            yield tuple(singles), tuple(pairs)
            return
        yield from rec(k + 1, used | {k}, singles, pairs)            # zero
        yield from rec(k + 1, used | {k}, singles + [k], pairs)      # single
        for j in range(k + 1, n):
            if j not in used:
                for s in (1, -1):
                    yield from rec(k + 1, used | {k, j}, singles, pairs + [(k, j, s)])
    yield from rec(0, frozenset(), [], [])


@functools.lru_cache(maxsize=None)
def feasible_structures(repeat: int):
    """The structures whose generic representative fits ``repeat``."""
    rng = random.Random(1234)
    out = []
    for singles, pairs in _structures():
        b = [0.0] * 8
        for k in singles:
            b[k] = rng.uniform(1, 2) * rng.choice((1, -1))
        for i, j, s in pairs:
            b[i] = rng.uniform(1, 2) * rng.choice((1, -1))
            b[j] = s * b[i]
        if fits(b, repeat):
            out.append((singles, pairs))
    return out


def brute_force_error(block, repeat: int, importance=None) -> float:
    """Least (importance-weighted) squared error over all feasible structures: the optimum.

    A tied pair (i, j, s) is best at the weighted mean magnitude and then costs
    ``h_i h_j (w_i - s w_j)^2 / (h_i + h_j)``.
    """
    w = np.asarray(block, dtype=np.float64)
    h = np.ones(8) if importance is None else np.asarray(importance, dtype=np.float64)
    best = np.inf
    q = h * w * w
    total = q.sum()
    for singles, pairs in feasible_structures(repeat):
        kept = sum(q[k] for k in singles)
        for i, j, s in pairs:
            kept += q[i] + q[j] - h[i] * h[j] * (w[i] - s * w[j]) ** 2 / (h[i] + h[j])
        best = min(best, total - kept)
    return float(best)
