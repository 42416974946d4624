"""The search side of a budget: extraction on a supernet (= brute force), controller, lambda, hard budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from asga_deploy.budget import Budget
from asga_deploy.errors import BudgetError
from asga_deploy.search import controller as C
from asga_deploy.search.objective import ASGAStep, scaled_like
from asga_deploy.search.run import SearchConfig, run_search

from .test_search_helpers import batches, search_data, tiny_supernet


def _brute_choice(net, budget):
    """Return the best (sum log p) choice of a supernet meeting the budget, by enumeration."""
    opts, vals = net.options(), C.log_probs(net)
    names = list(opts)
    best, arg = -np.inf, None
    for combo in itertools.product(*[range(len(opts[n])) for n in names]):
        choice = {n: opts[n][k] for n, k in zip(names, combo, strict=True)}
        v = sum(vals[n][k] for n, k in zip(names, combo, strict=True))
        if budget.meets(net.table, choice) and v > best:
            best, arg = v, choice
    return arg, best


def test_extraction_on_a_supernet_equals_brute_force():
    net = tiny_supernet("tinyresnet", bits=(2, 4, 8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.set_temperature(0.05)
    for ratio in (0.25, 0.125, 0.08):
        budget = Budget.from_options(bitops=ratio)
        choice, info = C.extract(net, budget)
        _, best = _brute_choice(net, budget)
        assert info["log_prob"] == pytest.approx(best, abs=1e-9)
        assert 0.97 * ratio <= net.cost_ratio(choice) <= ratio
        assert net.derive_policy(choice).cost["bitops_vs_w8a8"] == pytest.approx(net.cost_ratio(choice))


def test_budget_outside_feasible_range_says_the_range():
    net = tiny_supernet()
    with pytest.raises(BudgetError, match=r"below the cheapest.*feasible range 0.0625"):
        Budget.from_options(bitops=0.05).check_feasible(net.table, net.options())
    with pytest.raises(BudgetError, match="above the most expensive"):
        Budget.from_options(gbitops=1e3).check_feasible(net.table, net.options())
    Budget.from_options(bitops=1.0).check_feasible(net.table, net.options())  # W8A8 is inside the window


def test_temperature_is_geometric_from_1_to_001():
    assert C.temperature(0, 101) == 1.0
    assert C.temperature(100, 101) == pytest.approx(0.01)
    assert C.temperature(50, 101) == pytest.approx(0.1)


def test_controller_integral_is_clamped_and_soft_budget_is_fixed():
    c = C.Controller(1.0, k_p=2.0, eta=0.5, lam_max=3.0)
    used = [c(2.0) for _ in range(20)]  # a cost stuck at twice the target: lambda winds up to its clamp
    assert used[0] == pytest.approx(2.0) and c.lam == 3.0 and used[-1] == pytest.approx(3.0 + 2.0)
    assert c(1.0) == pytest.approx(3.0)  # on target: only the integral acts
    assert C.Controller(None, lam=0.7)(0.9) == 0.7  # soft budget: fixed lambda


def test_an_upper_bound_only_controller_never_pushes_the_cost_up():
    """A latency budget: over the bound the controller pushes down as before; under it the integral decays to 0
    and lambda_used is never negative (a windowed controller pushes a cheap policy back up to the window)."""
    c = C.Controller(1.0, k_p=2.0, eta=0.5, lam_max=3.0, band=0.1, upper_only=True, floor=0.1)
    assert c(1.5) == pytest.approx(1.0) and c.lam == pytest.approx(0.25)
    under = [c(0.5) for _ in range(5)]
    assert all(u == 0.1 for u in under) and c.lam == 0.0  # only the tie-breaking floor below the bound
    windowed = C.Controller(1.0, k_p=2.0, eta=0.5, lam_max=3.0, band=0.1)
    assert windowed(0.5) < 0.0


@pytest.mark.parametrize("target", [0.094, 0.25])
def test_controller_reaches_the_target_on_a_toy_cost(target):
    """20 layers of logits over (2, 3, 4, 6, 8) bits; a noisy "loss" that prefers more bits with layer-specific
    strength; the logits step as in the search (Adam, lr proportional to tau, cost bias at the start, cost
    gradient scaled like the loss's, frozen for the last 15%); the argmax must end inside the window."""
    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([2.0, 3.0, 4.0, 6.0, 8.0])
    strength, macs = torch.linspace(0.2, 2.0, 20), torch.rand(20, generator=g) + 0.5
    alpha = torch.zeros(20, 5, requires_grad=True)

    def cost(a, tau):
        return ((torch.softmax(a / tau, 1) * bits).sum(1) ** 2 * macs).sum() / (64 * macs.sum())

    with torch.no_grad():  # start at the budget, as start_at_budget does for a supernet
        lo, hi = -40.0, 40.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(-mid * bits / 8 + 0 * alpha, 1.0) > target else (lo, mid)
        alpha.copy_(-hi * bits / 8)
    opt, ctrl, total = torch.optim.Adam([alpha], lr=0.05), C.Controller(target), 240
    for t in range(int(0.85 * total)):
        tau = C.temperature(t, total, 1.0, 0.01)
        opt.param_groups[0]["lr"] = 0.2 * tau
        lam = ctrl(float(cost(alpha.detach(), tau)))
        p = torch.softmax(alpha / tau, 1)
        loss = -(p * torch.log(bits) * strength[:, None]).sum() + (p * torch.randn(20, 5, generator=g)).sum()
        (g_loss,) = torch.autograd.grad(loss, alpha)
        (g_cost,) = torch.autograd.grad(cost(alpha, tau), alpha)
        alpha.grad = g_loss + scaled_like([g_loss], [g_cost], lam)[0]
        opt.step()
    picked = bits[alpha.argmax(1)]
    argmax_cost = float((picked ** 2 * macs).sum() / (64 * macs.sum()))
    assert 0.9 * target <= argmax_cost <= 1.03 * target
    assert picked[-5:].mean() > picked[:5].mean()  # the layers whose loss wants bits most get more


def test_start_at_budget_puts_the_expected_cost_on_the_bound():
    net = tiny_supernet()
    net.set_temperature(1.0)
    for ratio in (0.1, 0.3, 0.6):
        beta = C.start_at_budget(net, lambda r=ratio: net.expected_cost("bitops") / r)
        assert net.expected_cost("bitops").item() == pytest.approx(ratio, rel=1e-4) and -40 < beta < 40


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
    # erm: the controller does not depend on the objective, and one pass per step keeps the test short;
    # 24 steps in all: a logit step large enough for the logits to reach the budget from their start
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=2, budget_bitops=target,
                       alpha_lr=1.0, allow_diagnostics=True)
    res = run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / "r")
    got = res.policy.cost["bitops_vs_w8a8"]
    assert 0.97 * target <= got <= target  # the written policy: exactly in the window
    # the controller kept the expected cost near the target as the temperature fell 100-fold
    assert abs(res.metrics["expected_cost_ratio"] / target - 1) < 0.3
    assert res.metrics["extraction_exact_dp"] is True


