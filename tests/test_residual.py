"""Deploy quantizers for ONNX Runtime (residual Adds, conv outputs): placement, state dict, function."""

from __future__ import annotations

import copy

import pytest
import torch

from asga_deploy.models import create_model
from asga_deploy.policy import uniform_policy
from asga_deploy.quant import apply_policy, calibrate, fold_bn
from asga_deploy.quant.apply import activation_quantizers
from asga_deploy.quant.residual import deploy_quantizers


def _quantized(name: str, target: str = "ort", w: int = 8, a: int = 8):
    pol = uniform_policy(name, w, a, target)
    model = create_model(name, 10, pol.cost["input_shape"][0])
    keys = set(model.state_dict())
    recs = apply_policy(model, pol)
    return model, pol, keys, recs


def test_tinyresnet_gets_quantizers_around_each_add():
    model, pol, _, recs = _quantized("tinyresnet")
    roles = [(r["role"], r["after"], r["signed"]) for r in recs]
    # conv2 outputs (BN folded later) enter the Adds signed; each Add leaves through its ReLU unsigned
    assert ("conv_output", "layer1.0.bn2", True) in roles
    assert ("conv_output", "layer1.1.bn2", True) in roles
    assert ("conv_output", "layer1.1.downsample.1", True) in roles
    assert [r["after"] for r in recs if r["role"] == "add_output"] == ["layer1.0.relu", "layer1.1.relu"]
    assert all(not r["signed"] for r in recs if r["role"] == "add_output")
    # the stem's output feeds a conv and the first Add: one shared quantizer, no second one on the Add
    assert ("conv_output", "relu", False) in roles
    assert not [r for r in recs if r["role"] == "add_input"]
    own = {r["name"] for r in recs if r["role"] != "tied_input"}
    assert set(deploy_quantizers(model)) == own
    assert all(q.bits == 8 for q in deploy_quantizers(model).values())
    # 8-bit inputs of the convs after a deploy quantizer share it: one scale per tensor, no requantization
    tied = {r["name"]: r["shares"] for r in recs if r["role"] == "tied_input"}
    assert tied == {"layer1.0.conv1.input_quantizer": "deploy_quant.conv1_out",
                    "layer1.1.downsample.0.input_quantizer": "deploy_quant.add_out",
                    "layer1.1.conv1.input_quantizer": "deploy_quant.add_out"}
    for name, shared in tied.items():
        assert model.get_submodule(name) is model.get_submodule(shared)


def test_state_dict_keys_of_existing_modules_unchanged():
    ref = _quantized("tinyresnet", "sim")[0]
    model = _quantized("tinyresnet", "ort")[0]
    old, new = set(ref.state_dict()), set(model.state_dict())
    assert old <= new
    assert all(k.startswith("deploy_quant.") for k in new - old)


def test_sim_gets_none_and_a_policy_can_switch_them_off():
    model, pol, _, recs = _quantized("tinyresnet", "sim", 8, 7)
    assert not deploy_quantizers(model) and recs == [] and "quantizers" not in pol.deploy
    pol = uniform_policy("tinyresnet", 8, 7, "tensorrt")
    pol.deploy = {"residual_quant": False}
    model = create_model("tinyresnet", 10, 1)
    assert apply_policy(model, pol) == [] and not deploy_quantizers(model)


def test_tensorrt_quantizes_the_residual_input_of_each_add_signed():
    """NVIDIA's QAT rule: a Q/DQ on the residual branch, none on the conv output the Add fuses into."""
    model, pol, _, recs = _quantized("tinyresnet", "tensorrt", 8, 7)
    assert [(r["role"], r["before"], r["signed"]) for r in recs] == [("add_input", "add", True),
                                                                     ("add_input", "add_1", True)]
    # block 0: identity (after the stem's ReLU); block 1: both inputs are conv outputs, the projection is quantized
    assert [r["after"] for r in recs] == ["relu", "layer1.1.downsample.1"]
    assert all(q.signed and q.bits == 8 for q in deploy_quantizers(model).values())
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    calibrate(model, [x])
    with torch.no_grad():
        assert model.eval()(x).shape == (4, 10)


def test_quantizers_are_in_the_forward_calibrated_and_fold_bn_works():
    torch.manual_seed(0)
    model = _quantized("tinyresnet")[0]
    x = torch.randn(16, 1, 28, 28)
    n = calibrate(model, [x])
    assert n == len(activation_quantizers(model)) == 7 + 6 - 3  # layer inputs + deploy quantizers - shared
    seen = []
    hooks = [q.register_forward_hook(lambda m, i, o: seen.append(m)) for q in deploy_quantizers(model).values()]
    model.eval()
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 6 + 3  # each deploy quantizer once, the shared ones again as layer inputs
    twin = copy.deepcopy(model)  # the instance forward follows the copy
    with torch.no_grad():
        assert torch.equal(twin(x), y)
        fold_bn(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert (model(x) - y).abs().max() < 0.05 * y.abs().max()


def test_plain_chain_gets_one_quantizer_before_the_head():
    _, pol, _, recs = _quantized("tinynet")
    assert [(r["role"], r["after"]) for r in recs] == [("conv_output", "relu")]
    assert "quantizers" not in pol.deploy  # the policy is data: applying it does not change it


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_are_handled_generically(name):
    pol = uniform_policy(name, 8, 8, "ort", num_classes=10, in_chans=3, input_size=32)
    model = create_model(name, 10, 3)
    recs = apply_policy(model, pol, validate=False)
    adds = {r["before"] for r in recs if r["role"] == "add_input"} | {
        r["after"] for r in recs if r["role"] == "conv_output"}
    assert recs and adds
    if name == "resnet18":  # 8 residual Adds, each left through its ReLU; the stem's output before max-pool
        assert len([r for r in recs if r["role"] == "add_output"]) == 8
        assert ("conv_output", "relu") in [(r["role"], r["after"]) for r in recs]
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
