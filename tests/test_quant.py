"""Quantizer grids, STE and step-size gradients, MSE calibration, exact BatchNorm folding."""

import pytest
import torch
from torch import nn

from asga_deploy.models import create_model
from asga_deploy.policy import uniform_policy
from asga_deploy.quant import FakeQuantizer, QuantConv2d, apply_policy, calibrate, fold_bn, qrange
from asga_deploy.quant.apply import activation_quantizers


@pytest.mark.parametrize("bits", range(2, 9))
def test_grids_per_bit_width(bits):
    assert qrange(bits, signed=False) == (0, 2**bits - 1)
    assert qrange(bits, signed=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qrange(bits, signed=True, narrow=True) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    q = FakeQuantizer(bits, signed=True, narrow=True, channels=3)
    q.scale.data = torch.tensor([0.1, 0.2, 0.05])
    w = torch.randn(3, 4, 3, 3) * 3
    codes = torch.round(q(w) / q.scale.view(-1, 1, 1, 1))
    assert codes.abs().max() <= 2 ** (bits - 1) - 1
    assert torch.equal(q(w), q.integer(w).float() * q.scale.view(-1, 1, 1, 1))
    u = FakeQuantizer(bits, signed=False)
    u.scale.data.fill_(0.1)
    y = u(torch.linspace(-1, 30, 100000))
    assert y.min() == 0 and torch.isclose(y.max(), torch.tensor(0.1 * (2**bits - 1)))
    assert len(torch.unique(y)) == 2**bits  # every level used, no more


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="outside 2..8"):
        FakeQuantizer(9, signed=True)
    with pytest.raises(ValueError):
        qrange(1, signed=False)


def test_ste_and_lsq_step_gradient():
    q = FakeQuantizer(4, signed=True)
    q.scale.data.fill_(0.5)
    x = torch.tensor([0.3, -0.74, 10.0, -10.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    # STE: identity inside the range, zero where clipped
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # LSQ: d/ds = round(x/s) - x/s inside, qmin/qmax outside, times g = 1/sqrt(N*qmax)
    g = 1 / (4 * 7) ** 0.5
    expected = ((round(0.6) - 0.6) + (round(-1.48) + 1.48) + 7 + (-8)) * g
    assert q.scale.grad.item() == pytest.approx(expected, rel=1e-5)


def test_init_mse_beats_max_scaling_at_8_bits_and_clips_at_2_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for bits in (2, 8):
        q = FakeQuantizer(bits, signed=True, narrow=True, channels=16)
        q.init_mse(w)
        err = ((q(w) - w) ** 2).mean()
        qmax = 2 ** (bits - 1) - 1
        q2 = FakeQuantizer(bits, signed=True, narrow=True, channels=16)
        q2.scale.data = w.abs().amax(1) / qmax
        assert err <= ((q2(w) - w) ** 2).mean() + 1e-12
        if bits == 2:  # the MSE-optimal 2-bit grid clips well inside max|w|
            assert (q.scale * qmax < w.abs().amax(1) * 0.9).all()


def test_calibrate_sets_every_activation_scale():
    torch.manual_seed(0)
    m = create_model("tinynet", 10, 1)
    apply_policy(m, uniform_policy("tinynet", 4, 4, target="sim"))
    assert calibrate(m, [torch.randn(8, 1, 28, 28)]) == len(activation_quantizers(m))
    assert all(bool(q.initialized) for q in activation_quantizers(m).values())


@pytest.mark.parametrize("name", ["tinynet", "tinydw"])
def test_bn_folding_is_exact(name):
    torch.manual_seed(0)
    m = create_model(name, 10, 1)
    apply_policy(m, uniform_policy(name, 4, 8, target="sim"))
    x = torch.randn(16, 1, 28, 28)
    m.train()
    for _ in range(3):  # non-trivial running statistics
        m(x)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.weight.uniform_(-1.5, 1.5)  # negative gammas too: |c| must fold into the scale
            bn.bias.uniform_(-0.5, 0.5)
    calibrate(m, [x])
    m.eval()
    before = m(x)
    pairs = fold_bn(m)
    assert len(pairs) == 3 and not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert torch.allclose(m(x), before, atol=1e-5)


def test_folding_commutes_with_weight_quantization():
    torch.manual_seed(1)
    conv = QuantConv2d.from_float(nn.Conv2d(4, 6, 3, bias=False), 3, 8, False)
    c = torch.tensor([0.5, -2.0, 1.3, 0.7, -0.1, 3.0]).view(-1, 1, 1, 1)
    qw = conv.quantized_weight().detach()
    conv.weight.data.mul_(c)
    conv.weight_quantizer.scale.data.mul_(c.flatten().abs())
    assert torch.allclose(conv.quantized_weight(), c * qw, atol=1e-6)


def test_onnx_mode_divides_by_the_step_as_quantizelinear_does():
    """torch's fake_quantize ops multiply by 1/s: near a rounding tie they disagree with QuantizeLinear (x / s)."""
    q = FakeQuantizer(8, signed=False)
    q.scale.data.fill_(0.3)
    x = (torch.arange(0, 256, dtype=torch.float32) + 0.5) * torch.tensor(0.3)  # every value next to a tie
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)])
    s = q.step().detach()
    expected = torch.clamp(torch.round(x / s), 0, 255) * s
    q.eval()
    assert torch.equal(q(x), expected)  # the training forward
    q.onnx_mode = True
    assert torch.equal(q(x), expected)  # the export reference: the same function
    old = torch.fake_quantize_per_tensor_affine(x, float(s), 0, 0, 255)
    assert not torch.equal(old, expected)  # what the reference computed before


def test_onnx_mode_weights_per_channel_match_the_exported_codes():
    torch.manual_seed(0)
    q = FakeQuantizer(5, signed=True, narrow=True, channels=4)
    w = torch.randn(4, 3, 3, 3)
    q.init_mse(w)
    q.onnx_mode = True
    assert torch.equal(q(w), q.integer(w).float() * q.step().detach().view(-1, 1, 1, 1))
