"""Fake quantization: LSQ quantizers, quantized layers, policy application, calibration, BN folding."""

from .apply import apply_policy, calibrate, fold_bn, quantized_layers
from .modules import QuantConv2d, QuantLinear
from .quantizers import FakeQuantizer, qrange

__all__ = ["FakeQuantizer", "QuantConv2d", "QuantLinear", "apply_policy", "calibrate", "fold_bn",
           "qrange", "quantized_layers"]
