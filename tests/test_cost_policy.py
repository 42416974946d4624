"""BitOPs by hand, policy round-trip and every validation error, shipped policies validate."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from asga_deploy.cost import bitops, layer_costs, w8a8_bitops, weight_bytes
from asga_deploy.errors import OutputExistsError, PolicyError, UnknownModelError
from asga_deploy.models import create_model, list_models
from asga_deploy.policy import LayerBits, Policy, uniform_policy, validate_policy

ROOT = Path(__file__).resolve().parent.parent


def test_bitops_one_conv_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    c = layer_costs(net, (3, 10, 10))["0"]
    assert c.macs == 10 * 10 * 8 * 3 * 3 * 3  # H*W*Cout*Cin*k*k
    assert c.params == 8 * 3 * 9
    assert bitops({"0": (4, 2)}, {"0": c}) == c.macs * 8
    assert weight_bytes({"0": (4, 2)}, {"0": c}) == 8 * 27 * 4 / 8
    assert c.input_signed


def test_bitops_depthwise_and_grouped():
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=4))
    c = layer_costs(net, (16, 8, 8))
    assert c["0"].macs == 8 * 8 * 16 * 1 * 9  # one input channel per output channel
    assert c["2"].macs == 8 * 8 * 32 * 4 * 9  # 16/4 inputs per output
    assert not c["2"].input_signed  # after a ReLU
    assert w8a8_bitops(["0", "2"], c) == 64 * (c["0"].macs + c["2"].macs)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean resnet20,"):
        create_model("resnet-20")


@pytest.mark.parametrize("name", ["tinynet", "smallcnn", "resnet20", "resnet18-proxy", "mobilenet_v2-proxy"])
def test_proxy_and_zoo_models_run(name):
    m = create_model(name, 10, 3)
    size = 32
    assert m(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_proxy_keeps_searchable_layer_names():
    from asga_deploy.models import quantizable_layers

    for full in ("resnet18", "mobilenet_v2"):
        assert quantizable_layers(create_model(full, 10)) == quantizable_layers(create_model(f"{full}-proxy", 10))


def test_round_trip_and_no_overwrite(tmp_path):
    pol = uniform_policy("tinynet", 4, 2, target="tensorrt")
    p = pol.save(tmp_path / "p.json")
    back = Policy.load(p)
    assert back.to_dict() == json.loads(json.dumps(pol.to_dict()))
    assert back.diff(pol) == []
    with pytest.raises(OutputExistsError, match="--force"):
        pol.save(p)
    pol.save(p, force=True)
    assert pol.cost["bitops_vs_w8a8"] == pytest.approx(4 * 2 / 64)


def test_tensorrt_uniform_uses_7_bit_unsigned():
    pol = uniform_policy("tinynet", 8, 8, target="tensorrt")
    assert {b.act_bits for n, b in pol.layers.items() if not b.act_signed} == {7}


def _load_dict(tmp_path, d):
    p = tmp_path / "x.json"
    p.write_text(json.dumps(d))
    return Policy.load(p)


def test_every_validation_error_reported_together(tmp_path):
    d = uniform_policy("tinynet", 4, 4, target="tensorrt").to_dict()
    d["layers"]["conv9"] = {"weight_bits": 4, "act_bits": 4, "act_signed": False}  # unknown layer
    del d["layers"]["conv3"]  # missing layer
    d["layers"]["conv2"]["weight_bits"] = 9  # out of range
    d["layers"]["fc"] = {"weight_bits": 8, "act_bits": 8, "act_signed": False}  # tensorrt: unsigned 8
    d["layers"]["conv1"]["act_signed"] = False  # conv1 sees signed input
    pol = _load_dict(tmp_path, d)
    with pytest.raises(PolicyError) as e:
        validate_policy(pol, create_model("tinynet", 10, 1), "x.json")
    msg = str(e.value)
    for frag in ("conv9 is not", "missing from the policy: conv3", "conv2: weight_bits=9 outside 2..8",
                 "fc: target tensorrt cannot run unsigned act_bits=8", "conv1: act_signed=false"):
        assert frag in msg


def test_malformed_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(p)
    with pytest.raises(PolicyError, match="newer than this"):
        _load_dict(tmp_path, {"schema": "asga-policy/2", "model": "x", "target": "ort", "layers": {}})
    with pytest.raises(PolicyError, match="weight_bits"):
        _load_dict(tmp_path, {"schema": "asga-policy/1", "model": "tinynet", "target": "ort",
                              "layers": {"conv1": {"weight_bits": "4", "act_bits": 4, "act_signed": True}}})
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "nope.json")


def test_both_float_and_quantized_is_an_error():
    pol = uniform_policy("tinynet", 4, 4)
    pol.float_layers.append("conv2")
    with pytest.raises(PolicyError, match="both"):
        validate_policy(pol, create_model("tinynet", 10, 1))
    assert pol.layers["conv2"] == LayerBits(4, 4, False)


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_policy_validates(path):
    pol = Policy.load(path)
    shape = pol.cost["input_shape"]
    model = create_model(pol.model, pol.cost.get("num_classes", 10), shape[0])
    validate_policy(pol, model, str(path))
    assert pol.model in list_models()
