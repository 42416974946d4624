"""The ASGA step: alignment reduces to the plain gradient, exact restore, frozen BN, radius rules."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from asga_deploy.search.objective import ASGAStep, Radius, bn_stats_frozen

from .test_search_helpers import batches, tiny_supernet


def _stepper(net, objective="asga", gamma=0.001, radius=None, lr=0.05):
    w, a = net.weight_parameters(), net.arch_parameters()
    return ASGAStep(net, w, a, torch.optim.SGD(w, lr=lr, momentum=0.9), torch.optim.Adam(a, lr=0.01),
                    objective, gamma, radius, cost_fn=net.expected_cost)


def _bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_rho_and_gamma_zero_give_the_plain_gradient():
    a = tiny_supernet("tinyresnet")
    b = copy.deepcopy(a)
    sa = _stepper(a, "asga", gamma=0.0, radius=Radius("fixed", epsilon=0.0))
    sb = _stepper(b, "erm")
    for x, y in batches(3, 8):
        sa.step(x, y, lam=0.3)
        sb.step(x, y, lam=0.3)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=False):
        assert torch.equal(p, q), n
    # and a non-zero radius really changes the update (the test above could not pass vacuously)
    c = copy.deepcopy(b)
    _stepper(c, "asga", gamma=0.0, radius=Radius("fixed", epsilon=0.1)).step(*batches(1, 8, seed=5)[0])
    _stepper(b, "erm").step(*batches(1, 8, seed=5)[0])
    assert any(not torch.equal(p, q) for p, q in zip(b.parameters(), c.parameters(), strict=False))


def test_weights_restored_bit_exactly_and_bn_stats_untouched_by_pass_2():
    net = tiny_supernet("tinyresnet")
    net.train()
    st = _stepper(net)
    x, y = batches(1, 8)[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss, g_w, _ = st.loss_and_grads(x, y)
    after_pass1 = _bn_buffers(net)
    assert any(not torch.equal(after_pass1[k], before[k]) for k in after_pass1)  # pass 1 does update them
    st.first_step(g_w, rho=0.1)
    moved = [k for k, p in net.named_parameters() if not torch.equal(p, before[k])]
    assert moved  # W + e differs from W
    st.perturbed_loss_and_grads(x, y)
    for k, v in _bn_buffers(net).items():
        assert torch.equal(v, after_pass1[k]), k
    st.second_step()
    for k, p in net.named_parameters():
        assert torch.equal(p, before[k]), k


def test_bn_stats_frozen_restores_tracking():
    net = tiny_supernet()
    with bn_stats_frozen(net):
        assert not any(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_clamp_keeps_the_step_an_ascent():
    net = tiny_supernet()
    st = _stepper(net, gamma=10.0)  # rho / ||g|| - gamma < 0: no perturbation rather than a descent
    x, y = batches(1, 8)[0]
    _, g_w, _ = st.loss_and_grads(x, y)
    before = [p.clone() for p in st.w_params]
    st.first_step(g_w, rho=0.1)
    assert all(torch.equal(p, q) for p, q in zip(st.w_params, before, strict=False))
    st.second_step()


def test_rel_radius_stays_in_bounds_and_follows_sharpness():
    r = Radius("rel", epsilon=0.1, rho_min=0.01)
    rnd = random.Random(0)
    seen = []
    for t in range(500):
        sharp = 5.0 * math.exp(-t / 100)  # the landscape flattens
        h = r.current() * sharp + rnd.gauss(0, 0.01)
        seen.append(r.current())
        r.update(h)
    assert all(0.01 <= v <= 0.1 for v in seen)
    assert seen[0] == 0.1 and seen[-1] < 0.03  # it shrinks as the gap per unit radius falls
    for h in (-1.0, 1e9, 0.0, float("1e-30")):
        r.update(h)
        assert 0.01 <= r.current() <= 0.1


def test_literal_rule_collapses_to_zero_where_rel_does_not():
    lit, rel = Radius("literal"), Radius("rel")
    for _ in range(300):  # to first order h ~ rho * ||g||, here ||g|| = 0.5
        lit.update(lit.current() * 0.5)
        rel.update(rel.current() * 0.5)
    assert lit.current() == 0.0  # the search has silently become erm
    assert rel.current() == pytest.approx(0.1)


def test_sam_uses_fixed_radius_and_no_gamma():
    net = tiny_supernet()
    st = _stepper(net, "sam", radius=Radius("rel"))
    assert st.gamma == 0.0 and st.radius.rule == "fixed"
    stats = st.step(*batches(1, 8)[0])
    assert stats["rho"] == 0.1 and stats["loss_adv"] != stats["loss"]


def test_config_records_the_radius_rule_each_objective_runs():
    from asga_deploy.search.run import SearchConfig

    rules = {o: SearchConfig(model="tinynet", dataset="fake", objective=o).rho_rule
             for o in ("asga", "sam-align", "sam", "erm")}
    assert rules == {"asga": "rel", "sam-align": "fixed", "sam": "fixed", "erm": "rel"}
    assert SearchConfig(model="tinynet", dataset="fake", rho_rule="literal").rho_rule == "literal"