def test_weight_megabyte_budget_extraction():
    net = tiny_supernet("tinyresnet")
    mb = 0.5 * net.table.reference("size") / 8e6
    choice, _ = C.extract(net, Budget.from_options(weight_mb=mb))
    pol = net.derive_policy(choice)
    assert 0.97 * mb * 1e6 - 1 <= pol.cost["weight_bytes"] <= mb * 1e6


def test_latency_and_size_budgets_with_the_float_choice(tmp_path):
    """A fake latency table (float layers twice as slow as INT8 ones, sub-8-bit activations a little slower):
    the searched policy meets both budgets as predicted, and the policy records the prediction."""
    import json

    from asga_deploy.cost import FLOAT, choice_key, layer_costs
    from asga_deploy.models import create_model

    costs = layer_costs(create_model("tinyresnet", 10, 1), (1, 12, 12))
    lut = {n: {choice_key(w, a): c.macs * 1e-6 * (1.0 + 0.1 * (a < 8)) for w in range(2, 9) for a in range(2, 9)}
           for n, c in costs.items()}
    for n, c in costs.items():
        lut[n][choice_key(*FLOAT)] = c.macs * 2e-6
    path = tmp_path / "lut.json"
    path.write_text(json.dumps({"layers": lut, "rest_ms": 0.01}))
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=2, alpha_lr=1.0,
                       budget_latency="1.3xw8a8", budget_size_mb=0.004, lut=str(path), float_choice=True,
                       allow_diagnostics=True, tol=0.2)
    res = run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / "r")
    lat = res.metrics["latency"]
    assert lat["predicted_ms"] <= lat["budget_ms"] + 1e-9 and lat["lut"] == str(path)
    pol = res.policy
    bits = {n: (b.weight_bits, b.act_bits) for n, b in pol.layers.items()} | dict.fromkeys(pol.float_layers, FLOAT)
    size = sum(costs[n].weight_bytes(w) for n, (w, _) in bits.items())
    assert size <= 0.004e6 + 1e-6
    predicted = 0.01 + sum(lut[n][choice_key(*b)] for n, b in bits.items())
    assert predicted == pytest.approx(lat["predicted_ms"], abs=1e-5)  # costs are whole nanoseconds
    assert len(res.policy.provenance["config"]) and res.policy.provenance["config"]["float_choice"] is True


