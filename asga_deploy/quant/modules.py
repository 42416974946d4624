"""Quantized Conv2d / Linear: the float layer with a weight quantizer and an input quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import FakeQuantizer


def weight_quantizer(bits: int, out_channels: int) -> FakeQuantizer:
    """Return a symmetric per-output-channel (axis 0) weight quantizer."""
    return FakeQuantizer(bits, signed=True, narrow=True, channels=out_channels, axis=0)


def input_quantizer(bits: int, signed: bool) -> FakeQuantizer:
    """Return a per-tensor activation quantizer (unsigned after a ReLU)."""
    return FakeQuantizer(bits, signed=signed)


def shell_like(layer: nn.Conv2d | nn.Linear, cls: type) -> nn.Module:
    """Return a `cls` instance with layer's hyper-parameters that shares its weight and bias (no copy)."""
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Conv2d):
        m = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **kw)
    else:
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, **kw)
    m.weight, m.bias = layer.weight, layer.bias
    return m


class _QuantMixin:
    weight_quantizer: FakeQuantizer
    input_quantizer: FakeQuantizer
    # set by the export where the input already comes out of a quantizer of the same grid: applying it again
    # changes nothing in torch, but would emit a second identical Q/DQ pair that ONNX Runtime may not fuse
    input_on_grid = False

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input on the layer's activation grid."""
        return x if self.input_on_grid else self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        """Return the fake-quantized weight (on its b-bit grid times the per-channel scale)."""
        return self.weight_quantizer(self.weight)

    def layer_bias(self) -> torch.Tensor | None:
        """Return the bias the layer adds (the export swaps in its INT32 codes behind a DequantizeLinear)."""
        return self.bias

    def extra_repr(self) -> str:
        wq, aq = self.weight_quantizer, self.input_quantizer
        return f"{super().extra_repr()}, W{wq.bits}A{aq.bits}{'s' if aq.signed else 'u'}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d computing conv(Q_a(x), Q_w(W)) + b."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int, act_signed: bool) -> QuantConv2d:
        """Return a quantized copy of conv sharing its parameters."""
        q = shell_like(conv, cls)
        q.weight_quantizer = weight_quantizer(weight_bits, conv.out_channels).to(conv.weight.device)
        q.input_quantizer = input_quantizer(act_bits, act_signed).to(conv.weight.device)
        q.weight_quantizer.init_mse(conv.weight)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.layer_bias())


class QuantLinear(_QuantMixin, nn.Linear):
    """Linear computing Q_a(x) Q_w(W)^T + b."""

    @classmethod
    def from_float(cls, lin: nn.Linear, weight_bits: int, act_bits: int, act_signed: bool) -> QuantLinear:
        """Return a quantized copy of lin sharing its parameters."""
        q = shell_like(lin, cls)
        q.weight_quantizer = weight_quantizer(weight_bits, lin.out_features).to(lin.weight.device)
        q.input_quantizer = input_quantizer(act_bits, act_signed).to(lin.weight.device)
        q.weight_quantizer.init_mse(lin.weight)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.layer_bias())
