"""Supernet: one-hot logits compute exactly the fixed-policy model; expected cost; target narrowing."""

from __future__ import annotations

import pytest
import torch

from asga_deploy.errors import PolicyError, UnsupportedTargetError
from asga_deploy.policy import validate_policy
from asga_deploy.quant import apply_policy
from asga_deploy.search.supernet import MixedConv2d, MixedLinear

from .test_search_helpers import tiny_supernet


def _force(net, choice: dict[str, tuple[int, int]]) -> None:
    with torch.no_grad():
        for n, m in net.mixed_layers().items():
            w, a = choice[n]
            m.alpha_w.fill_(0).index_fill_(0, torch.tensor(m.w_bits.index(w)), 100.0)
            m.alpha_a.fill_(0).index_fill_(0, torch.tensor(m.a_bits.index(a)), 100.0)
    net.set_temperature(0.01)  # softmax is exactly one-hot: exp(-1e4) == 0 in float32


@pytest.mark.parametrize("model", ["tinynet", "tinyresnet"])
def test_one_hot_supernet_equals_fixed_policy_model(model):
    net, float_model, x = tiny_supernet(model, keep_float=True)
    names = list(net.mixed_layers())
    choice = {n: ((2, 3, 4, 6, 8)[i % 5], (8, 6, 4, 3, 2)[i % 5]) for i, n in enumerate(names)}
    _force(net, choice)
    pol = net.derive_policy(choice, edge_bits="float")
    assert list(pol.float_layers) == net.edges
    fixed = float_model
    apply_policy(fixed, pol)
    for n, m in net.mixed_layers().items():  # the same quantizer scales as the chosen candidates
        q = fixed.get_submodule(n)
        w, a = choice[n]
        q.weight_quantizer.load_state_dict(m.wq[m.w_bits.index(w)].state_dict())
        q.input_quantizer.load_state_dict(m.aq[m.a_bits.index(a)].state_dict())
    net.eval()
    fixed.eval()
    with torch.no_grad():
        out_net, out_fixed = net(x), fixed(x)
    assert torch.equal(out_net, out_fixed)


def test_swap_by_name_and_parameters_split():
    net = tiny_supernet("tinyresnet")
    assert net.edges == ["conv1", "fc"]
    assert all(isinstance(net.model.get_submodule(n), (MixedConv2d, MixedLinear)) for n in net.searched)
    assert not isinstance(net.model.get_submodule("conv1"), MixedConv2d)
    assert "layer1.1.downsample.0" in net.searched
    arch = {id(p) for p in net.arch_parameters()}
    assert len(arch) == 2 * len(net.searched)
    assert not arch & {id(p) for p in net.weight_parameters()}
    # the quantizer of each candidate spans a grid fitted to the weights (MSE init), not LSQ's default
    m = net.mixed_layers()["layer1.0.conv1"]
    amax = m.weight.detach().abs().amax(dim=(1, 2, 3))
    assert torch.all(m.wq[-1].step() * m.wq[-1].qmax <= amax * 1.0001)


def test_expected_cost_is_a_ratio_of_w8a8_and_differentiable():
    net = tiny_supernet()
    net.set_temperature(1.0)
    mean = sum((2, 3, 4, 6, 8)) / 5
    c = net.expected_cost()
    assert c.item() == pytest.approx(mean * mean / 64, rel=1e-6)
    c.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())
    _force(net, {n: (8, 8) for n in net.searched})
    assert net.expected_cost().item() == pytest.approx(1.0)
    pol = net.derive_policy()
    assert pol.cost["bitops_vs_w8a8"] == pytest.approx(1.0)
    assert pol.layers["conv1"].weight_bits == 8 and pol.layers["fc"].act_bits == 8
    validate_policy(pol, net.model, costs=net.costs)


def test_tensorrt_narrows_unsigned_a8_to_a7_and_policy_runs_there():
    net = tiny_supernet(target="tensorrt")
    for n, m in net.mixed_layers().items():
        assert m.a_bits == ((2, 3, 4, 6, 8) if net.costs[n].input_signed else (2, 3, 4, 6, 7)), n
    _force(net, {n: (8, max(m.a_bits)) for n, m in net.mixed_layers().items()})
    pol = net.derive_policy()
    assert pol.target == "tensorrt"
    assert pol.layers["fc"].act_bits == 7 and not pol.layers["fc"].act_signed  # an unsigned edge layer
    validate_policy(pol, net.model, costs=net.costs)


def test_empty_candidate_set_names_the_layer():
    with pytest.raises(UnsupportedTargetError, match="layer conv2: no candidate unsigned activation"):
        from asga_deploy.cost import layer_costs
        from asga_deploy.models import create_model, edge_layers
        from asga_deploy.search.supernet import Supernet

        m = create_model("tinynet", 10, 1)
        x = torch.randn(4, 1, 12, 12)
        Supernet.build(m, "tinynet", layer_costs(m, (1, 12, 12), example=x), x, (4,), (8,), "tensorrt",
                       edge_layers(m), replace_unsupported=False)


@pytest.mark.parametrize("bits", [(1, 4), (4, 9), ()])
def test_candidate_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(PolicyError, match="2..8"):
        tiny_supernet(bits=bits)


@pytest.mark.parametrize("model", ["tinynet", "tinydw"])
def test_fused_mixture_matches_the_sum_of_quantizers(model):
    from asga_deploy.search.mixed import _MixedMixin

    net = tiny_supernet(model)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_(0, 0.5)
    x = torch.randn(6, 1, 12, 12, requires_grad=True)
    grads, outs = [], []
    for fused in (True, False):
        _MixedMixin.fused = fused
        try:
            net.zero_grad()
            x.grad = None
            out = net(x)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        finally:
            _MixedMixin.fused = True
        outs.append(out.detach())
        grads.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in net.named_parameters()
                                               if p.grad is not None}})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k