def test_a_latency_search_starts_under_its_limits_in_cost_space(tmp_path):
    """Float is the FASTEST choice of the first layers and sub-8-bit activations are slower (as on ORT): a bits
    prior would push the wrong way. The cost-space start puts the expected latency and size under their bounds
    from the first step, the controller never pushes the cost up, and a loose budget leaves the start alone."""
    import json

    from asga_deploy.cost import FLOAT, choice_key, layer_costs
    from asga_deploy.models import create_model

    costs = layer_costs(create_model("tinyresnet", 10, 1), (1, 12, 12))
    names = list(costs)
    lut = {n: {choice_key(w, a): c.macs * 1e-6 * (1.0 + 0.2 * (a < 8)) for w in range(2, 9) for a in range(2, 9)}
           for n, c in costs.items()}
    for i, (n, c) in enumerate(costs.items()):
        lut[n][choice_key(*FLOAT)] = c.macs * 1e-6 * (0.5 if i < len(names) // 2 else 2.0)
    path = tmp_path / "lut.json"
    path.write_text(json.dumps({"layers": lut, "rest_ms": 0.01}))
    for budget, size, loose in (("0.8xw8a8", 0.006, False), ("3xw8a8", None, True)):
        cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=2, alpha_lr=1.0,
                           budget_latency=budget, budget_size_mb=size, lut=str(path), float_choice=True,
                           search_edges=True, allow_diagnostics=True)
        res = run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / budget)
        log = [json.loads(line) for line in (tmp_path / budget / "log.jsonl").read_text().splitlines()]
        assert all(r["lambda"] >= cfg.lam_floor for r in log if not r["frozen"])
        lat = res.metrics["latency"]
        assert lat["predicted_ms"] <= lat["budget_ms"] + 1e-9
        if loose:
            assert res.metrics["start_beta"] == [0.0]
        else:
            assert len(res.metrics["start_beta"]) == 2 and max(res.metrics["start_beta"]) > 0
            assert log[0]["budget_use"] <= 1.0 + 1e-3  # logged after the first step
            assert res.policy.cost["weight_bytes_total"] <= size * 1e6


