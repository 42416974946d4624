"""Budget: exact extraction (= brute force), feasible range, controller at several targets, lambda."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from asga_deploy.errors import BudgetError
from asga_deploy.search import budget as B
from asga_deploy.search.objective import ASGAStep
from asga_deploy.search.run import SearchConfig, run_search

from .test_search_helpers import batches, search_data, tiny_supernet


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


def test_extraction_on_a_supernet_equals_brute_force():
    net = tiny_supernet("tinyresnet", bits=(2, 4, 8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.set_temperature(0.05)
    for ratio in (0.25, 0.125, 0.08):
        choice, info = B.extract(net, "bitops", ratio, tol=0.03)
        _, costs, values = B.layer_options(net, "bitops")
        ref = net.ref_bitops
        arg, best = _brute(costs, values, int(np.ceil(0.97 * ratio * ref)), int(np.floor(ratio * ref)))
        assert info["log_prob"] == pytest.approx(best, abs=1e-9)
        assert 0.97 * ratio <= net.cost_ratio(choice) <= ratio
        assert net.derive_policy(choice).cost["bitops_vs_w8a8"] == pytest.approx(net.cost_ratio(choice))


def test_budget_outside_feasible_range_says_the_range():
    net = tiny_supernet()
    assert B.feasible_range(net, "bitops") == pytest.approx((4 / 64, 1.0))
    with pytest.raises(BudgetError, match=r"below the cheapest.*feasible range 0.0625"):
        B.check_budget(net, "bitops", 0.05, 0.03, "--budget-bitops 0.05")
    with pytest.raises(BudgetError, match="above the most expensive"):
        B.check_budget(net, "bitops", 1.2, 0.03, "--budget-bitops 1.2")
    B.check_budget(net, "bitops", 1.02, 0.03, "ok: W8A8 is inside the window")


def test_temperature_is_geometric_from_1_to_001():
    assert B.temperature(0, 101) == 1.0
    assert B.temperature(100, 101) == pytest.approx(0.01)
    assert B.temperature(50, 101) == pytest.approx(0.1)


def test_controller_anneals_target_and_freezes_lambda():
    c = B.Controller(0.25)
    used = [c(t, 100, 0.5) for t in range(100)]  # a cost stuck above target: lambda grows
    assert c.start == 0.5 and c.target_t == 0.25
    assert used[0] == 0.0 < used[1] < used[2]  # T_0 = C(alpha_0): no push at the first step
    assert used[85] == used[99] == c.lam  # frozen for the last 15%
    assert B.Controller(None, lam=0.7)(5, 10, 0.9) == 0.7  # soft budget: fixed lambda


def test_larger_lambda_gives_fewer_bitops():
    def run(lam):
        net = tiny_supernet()
        w, a = net.weight_parameters(), net.arch_parameters()
        st = ASGAStep(net, w, a, torch.optim.SGD(w, lr=0.01, momentum=0.9), torch.optim.Adam(a, lr=0.01),
                      "erm", cost_fn=net.expected_cost)
        for x, y in batches(8, 8):
            st.step(x, y, lam)
        return net.expected_cost().item()

    costs = [run(lam) for lam in (0.0, 0.5, 5.0)]
    assert costs[0] > costs[1] > costs[2]


@pytest.mark.parametrize("target", [0.25, 0.125, 0.08])
def test_hard_budget_met_within_tolerance(target, tmp_path):
    # erm: the controller does not depend on the objective, and one pass per step keeps the test short
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=2, budget_bitops=target,
                       allow_diagnostics=True)
    res = run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / "r")
    got = res.policy.cost["bitops_vs_w8a8"]
    assert 0.97 * target <= got <= target  # the written policy: exactly in the window
    # the controller brought the expected cost near the target (from C(alpha_0) = 0.33)
    assert abs(res.metrics["expected_cost_ratio"] / target - 1) < 0.3
    assert res.metrics["extraction_exact_dp"] is True


def test_weight_megabyte_budget_extraction():
    net = tiny_supernet("tinyresnet")
    ref_mb = net.ref_weight_bits / 8e6
    choice, info = B.extract(net, "weight", 0.5, tol=0.03)
    pol = net.derive_policy(choice)
    assert 0.97 * 0.5 * ref_mb * 1e6 <= pol.cost["weight_bytes"] <= 0.5 * ref_mb * 1e6
