"""Zoo models whose layers differ: ResNet-20 width variants and a MobileNetV2 for 28-32 px inputs.

Each must work wherever a model is used: registry and `asga models`, uniform policies, fake-quant with
exact BatchNorm folding, the search supernet, and the exact ONNX export (depthwise convs included).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asga_deploy.cost import layer_costs
from asga_deploy.models import create_model, edge_layers, list_models, quantizable_layers
from asga_deploy.policy import uniform_policy, validate_policy
from asga_deploy.quant import apply_policy, calibrate, fold_bn

from .test_search_helpers import tiny_supernet

NEW = ["resnet20-w0.5", "resnet20-w0.25", "mobilenetv2-cifar", "mobilenetv2-cifar-w0.5"]
MBV2 = ["mobilenetv2-cifar", "mobilenetv2-cifar-w0.5"]


def test_registered_and_listed(cli):
    assert set(NEW) <= set(list_models())
    res = cli("models")
    assert res.exit_code == 0
    for name in NEW:
        assert name in res.stdout


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("chans,size", [(1, 28), (3, 28), (1, 32), (3, 32)])
def test_forward_shapes(name, chans, size):
    m = create_model(name, num_classes=7, in_chans=chans).eval()
    with torch.no_grad():
        assert m(torch.randn(2, chans, size, size)).shape == (2, 7)


def test_width_variants_keep_resnet20_layer_names_and_scale_channels():
    names = quantizable_layers(create_model("resnet20"))
    for name, width in (("resnet20-w0.5", 8), ("resnet20-w0.25", 4)):
        m = create_model(name, 10, 1)
        assert quantizable_layers(m) == names  # a resnet20 policy maps onto it by name
        assert [m.get_submodule(f"layer{i}.0.conv1").out_channels for i in (1, 2, 3)] == [width, 2 * width, 4 * width]


def test_mobilenetv2_layer_names_are_stable():
    names = quantizable_layers(create_model("mobilenetv2-cifar", 10, 3))
    assert quantizable_layers(create_model("mobilenetv2-cifar-w0.5", 100, 1)) == names
    # pinned: policies are keyed by these names, a refactor must not move them
    assert names[:6] == ["conv_stem", "blocks.0.0.conv_dw", "blocks.0.0.conv_pwl", "blocks.1.0.conv_pw",
                         "blocks.1.0.conv_dw", "blocks.1.0.conv_pwl"]
    assert names[-3:] == ["blocks.4.1.conv_pwl", "conv_head", "fc"] and len(names) == 35
    m = create_model("mobilenetv2-cifar", 10, 3)
    dw = [n for n in names if n.endswith("conv_dw")]
    assert len(dw) == 11
    assert all(m.get_submodule(n).groups == m.get_submodule(n).in_channels > 1 for n in dw)
    assert edge_layers(m) == ["conv_stem", "fc"]


def test_mobilenetv2_residuals_where_shapes_match():
    blocks = [b for stage in create_model("mobilenetv2-cifar").blocks for b in stage]
    # stage heads change width or stride (no add); every later block of a stage adds its input
    assert [b.use_res for b in blocks] == [True, False, True, False, True, True, False, True, True, False, True]


def test_depthwise_macs_and_signed_inputs():
    m = create_model("mobilenetv2-cifar", 10, 3)
    c = layer_costs(m, (3, 32, 32))
    assert c["blocks.1.1.conv_dw"].macs == 16 * 16 * 144 * 9  # one input channel per output: groups counted
    assert not c["blocks.1.1.conv_dw"].input_signed  # after ReLU6
    assert c["blocks.1.1.conv_pw"].input_signed  # a linear bottleneck's output
    assert not c["blocks.1.1.conv_pwl"].input_signed


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("target", ["sim", "ort", "tensorrt"])
def test_uniform_policy_validates(name, target):
    pol = uniform_policy(name, 4, 4, target, in_chans=1, input_size=28)
    validate_policy(pol, create_model(name, 10, 1))
    assert list(pol.layers) == quantizable_layers(create_model(name, 10, 1))
    assert pol.cost["bitops_vs_w8a8"] == pytest.approx(16 / 64)


@pytest.mark.parametrize("name,target", [("resnet20-w0.25", "ort"), ("mobilenetv2-cifar-w0.5", "sim"),
                                         ("mobilenetv2-cifar-w0.5", "ort")])
def test_bn_folding_is_exact(name, target):
    torch.manual_seed(0)
    m = create_model(name, 10, 3)
    apply_policy(m, uniform_policy(name, 4, 8, target=target, in_chans=3, input_size=28))
    x = torch.randn(16, 3, 28, 28)
    m.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            m(x)
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.weight.uniform_(-1.5, 1.5)  # negative gammas too: |c| must fold into the scale
            bn.bias.uniform_(-0.5, 0.5)
    calibrate(m, [x])
    m.eval()
    seen: dict[str, torch.Tensor] = {}
    def keep(name):  # clones: in-place ReLUs would overwrite what was seen
        return lambda _m, i, o: seen.update({name + ":in": i[0].clone(), name + ":out": o.clone()})

    hooks = [mod.register_forward_hook(keep(n)) for n, mod in m.named_modules()
             if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))]
    n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    with torch.no_grad():
        before = m(x)
        for h in hooks:
            h.remove()
        pairs = fold_bn(m)
        after = m(x)
        assert len(pairs) == n_bn and not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
        # layer by layer, on the same input, the folded quantized conv is BN(conv): q(cW) = c q(W)
        for conv, bn in pairs:
            ref = seen[bn + ":out"]
            assert torch.allclose(m.get_submodule(conv)(seen[conv + ":in"]), ref, atol=1e-5 * (1 + ref.abs().max()))
    # end to end, float rounding can move a value that lies on a rounding boundary of a later
    # quantizer by one step (measured: logits within 4e-4 on this 35-layer net); never the class
    assert torch.equal(after.argmax(1), before.argmax(1)) and (after - before).abs().max() < 1e-2


@pytest.mark.parametrize("name", ["resnet20-w0.25", "mobilenetv2-cifar-w0.5"])
def test_supernet_one_hot_equals_fixed_policy_model(name):
    net, float_model, x = tiny_supernet(name, keep_float=True)
    assert net.edges == edge_layers(float_model)
    assert set(net.searched) == set(quantizable_layers(float_model)) - set(net.edges)
    choice = {n: ((2, 3, 4, 6, 8)[i % 5], (8, 6, 4, 3, 2)[i % 5]) for i, n in enumerate(net.mixed_layers())}
    with torch.no_grad():
        for n, m in net.mixed_layers().items():
            w, a = choice[n]
            m.alpha_w.fill_(0).index_fill_(0, torch.tensor(m.w_bits.index(w)), 100.0)
            m.alpha_a.fill_(0).index_fill_(0, torch.tensor(m.a_bits.index(a)), 100.0)
    net.set_temperature(0.01)  # exactly one-hot in float32
    pol = net.derive_policy(choice, edge_bits="float")
    apply_policy(float_model, pol)
    for n, m in net.mixed_layers().items():
        q = float_model.get_submodule(n)
        w, a = choice[n]
        q.weight_quantizer.load_state_dict(m.wq[m.w_bits.index(w)].state_dict())
        q.input_quantizer.load_state_dict(m.aq[m.a_bits.index(a)].state_dict())
    net.eval()
    float_model.eval()
    with torch.no_grad():
        assert torch.equal(net(x), float_model(x))
    net.train()
    net.expected_cost().backward()  # the budget term reaches every layer's bit-width logits
    assert all(m.alpha_w.grad is not None and m.alpha_a.grad is not None for m in net.mixed_layers().values())


# ---------------------------------------------------------------- exact ONNX export

def _mixed_policy(name: str, target: str, chans: int, size: int):
    """A policy with a different (w, a) per searched layer, cycling through 2..8 bits."""
    from asga_deploy.policy import LayerBits, Policy
    from asga_deploy.targets import get_target

    base = uniform_policy(name, 8, 8, target, in_chans=chans, input_size=size)
    layers = dict(base.layers)
    pairs = [(2, 8), (4, 4), (8, 3), (3, 6), (6, 2), (5, 8), (8, 5)]
    for i, n in enumerate(n for n in layers if n not in edge_layers(create_model(name, 10, chans))):
        w, a = get_target(target).clamp_bits(*pairs[i % len(pairs)], layers[n].act_signed)  # ort: 7-bit weights
        layers[n] = LayerBits(w, a, layers[n].act_signed)
    return Policy(name, target, layers, list(base.float_layers), cost=dict(base.cost), provenance={})


EXPORTS = {  # case: (model, w, a, target, in_chans, size, mixed)
    "resnet20w05_w7a8_ort": ("resnet20-w0.5", 8, 8, "ort", 3, 32, False),  # ort: 8-bit weights kept at 7
    "mbv2w05_w7a8_ort_28": ("mobilenetv2-cifar-w0.5", 8, 8, "ort", 1, 28, False),
    "mbv2w05_mixed_ort_32": ("mobilenetv2-cifar-w0.5", 0, 0, "ort", 3, 32, True),
    "mbv2w05_w4a6_trt": ("mobilenetv2-cifar-w0.5", 4, 6, "tensorrt", 3, 32, False),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export every case once, with a parity run on random data; return {case: (report, proto, policy)}."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from asga_deploy.export.ort import ParityConfig
    from asga_deploy.export.run import ExportConfig, run_export

    from .test_export_helpers import make_checkpoint, random_loader

    out = {}
    for case, (name, w, a, target, chans, size, mixed) in EXPORTS.items():
        tmp = tmp_path_factory.mktemp(case)
        pol = (_mixed_policy(name, target, chans, size) if mixed
               else uniform_policy(name, w, a, target, in_chans=chans, input_size=size))
        p, c, pol = make_checkpoint(tmp, name, w, a, target, policy=pol)
        cfg = ExportConfig(str(p), str(c), out_dir=str(tmp / "out"), parity=ParityConfig(images=64))
        rep = run_export(cfg, loader=random_loader((chans, size, size)))
        out[case] = (rep, onnx.load(rep["onnx"]), pol)
    return out


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_parity(exports, case):
    rep, proto, _ = exports[case]
    p = rep["parity"]
    assert p["passed"] and p["top1_agreement"] >= 0.995 and p["images"] == 64
    assert p["max_abs_logit_diff"] < 1e-2
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]


@pytest.mark.parametrize("case", [c for c in EXPORTS if "mbv2" in c])
def test_depthwise_convs_export_grouped_on_their_grid(exports, case):
    import numpy as np
    from onnx import numpy_helper

    _, proto, pol = exports[case]
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    convs = {n.name: n for n in proto.graph.node if n.op_type == "Conv"}
    dw = [n for n in pol.layers if n.endswith("conv_dw")]
    assert len(dw) == 11
    for layer in dw:
        group = next(a.i for a in convs[layer].attribute if a.name == "group")
        codes = inits[f"{layer}.weight_int8"]
        assert group == codes.shape[0] > 1 and codes.shape[1] == 1  # one input channel per filter
        assert np.abs(codes.astype(np.int32)).max() <= 2 ** (pol.layers[layer].weight_bits - 1) - 1


@pytest.mark.parametrize("case", [c for c in EXPORTS if EXPORTS[c][3] == "ort"])
def test_ort_runs_every_layer_on_integer_kernels_bit_identically(exports, case):
    """Depthwise convs, signed linear-bottleneck outputs and the residual Adds they feed included."""
    rep, _, pol = exports[case]
    k = rep["ort_integer_kernels"]
    assert set(k["layers"]) == set(pol.layers) and k["not_integer"] == [] and k["ops_not_integer"] == []
    kernels = {n: v["kernel"] for n, v in k["layers"].items()}
    assert kernels.pop("fc") == "QGemm" and set(kernels.values()) == {"QLinearConv"}
    adds = [v["kernel"] for v in k["ops"].values() if v["op"] == "Add"]
    assert adds == ["QLinearAdd"] * (9 if pol.model.startswith("resnet20") else 7)
    p = rep["parity"]
    assert p["bit_identical"] and p["max_abs_logit_diff"] == 0.0