def test_a_table_that_fails_its_own_float_check_is_refused_for_float_choices(tmp_path):
    """The MobileNetV2 x0.5 table predicted its every-other-layer-float model at 0.52 of measured: a search that
    may pick float layers is refused before any work, naming the check and the ways on."""
    import json

    from asga_deploy.cost import FLOAT, choice_key, layer_costs
    from asga_deploy.models import create_model

    costs = layer_costs(create_model("tinyresnet", 10, 1), (1, 12, 12))
    lut = {n: {choice_key(w, a): c.macs * 1e-6 for w in range(2, 9) for a in range(2, 9)} for n, c in costs.items()}
    for n, c in costs.items():
        lut[n][choice_key(*FLOAT)] = c.macs * 2e-6
    path = tmp_path / "lut.json"
    path.write_text(json.dumps({"layers": lut, "rest_ms": 0.01, "rest_check": {
        "every layer float": {"ratio": 0.97}, "every other layer float (module order)": {"ratio": 0.52}}}))
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=1,
                       budget_latency="1.5xw8a8", lut=str(path), float_choice=True)
    with pytest.raises(BudgetError, match=r"'every other layer float \(module order\)' model at 0.52 of measured.*"
                                          r"without --float-choice.*--allow-diagnostics"):
        run_search(cfg, search_data(4, 8), tmp_path / "p", tmp_path / "r")
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()
    from asga_deploy.search.setup import read_lut

    assert read_lut(str(path), costs)[0] == lut  # no float choices: the check does not apply
    assert read_lut(str(path), costs, float_choice=True, allow=True)[0] == lut  # --allow-diagnostics


def test_a_latency_table_of_another_target_or_other_choices_is_named_before_work(tmp_path):
    """A table measured for `ort` (7-bit weights at most) used by a `sim` search, or missing a candidate's entry:
    one BudgetError naming the target or the layer and choice, not a KeyError in the middle of the search."""
    import json

    from asga_deploy.cost import choice_key, layer_costs
    from asga_deploy.models import create_model

    costs = layer_costs(create_model("tinyresnet", 10, 1), (1, 12, 12))
    lut = {n: {choice_key(w, a): 0.01 for w in range(2, 8) for a in range(2, 9)} for n in costs}
    path = tmp_path / "lut.json"
    path.write_text(json.dumps({"key": {"target": "ort"}, "layers": lut, "rest_ms": 0.01}))
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=1, target="sim",
                       budget_latency="1.0xw8a8", lut=str(path))
    with pytest.raises(BudgetError, match="measured for target ort.*--target ort"):
        run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / "r")
    path.write_text(json.dumps({"layers": lut, "rest_ms": 0.01}))  # no key: the missing w8 entries are named
    with pytest.raises(BudgetError, match="no latency for .* w8a2"):
        run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / "r")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_a_latency_policy_the_side_model_prices_over_budget_fails_a_diagnostic(tmp_path, monkeypatch):
    """A table without the side model is priced by its additive entries; where the table's side model (neighbours
    included) prices the extracted policy over its latency budget by more than 5% -> diagnostic
    latency_side_model_over_budget, named with both prices and the pricing (on MobileNetV2 the additive price was
    0.44 of measured, the side model's 1.14)."""
    import json
    from types import SimpleNamespace

    from asga_deploy.cost import FLOAT, choice_key, layer_costs
    from asga_deploy.lut import table as lut_table
    from asga_deploy.models import create_model
    from asga_deploy.search.config import SearchDiagnosticError

    costs = layer_costs(create_model("tinyresnet", 10, 1), (1, 12, 12))
    lut = {n: {choice_key(w, a): c.macs * 1e-6 for w in range(2, 9) for a in range(2, 9)} for n, c in costs.items()}
    for n in costs:
        lut[n][choice_key(*FLOAT)] = 0.0  # float looks free to the search
    path = tmp_path / "lut.json"
    path.write_text(json.dumps({"layers": lut, "rest_ms": 0.01, "rest_check": {"every layer float": {"ratio": 1.0}}}))
    full = SimpleNamespace(data={"kernels": {n: {"float_side_saving": 0.0} for n in costs}})
    priced = []
    monkeypatch.setattr(lut_table, "load_lut", lambda p, expect=None: full)
    monkeypatch.setattr(lut_table, "predict_latency", lambda t, pol: priced.append(pol) or 1e3)
    cfg = SearchConfig(model="tinyresnet", dataset="synthetic", objective="erm", epochs=1,
                       budget_latency="0.5xw8a8", lut=str(path), float_choice=True, search_edges=True)
    with pytest.raises(SearchDiagnosticError, match=r"latency_side_model_over_budget.*side model prices the policy "
                                                    r"at 1000 ms.*search's price: .* ms, additive\).*add a size budget"):
        run_search(cfg, search_data(12, 8), tmp_path / "p", tmp_path / "r")
    assert priced and priced[0].float_layers  # the check ran on the extracted policy, which has float layers
    res = run_search(SearchConfig(**{**cfg.as_dict(), "allow_diagnostics": True}), search_data(12, 8),
                     tmp_path / "p", tmp_path / "r", resume=True)
    lat = res.metrics["latency"]
    assert lat["side_model_ms"] == 1e3 and "latency_side_model_over_budget" in res.metrics["diagnostics_failed"]
    assert lat["predicted_ms"] <= lat["budget_ms"]  # the search's own price met the budget


