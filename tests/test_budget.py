"""Budget: limits and their window, the exact solvers (DP and integer program) against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from asga_deploy import budget as B
from asga_deploy.budget import Budget, Limit
from asga_deploy.cost import CostTable, LayerCost
from asga_deploy.errors import BudgetError
from asga_deploy.targets import get_target


def _brute(costs, values, lo, hi):
    best, arg = -np.inf, None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(int(costs[i][k]) for i, k in enumerate(combo))
        v = sum(values[i][k] for i, k in enumerate(combo))
        if lo <= c <= hi and v > best:
            best, arg = v, combo
    return arg, best


@pytest.mark.parametrize("seed", range(6))
def test_mck_solve_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(2, 5))
    costs = [rng.integers(1, 60, size=int(rng.integers(2, 6))) * 7 for _ in range(groups)]
    values = [np.log(rng.dirichlet(np.ones(len(c)))) for c in costs]
    total_max = sum(int(c.max()) for c in costs)
    hi = int(total_max * rng.uniform(0.3, 0.9))
    lo = int(hi * 0.9)
    arg, best = _brute(costs, values, lo, hi)
    sol = B.mck_solve(costs, values, lo, hi)
    if arg is None:
        assert sol is None
        return
    picks, cost, exact = sol
    assert exact and lo <= cost <= hi
    assert sum(values[i][k] for i, k in enumerate(picks)) == pytest.approx(best, abs=1e-12)


def test_coarse_grid_is_still_exactly_feasible(monkeypatch):
    monkeypatch.setattr(B, "MAX_BINS", 5)  # force the approximate grid
    rng = np.random.default_rng(1)
    costs = [rng.integers(100, 10_000, size=5) for _ in range(4)]
    values = [np.log(rng.dirichlet(np.ones(5))) for _ in range(4)]
    hi = 20_000
    lo = 19_000
    picks, cost, exact = B.mck_solve(costs, values, lo, hi)
    assert not exact
    assert cost == sum(int(costs[i][k]) for i, k in enumerate(picks)) and lo <= cost <= hi
    _, best = _brute(costs, values, lo, hi)
    assert sum(values[i][k] for i, k in enumerate(picks)) <= best + 1e-12


def _table(seed: int, layers: int = 4) -> CostTable:
    rng = np.random.default_rng(seed)
    costs = {f"l{i}": LayerCost(f"l{i}", "conv", int(rng.integers(1_000, 50_000)), int(rng.integers(100, 5_000)),
                                False) for i in range(layers)}
    return CostTable(costs, tuple(costs))


@pytest.mark.parametrize("seed", range(5))
def test_two_limits_integer_program_equals_brute_force(seed):
    table = _table(seed)
    rng = np.random.default_rng(100 + seed)
    options = {n: [(w, a) for w in (2, 4, 8) for a in (2, 4, 8)] for n in table.counted}
    values = {n: list(np.log(rng.dirichlet(np.ones(9)))) for n in table.counted}
    budget = Budget((Limit("bitops", float(rng.uniform(0.1, 0.5))), Limit("size", float(rng.uniform(0.3, 0.7)))))
    best, arg = -np.inf, None
    names = list(options)
    for combo in itertools.product(*[range(9)] * len(names)):
        choice = {n: options[n][k] for n, k in zip(names, combo, strict=True)}
        v = sum(values[n][k] for n, k in zip(names, combo, strict=True))
        if budget.meets(table, choice) and v > best:
            best, arg = v, choice
    if arg is None:
        with pytest.raises(BudgetError):
            budget.solve(table, options, values)
        return
    choice, info = budget.solve(table, options, values)
    assert info["method"] == "milp" and budget.meets(table, choice)
    assert info["value"] == pytest.approx(best, abs=1e-9)


def test_window_is_the_one_definition():
    table = _table(0)
    b = Budget((Limit("bitops", 0.25),), tol=0.1)
    lo, hi = b.window(b.limits[0], table)
    ref = table.reference("bitops")
    assert hi == int(0.25 * ref) and lo == pytest.approx(0.9 * hi, abs=1)
    every = {n: (4, 4) for n in table.counted}  # exactly 25% of W8A8
    assert b.meets(table, every) and not b.meets(table, {n: (2, 2) for n in table.counted})


def test_options_are_checked_and_named():
    with pytest.raises(BudgetError, match="--budget-bitops 3e\\+09 is a ratio.*--budget-gbitops 3"):
        Budget.from_options(bitops=3e9)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(BudgetError, match="positive finite"):
            Budget.from_options(bitops=bad)
    with pytest.raises(BudgetError, match="--tol"):
        Budget.from_options(bitops=0.1, tol=1.5)
    assert Budget.from_options() is None
    b = Budget.from_options(bitops=0.125, weight_mb=0.05)
    assert b.tag() == "r12.5-0.05mb" and "--budget-bitops 0.125" in b.describe()


def test_uniform_matches_follow_the_target():
    table = _table(2)
    b = Budget.from_options(bitops=0.09375)
    assert b.uniform_matches(table, get_target("ort")) == [(2, 3), (3, 2)]
    b = Budget.from_options(bitops=0.875)
    assert b.uniform_matches(table, get_target("sim")) == [(7, 8), (8, 7)]
    assert b.uniform_matches(table, get_target("tensorrt")) == [(8, 7)]  # no unsigned A8 on TensorRT


def _lut_table(seed: int) -> CostTable:
    """4 counted layers and one fixed edge, with a latency table: int8 kernels do not care about bits below 8,
    sub-8-bit activations pay a requantization, float costs more."""
    rng = np.random.default_rng(seed)
    costs = {f"l{i}": LayerCost(f"l{i}", "conv", int(rng.integers(1_000, 50_000)), int(rng.integers(100, 5_000)),
                                False) for i in range(5)}
    lut = {}
    for n in costs:
        int8, fl = float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.1, 0.6))
        lut[n] = {"float": fl, **{f"w{w}a{a}": int8 + (0.01 if a < 8 else 0.0) for w in (2, 4, 8) for a in (2, 4, 8)}}
    return CostTable(costs, ("l0", "l1", "l2", "l3"), fixed={"l4": (8, 8)}, lut=lut, rest_ms=0.2)


def test_latency_limits_parse_and_cover_the_whole_model():
    t = _lut_table(0)
    lim = B.parse_latency("1.5ms")
    assert (lim.metric, lim.value, lim.relative, lim.whole) == ("latency", 1.5, False, True)
    assert lim.bound(t) == int(1.5e6) - t.constant("latency")  # the rest of the graph and the edge are fixed
    r = B.parse_latency("0.8xfloat")
    whole_float = t.constant("latency") + sum(round(t.lut[n]["float"] * 1e6) for n in t.counted)
    assert r.relative and r.of == "float" and r.target(t) == pytest.approx(0.8 * whole_float)
    for bad in ("fast", "-1ms", "0xw8a8", "nan"):
        with pytest.raises(BudgetError, match="--budget-latency"):
            B.parse_latency(bad)
    b = Budget.from_options(size_mb=0.01, latency="0.9xw8a8")
    assert b.metrics == ("size", "latency") and b.tag() == "0.01mb-total-0.9xw8a8"


def test_a_latency_limit_is_an_upper_bound_only():
    """Faster than asked is never a fault: a latency limit has no window below it, so a budget with one is met
    by every policy under all its bounds (with a size limit too), and a loose latency budget is feasible."""
    t = _lut_table(1)
    whole_w8a8 = t.constant("latency") + sum(t.unit_cost("latency", n, 8, 8) for n in t.counted)
    lat = Limit("latency", 1.5 * whole_w8a8 / 1e6, False, whole=True)
    b = Budget((lat,))
    assert b.upper_only and b.window(lat, t) == (0, lat.bound(t)) and "upper bounds" in b.describe()
    cheap = {n: (8, 8) for n in t.counted}  # 1/1.5 of the bound: far outside a 3% window, still met
    assert t.total("latency", cheap) < 0.9 * lat.bound(t) and b.meets(t, cheap)
    assert not Budget((Limit("latency", 0.5 * whole_w8a8 / 1e6, False, whole=True),)).meets(t, cheap)
    options = {n: [(8, 8), (4, 8)] for n in t.counted}
    b.check_feasible(t, options)  # the cheapest policy is far under: no "above the dearest policy" error
    choice, _ = b.solve(t, options, {n: [0.0, 1.0] for n in t.counted})
    assert choice == {n: (4, 8) for n in t.counted}  # the values decide below the bound
    size = Limit("size", 1.0, False, whole=True)  # 1 MB: far above these layers' weights
    both = Budget((lat, size))
    assert both.upper_only and both.meets(t, cheap)
    assert not Budget((size,)).meets(t, cheap)  # alone, a size limit keeps its window
    with pytest.raises(BudgetError, match=r"0.05xw8a8 = [\d.]+ ms \(0.05xw8a8\) is below the cheapest policy.*"
                                          r"feasible range [\d.]+ ms \(1xw8a8\)\.\.[\d.]+ ms \(1xw8a8\)$"):
        Budget.from_options(latency="0.05xw8a8").check_feasible(t, options)


@pytest.mark.parametrize("seed", range(4))
def test_latency_and_size_together_equal_brute_force(seed):
    t = _lut_table(seed)
    rng = np.random.default_rng(200 + seed)
    options = {n: [(w, a) for w in (2, 4, 8) for a in (2, 4, 8)] + [(32, 32)] for n in t.counted}
    values = {n: list(np.log(rng.dirichlet(np.ones(10)))) for n in t.counted}
    whole_w8a8 = t.constant("latency") + sum(t.unit_cost("latency", n, 8, 8) for n in t.counted)
    size_w4 = (t.constant("size") + sum(t.layers[n].params * 4 for n in t.counted)) / 8e6
    budget = Budget((Limit("latency", 1.05 * whole_w8a8 / 1e6, False, whole=True),
                     Limit("size", size_w4, False, whole=True)))
    best, arg = -np.inf, None
    names = list(options)
    for combo in itertools.product(*[range(10)] * len(names)):
        choice = {n: options[n][k] for n, k in zip(names, combo, strict=True)}
        v = sum(values[n][k] for n, k in zip(names, combo, strict=True))
        if budget.meets(t, choice) and v > best:
            best, arg = v, choice
    if arg is None:
        with pytest.raises(BudgetError):
            budget.solve(t, options, values)
        return
    choice, info = budget.solve(t, options, values)
    assert budget.meets(t, choice) and info["value"] == pytest.approx(best, abs=1e-9)
    whole = [t.constant(m) + t.total(m, choice) for m in ("latency", "size")]
    assert whole[0] <= 1.05 * whole_w8a8 + 1 and whole[1] <= size_w4 * 8e6 + 1
