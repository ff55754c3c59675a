"""Exact multiple-choice knapsack (covering form) for the per-layer allocation.

Problem: ``n`` groups (layers), each with a few options (levels). Option ``j`` of group ``i``
costs ``costs[i][j]`` (a float: the accuracy cost, a sensitivity) and removes
``weights[i][j]`` (a non-negative int: MACs or parameters removed). Pick exactly one option
per group so that the removed total is at least ``demand`` and the total cost is least::

    min  sum_i costs[i][c_i]   s.t.  sum_i weights[i][c_i] >= demand

:func:`solve_mckp` solves it by dynamic programming over Pareto frontiers (Nemhauser-Ullmann)
on the exact integer weights, with two safe prunings:

- *reachability*: a partial choice that cannot reach ``demand`` even with the largest
  option of every remaining group is dropped;
- *bounding*: a partial choice whose cost plus the LP-relaxation bound of the remaining
  groups (a convex piecewise-linear function of the removal still needed, from the lower
  convex hull of each group's options) exceeds the cost of a known feasible solution
  (the rounded-up LP solution) is dropped.

Removal beyond ``demand`` is worth nothing, so removals are clamped at ``demand``; two
partial choices with the same clamped removal keep the cheaper one, and one that removes
less at a higher cost is dropped (dominance). None of this can drop an optimal solution, so
the result is **exact** as long as every frontier stays below ``max_states``. If one grows
beyond it, the states with the worst bound are dropped, and the least bound among the
dropped ones is kept as a certificate: the returned ``lower_bound`` is then
``min(cost found, least dropped bound)``, a proven lower bound on the optimum, and
``gap = cost - lower_bound`` bounds how far the answer can be from optimal.

>>> r = solve_mckp([[0.0, 1.0, 5.0], [0.0, 2.0, 3.0]], [[0, 50, 75], [0, 50, 75]], 100)
>>> r.choice, r.cost, r.removed, r.exact
((1, 1), 3.0, 100, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vbxfx.errors import ConfigError

__all__ = ["KnapsackResult", "solve_mckp", "lp_bound"]

logger = logging.getLogger(__name__)

_REL_TOL = 1e-9


@dataclass(frozen=True)
class KnapsackResult:
    """The chosen option per group, its cost and removal, and the optimality certificate."""

    choice: tuple[int, ...]
    cost: float
    removed: int
    demand: int
    #: A proven lower bound on the optimal cost (equal to ``cost`` when ``exact``).
    lower_bound: float
    exact: bool
    #: Largest Pareto frontier the DP held (a measure of the work done).
    max_frontier: int

    @property
    def gap(self) -> float:
        """``cost - lower_bound``: 0 when exact, otherwise a proven bound on the suboptimality."""
        return self.cost - self.lower_bound


def _check(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]],
           demand: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    if len(costs) != len(weights):
        raise ConfigError(f"costs has {len(costs)} groups but weights has {len(weights)}")
    cs, ws = [], []
    for i, (c, w) in enumerate(zip(costs, weights)):
        if len(c) != len(w) or len(c) == 0:
            raise ConfigError(f"group {i}: {len(c)} costs and {len(w)} weights; each group "
                              "needs the same positive number of both")
        c_arr = np.asarray(c, dtype=np.float64)
        if not np.isfinite(c_arr).all():
            raise ConfigError(f"group {i}: costs must be finite, got {list(c)}")
        if any(isinstance(x, bool) or int(x) != x or x < 0 for x in w):
            raise ConfigError(f"group {i}: weights must be non-negative integers, got {list(w)}")
        cs.append(c_arr)
        ws.append(np.asarray([int(x) for x in w], dtype=np.int64))
    if isinstance(demand, bool) or int(demand) != demand:
        raise ConfigError(f"demand must be an integer, got {demand!r}")
    return cs, ws, int(demand)


Segment = tuple[float, int, float]  # (slope, removal step, cost step)


def _hull_segments(c: np.ndarray, w: np.ndarray) -> tuple[float, int, list[Segment]]:
    """Start point (least cost, most removal among those) and the lower-hull steps to the right.

    Returns ``(cost0, weight0, [(slope, dweight, dcost), ...])`` with increasing slopes.
    """
    order = np.lexsort((-w, c))
    c0, w0 = float(c[order[0]]), int(w[order[0]])
    pts = sorted({(int(wj), float(cj)) for wj, cj in zip(w, c) if wj > w0})
    hull: list[tuple[int, float]] = [(w0, c0)]
    for p in pts:
        # keep the hull convex (slopes increasing); drop points above the chord
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        if p[0] > hull[-1][0]:
            hull.append(p)
    segs = []
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        segs.append(((y2 - y1) / (x2 - x1), x2 - x1, y2 - y1))
    return c0, w0, segs


class _Bound:
    """LP-relaxation lower bound of a set of groups as a function of the removal needed."""

    def __init__(self, groups: list[tuple[float, int, list[tuple[float, int, float]]]]):
        self.base_cost = sum(g[0] for g in groups)
        self.base_weight = sum(g[1] for g in groups)
        segs = sorted((s for g in groups for s in g[2]), key=lambda s: s[0])
        xs, ys = [0], [0.0]
        for _, dw, dc in segs:
            xs.append(xs[-1] + dw)
            ys.append(ys[-1] + dc)
        self.xs = np.asarray(xs, dtype=np.float64)
        self.ys = np.asarray(ys, dtype=np.float64)
        self.max_weight = self.base_weight + xs[-1]

    def __call__(self, need: np.ndarray) -> np.ndarray:
        """Least LP cost of removing at least ``need`` (inf where impossible)."""
        extra = np.maximum(np.asarray(need, dtype=np.float64) - self.base_weight, 0.0)
        out = self.base_cost + np.interp(extra, self.xs, self.ys)
        return np.where(extra > self.xs[-1], np.inf, out)


def lp_bound(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]],
             demand: int) -> float:
    """The LP-relaxation lower bound of the whole problem (inf when infeasible).

    >>> lp_bound([[0.0, 1.0], [0.0, 3.0]], [[0, 10], [0, 10]], 15)
    2.5
    """
    cs, ws, demand = _check(costs, weights, demand)
    return float(_Bound([_hull_segments(c, w) for c, w in zip(cs, ws)])(np.asarray([demand]))[0])


def _rounded_lp(hulls: list, demand: int) -> float:
    """Cost of a feasible solution: the LP solution with its fractional group rounded up."""
    cost = sum(h[0] for h in hulls)
    removed = sum(h[1] for h in hulls)
    if removed >= demand:
        return cost
    for _, dw, dc in sorted((s for h in hulls for s in h[2]), key=lambda s: s[0]):
        cost += dc
        removed += dw
        if removed >= demand:
            return cost
    return math.inf


def solve_mckp(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]],
               demand: int, *, max_states: int = 200_000) -> KnapsackResult:
    """Pick one option per group: least total cost with total weight >= ``demand``.

    Exact unless a Pareto frontier exceeds ``max_states`` (then ``exact`` is False and
    ``gap`` is a proven bound on the distance to the optimum). Ties between equally good
    choices are broken deterministically.

    Raises:
        ConfigError: mismatched or non-finite input, or ``demand`` larger than the most
            the options can remove (the message says that maximum).
    """
    cs, ws, demand = _check(costs, weights, demand)
    n = len(cs)
    max_total = int(sum(int(w.max()) for w in ws))
    if demand > max_total:
        raise ConfigError(f"demand {demand} is more than the {max_total} the options can remove")
    demand = max(demand, 0)
    hulls = [_hull_segments(c, w) for c, w in zip(cs, ws)]
    bounds = [_Bound(hulls[k:]) for k in range(n + 1)]  # bounds[k]: groups k..n-1
    upper = _rounded_lp(hulls, demand)
    slack = _REL_TOL * (abs(upper) + 1.0)

    b = np.zeros(1, dtype=np.int64)   # clamped removal of each state
    s = np.zeros(1, dtype=np.float64)  # cost of each state
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    dropped_bound = math.inf
    biggest = 1
    for k in range(n):
        nopt = len(cs[k])
        nb = np.minimum(b[:, None] + ws[k][None, :], demand).ravel()
        ns = (s[:, None] + cs[k][None, :]).ravel()
        parent = np.repeat(np.arange(b.size), nopt)
        option = np.tile(np.arange(nopt), b.size)
        bound = ns + bounds[k + 1](demand - nb)
        keep = bound <= upper + slack          # also drops the unreachable (bound = inf)
        nb, ns, parent, option, bound = nb[keep], ns[keep], parent[keep], option[keep], bound[keep]
        # Pareto filter: by removal descending, cost ascending, stable for determinism;
        # keep a state only if it is strictly cheaper than every state removing more.
        order = np.lexsort((option, parent, ns, -nb))
        nb, ns, parent, option, bound = (nb[order], ns[order], parent[order], option[order],
                                         bound[order])
        if ns.size:
            prev_min = np.minimum.accumulate(np.concatenate(([np.inf], ns[:-1])))
            front = ns < prev_min
            nb, ns, parent, option, bound = (nb[front], ns[front], parent[front], option[front],
                                             bound[front])
        if ns.size > max_states:
            cut = np.argsort(bound, kind="stable")
            dropped_bound = min(dropped_bound, float(bound[cut[max_states:]].min()))
            sel = np.sort(cut[:max_states])
            nb, ns, parent, option = nb[sel], ns[sel], parent[sel], option[sel]
            logger.debug("knapsack: frontier of group %d cut to %d states", k, max_states)
        if ns.size == 0:  # only possible through float slack; cannot happen with exact ties
            raise ConfigError("knapsack: no feasible choice survived pruning (numerical issue)")
        biggest = max(biggest, int(ns.size))
        parents.append(parent)
        options.append(option)
        b, s = nb, ns

    best = int(np.argmin(np.where(b >= demand, s, np.inf)))
    choice = [0] * n
    idx = best
    for k in range(n - 1, -1, -1):
        choice[k] = int(options[k][idx])
        idx = int(parents[k][idx])
    cost = float(sum(cs[k][choice[k]] for k in range(n)))
    removed = int(sum(int(ws[k][choice[k]]) for k in range(n)))
    lower = min(cost, dropped_bound)
    exact = dropped_bound >= cost
    return KnapsackResult(choice=tuple(choice), cost=cost, removed=removed, demand=demand,
                          lower_bound=lower if not exact else cost, exact=exact,
                          max_frontier=biggest)