def test_the_expected_latency_prices_pairs_of_neighbouring_choices():
    """With pair terms (lut.model.search_terms: two float neighbours, a float layer before a requantized one), the
    search's expected latency is E[entries] + P(first) P(second) x each term: at a near one-hot softmax it equals
    the exact cost of the argmax policy for every policy, and the pairs move it."""
    from asga_deploy.cost import FLOAT, PairTerm, choice_key, layer_costs
    from asga_deploy.models import create_model
    from asga_deploy.search.supernet import Supernet

    from .test_search_helpers import SIZE

    torch.manual_seed(0)
    m = create_model("tinynet", 10, 1)
    x = batches(1, 16)[0][0]
    costs = layer_costs(m, (1, SIZE, SIZE), example=x)
    lut = {n: {choice_key(w, a): 0.1 * (i + 1) + 0.01 * w + 0.02 * (a < 8) for w in (4, 8) for a in (4, 8)}
           | {"float": 0.5 + 0.1 * i} for i, n in enumerate(costs)}
    pairs = (PairTerm("conv2", "conv3", frozenset({"float"}), frozenset({"float"}), -0.3),
             PairTerm("conv2", "conv3", frozenset({"float"}), frozenset({"w4a4", "w8a4"}), 0.07),
             PairTerm("conv1", "conv2", frozenset({"float"}), frozenset({"float"}), -0.2))  # conv1 is fixed (int8)
    net = Supernet.build(m, "tinynet", costs, x, (4, 8), (4, 8), "sim", ["conv1", "fc"], num_classes=10,
                         input_shape=(1, SIZE, SIZE), float_choice=True, lut=lut, pairs=pairs)
    net.set_temperature(0.001)
    layers = net.mixed_layers()
    opts = net.options()
    seen = set()
    for combo in itertools.product(*(range(len(opts[n])) for n in layers)):
        choice = {n: opts[n][k] for n, k in zip(layers, combo, strict=True)}
        with torch.no_grad():
            for n, mod in layers.items():
                w, a = choice[n]
                mod.alpha_f.copy_(torch.tensor([0.0, 1.0] if choice[n] == FLOAT else [1.0, 0.0]))
                if choice[n] != FLOAT:
                    mod.alpha_w.copy_(torch.tensor([float(b == w) for b in mod.w_bits]))
                    mod.alpha_a.copy_(torch.tensor([float(b == a) for b in mod.a_bits]))
        assert float(net.expected_cost("latency").detach()) == pytest.approx(net.table.ratio("latency", choice), rel=1e-5)
        seen.add(net.table.total("latency", choice) - sum(net.table.unit_cost("latency", n, *b)
                                                           for n, b in choice.items()))
    assert seen == {0, -300_000, 70_000}  # every pair term was exercised
