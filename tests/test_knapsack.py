"""The multiple-choice knapsack solver against brute force."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vbxfx.errors import ConfigError
from vbxfx.allocation.knapsack import lp_bound, solve_mckp


def brute_force(costs, weights, demand):
    best = math.inf
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        w = sum(weights[i][j] for i, j in enumerate(choice))
        if w >= demand:
            best = min(best, sum(costs[i][j] for i, j in enumerate(choice)))
    return best


@st.composite
def instances(draw, max_groups=6, max_options=4):
    n = draw(st.integers(1, max_groups))
    costs, weights = [], []
    for _ in range(n):
        k = draw(st.integers(1, max_options))
        costs.append(draw(st.lists(st.floats(-2.0, 10.0, allow_nan=False), min_size=k, max_size=k)))
        # small integer weights make many ties, large ones many distinct sums
        hi = draw(st.sampled_from([3, 20, 10**9]))
        weights.append(draw(st.lists(st.integers(0, hi), min_size=k, max_size=k)))
    total = sum(max(w) for w in weights)
    demand = draw(st.integers(-1, total))
    return costs, weights, demand


@settings(max_examples=300, deadline=None)
@given(instances())
def test_matches_brute_force(inst):
    costs, weights, demand = inst
    r = solve_mckp(costs, weights, demand)
    opt = brute_force(costs, weights, demand)
    assert r.exact and r.gap == 0
    assert r.removed >= demand
    assert r.removed == sum(weights[i][j] for i, j in enumerate(r.choice))
    assert r.cost == pytest.approx(sum(costs[i][j] for i, j in enumerate(r.choice)))
    assert r.cost == pytest.approx(opt, abs=1e-9)
    assert lp_bound(costs, weights, demand) <= opt + 1e-9


@settings(max_examples=150, deadline=None)
@given(instances(max_groups=7, max_options=3), st.integers(1, 3))
def test_cut_frontier_gives_a_valid_certificate(inst, max_states):
    costs, weights, demand = inst
    r = solve_mckp(costs, weights, demand, max_states=max_states)
    opt = brute_force(costs, weights, demand)
    assert r.removed >= demand
    assert r.lower_bound <= opt + 1e-9 <= r.cost + 2e-9
    assert r.gap >= 0
    if r.exact:
        assert r.cost == pytest.approx(opt, abs=1e-9)


def test_two_layers_by_hand():
    # layer a is far more sensitive: it keeps the mild level, b takes the strong one
    r = solve_mckp([[1.0, 100.0], [1.0, 2.0]], [[50, 75], [50, 75]], 125)
    assert r.choice == (0, 1) and r.cost == 3.0 and r.removed == 125


def test_many_equal_groups_stay_fast():
    # 60 identical layers: ties everywhere, the frontier must stay small
    r = solve_mckp([[1.0, 3.0]] * 60, [[4_816_896, 7_225_344]] * 60, 60 * 6_000_000)
    assert r.exact and r.max_frontier < 1000
    assert sum(r.choice) == math.ceil((60 * 6_000_000 - 60 * 4_816_896) / 2_408_448)


def test_errors():
    with pytest.raises(ConfigError, match="more than the 10"):
        solve_mckp([[0.0, 1.0]], [[0, 10]], 11)
    with pytest.raises(ConfigError, match="group 0"):
        solve_mckp([[0.0]], [[0, 1]], 0)
    with pytest.raises(ConfigError, match="non-negative integers"):
        solve_mckp([[0.0, 1.0]], [[0, -1]], 0)
    with pytest.raises(ConfigError, match="finite"):
        solve_mckp([[0.0, math.nan]], [[0, 1]], 0)
