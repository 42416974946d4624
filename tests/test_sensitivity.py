"""The sensitivity oracle: its table, its exact best/worst policies (= brute force), uniform random feasible
policies, the rank agreement, PTQ and BN re-estimation, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from asga_deploy.budget import Budget
from asga_deploy.errors import AsgaError
from asga_deploy.models import create_model
from asga_deploy.oracle import (
    loss_gap_closed,
    options_of,
    oracle_choice,
    per_cost_sensitivity,
    predicted,
    random_choices,
    rank_agreement,
)
from asga_deploy.policy import Policy, validate_policy
from asga_deploy.ptq import reestimate_bn
from asga_deploy.sensitivity import SensitivityConfig, cost_table, deltas, measure

BITS = (2, 4, 8)


@pytest.fixture(scope="module")
def table(float_ckpt):
    cfg = SensitivityConfig(str(float_ckpt), target="sim", weight_bits=BITS, act_bits=BITS, reference=(4, 4), images=32,
                            calib_images=16, bn_images=16, batch_size=16, hessian_samples=1, hessian_images=16,
                            finetune_steps=2, finetune_warmup=2, finetune_batch=8)
    return measure(cfg)


def test_table_has_every_layer_option_and_oracle(table):
    assert table["layers"] == ["conv2", "conv3"] and table["edges"] == ["conv1", "fc"]
    for n in table["layers"]:
        opts = options_of(table)[n]
        assert opts == [(w, a) for w in BITS for a in BITS]
        ref = opts.index((4, 4))
        for kind in ("ptq",):
            assert table[kind][n][ref] == 0.0  # the reference itself: no change
        assert table["finetune"]["table"][n][ref] == 0.0
        assert all(np.isfinite(table["ptq"][n])) and len(table["hessian"][n]["estimate"]) == len(opts)
        est = table["hessian"][n]["estimate"]
        assert est[opts.index((2, 2))] > est[opts.index((8, 8))]  # coarser grids, larger second-order term
    assert json.loads(json.dumps(table)) == table  # plain JSON


def _brute(table, budget, kind, sign):
    opts, best, arg = options_of(table), -np.inf, None
    names = table["layers"]
    ct = cost_table(table)
    for combo in itertools.product(*[opts[n] for n in names]):
        choice = dict(zip(names, combo, strict=True))
        if budget.meets(ct, choice):
            v = sign * predicted(table, choice, kind)
            if v > best:
                best, arg = v, choice
    return arg, sign * best


@pytest.mark.parametrize("kind", ["ptq", "finetune", "hessian"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_best_and_worst_policies_equal_brute_force(table, kind, ratio):
    budget = Budget.from_options(bitops=ratio, tol=0.3)
    for pick, sign in (("best", -1.0), ("worst", 1.0)):
        choice, info = oracle_choice(table, budget, kind, pick)
        _, best = _brute(table, budget, kind, sign)
        assert budget.meets(cost_table(table), choice)
        assert predicted(table, choice, kind) == pytest.approx(best, abs=1e-12)
        assert info["predicted_loss_increase"] == pytest.approx(best, abs=1e-12)


def test_random_policies_are_feasible_uniform_and_seeded(table):
    budget = Budget.from_options(bitops=0.25, tol=0.5)
    ct, opts = cost_table(table), options_of(table)
    feasible = [c for c in itertools.product(*[opts[n] for n in table["layers"]])
                if budget.meets(ct, dict(zip(table["layers"], c, strict=True)))]
    draws = random_choices(table, budget, 600, seed=3)
    assert draws == random_choices(table, budget, 600, seed=3)
    counts = Counter(tuple(d[n] for n in table["layers"]) for d in draws)
    assert set(counts) == set(feasible)  # every feasible policy is reachable, nothing else is
    expected = 600 / len(feasible)
    assert max(counts.values()) < 2.5 * expected and min(counts.values()) > 0.3 * expected


def test_random_policies_on_a_cost_grid_too_fine_for_exact_counting(table, monkeypatch):
    """Many layers with odd costs (MobileNetV2) make the exact grid too fine: the costs are rounded to coarser cells
    and every draw is still checked against the exact budget."""
    import asga_deploy.budget as budget_mod

    monkeypatch.setattr(budget_mod, "MAX_BINS", 7)
    budget = Budget.from_options(bitops=0.25, tol=0.5)
    ct, opts = cost_table(table), options_of(table)
    feasible = {c for c in itertools.product(*[opts[n] for n in table["layers"]])
                if budget.meets(ct, dict(zip(table["layers"], c, strict=True)))}
    lim = budget.limits[0]
    grid = math.gcd(*[ct.unit_cost(lim.metric, n, w, a) for n in table["layers"] for w, a in opts[n]])
    assert budget.window(lim, ct)[1] // grid > budget_mod.MAX_BINS  # the coarse path is the one tested
    draws = random_choices(table, budget, 300, seed=1)
    assert all(budget.meets(ct, d) for d in draws)
    assert len({tuple(d[n] for n in table["layers"]) for d in draws}) > len(feasible) // 2


def test_per_cost_sensitivity_and_rank_agreement():
    t = {"layers": ["a", "b", "c"], "reference_choice": {n: [4, 4] for n in "abc"},
         "options": {n: [[w, a] for w in (2, 4, 8) for a in (2, 4, 8)] for n in "abc"},
         "costs": {n: {"kind": "conv", "macs": 1000, "params": 100, "input_signed": False} for n in "abc"}}
    # loss increase when dropping bits: c is the most sensitive layer, a the least
    scale = {"a": 0.1, "b": 0.5, "c": 2.0}
    t["ptq"] = {n: [scale[n] * (4 * 4 - w * a) / 16 for w in (2, 4, 8) for a in (2, 4, 8)] for n in "abc"}
    s = per_cost_sensitivity(t)
    assert s["c"] > s["b"] > s["a"] > 0
    assert rank_agreement(s, {"a": (2, 2), "b": (4, 4), "c": (8, 8)}) == pytest.approx(1.0)
    assert rank_agreement(s, {"a": (8, 8), "b": (4, 4), "c": (2, 2)}) == pytest.approx(-1.0)
    assert np.isnan(rank_agreement(s, {n: (4, 4) for n in "abc"}))  # uniform: nothing to rank


def test_loss_gap_closed_is_one_at_the_best_and_zero_at_the_references(table):
    budget = Budget.from_options(bitops=0.25, tol=0.5)
    best = oracle_choice(table, budget, "ptq", "best")[0]
    worst = oracle_choice(table, budget, "ptq", "worst")[0]
    refs = random_choices(table, budget, 20, seed=0)
    assert loss_gap_closed(table, "ptq", best, best, refs) == pytest.approx(1.0)
    assert loss_gap_closed(table, "ptq", worst, best, refs) < 0  # worse than a random feasible policy on average
    assert loss_gap_closed(table, "ptq", worst, best, [worst]) == 0.0
    mid = loss_gap_closed(table, "ptq", refs[1], best, refs)
    r, b = np.mean([predicted(table, c) for c in refs]), predicted(table, best)
    assert mid == pytest.approx((r - predicted(table, refs[1])) / (r - b))
    with pytest.raises(AsgaError, match="no gap to close"):
        loss_gap_closed(table, "ptq", best, best, [best])


def test_reestimate_bn_replaces_the_running_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(64, 1, 8, 8) * 3 + 2
    reestimate_bn(model, [x[:32], x[32:]])
    y = model[0](x)
    assert torch.allclose(model[1].running_mean, y.mean((0, 2, 3)), atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training and not model[1].training  # modes restored


def test_cli_sensitivity_then_search_method_sensitivity(cli, float_ckpt, tmp_path, one_error_line, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("sensitivity", "--float", float_ckpt, "--target", "sim", "--weight-bits", "2,4,8", "--act-bits", "2,4,8",
              "--images", "16", "--calib-images", "16", "--bn-images", "16", "--hessian-samples", "0",
              "--budget-bitops", "0.2", "--out", "sens")
    assert res.exit_code == 0, res.stderr
    t = json.loads((tmp_path / "sens/sensitivity.json").read_text())
    assert t["reference"] == [4, 4] and (tmp_path / "sens/heatmap.png").is_file()
    res = cli("search", "--method", "sensitivity", "--sensitivity", "sens/sensitivity.json",
              "--budget-bitops", "0.25", "--tol", "0.3", "--out", "pol")
    assert res.exit_code == 0, res.stderr
    pol = Policy.load(tmp_path / "pol/tinynet-sensitivity-r25-sim.json")
    validate_policy(pol, create_model("tinynet", 10, 1))
    assert pol.provenance["method"] == "sensitivity" and 0.175 <= pol.cost["bitops_vs_w8a8"] <= 0.25
    res = cli("search", "--method", "sensitivity", "--sensitivity", "sens/sensitivity.json",
              "--budget-bitops", "0.25", "--tol", "0.3", "--out", "pol", "--pick", "random", "--seed", "4")
    assert res.exit_code == 0 and (tmp_path / "pol/tinynet-sensitivity-random-r25-sim-s4.json").is_file()
    assert "--sensitivity TABLE" in one_error_line(cli("search", "--method", "sensitivity", "--budget-bitops", "0.2"))
    assert "needs --model and --dataset" in one_error_line(cli("search", "--budget-bitops", "0.2"))
    assert "exists; pass --force" in one_error_line(cli("sensitivity", "--float", float_ckpt, "--out", "sens"))


def test_eval_policy_after_ptq(cli, float_ckpt, policy_file, one_error_line):
    from tests.conftest import FAKE

    pol = policy_file(8, 8)
    res = cli("eval", pol, "--ptq", "--float", float_ckpt, "--dataset", FAKE)
    assert res.exit_code == 0, res.stderr
    assert "ptq" in res.stdout and "top-1" in res.stdout
    assert "add --ptq --float" in one_error_line(cli("eval", pol))
    other = policy_file(4, 4, model="tinyresnet")
    assert "is for tinyresnet" in one_error_line(cli("eval", other, "--ptq", "--float", float_ckpt))


def test_float_choice_and_a_latency_budget(float_ckpt, tmp_path):
    """The oracle measures the float choice too; with a latency table the best policy meets a latency budget."""
    from asga_deploy.cost import FLOAT, choice_key
    from asga_deploy.oracle import oracle_policy_file, write_table

    cfg = SensitivityConfig(str(float_ckpt), target="sim", weight_bits=BITS, act_bits=BITS, reference=(4, 4),
                            images=32, calib_images=16, bn_images=16, batch_size=16, hessian_samples=1,
                            hessian_images=16, finetune_steps=1, finetune_warmup=1, finetune_batch=8, float_choice=True)
    t = measure(cfg)
    for kind in ("ptq", "finetune", "hessian"):
        d = deltas(t, kind)
        assert all(len(d[n]) == 10 for n in t["layers"]) and options_of(t)["conv2"][-1] == FLOAT
    assert deltas(t, "hessian")["conv2"][-1] == 0.0  # no quantization error in float
    lut = {n: {**{choice_key(w, a): 0.1 for w in BITS for a in BITS}, "float": 0.3} for n in t["costs"]}
    (tmp_path / "lut.json").write_text(json.dumps({"layers": lut, "rest_ms": 0.05}))
    table = write_table(t, tmp_path / "sens")
    budget = Budget.from_options(latency="0.85ms", tol=0.5)
    path, pol, info = oracle_policy_file(table, budget, out_dir=tmp_path / "pol", lut=tmp_path / "lut.json")
    assert info["latency"]["predicted_ms"] <= 0.85 + 1e-9 and pol.provenance["metrics"]["latency"]["lut"]
    # edges at 8 bits (0.2 ms), rest 0.05: 0.6 ms left for the two searched layers: at most one float layer
    assert len(pol.float_layers) <= 1
