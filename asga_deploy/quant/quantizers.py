"""LSQ fake quantizers (Esser et al. 2020) with a straight-through estimator, zero point 0.

Grids (all subsets of the INT8 / UINT8 grid of the same scale, so export is exact):
  weights, symmetric per output channel:  q in [-(2^(b-1) - 1), 2^(b-1) - 1]
  signed activations, per tensor:         q in [-2^(b-1), 2^(b-1) - 1]
  unsigned activations (after a ReLU):    q in [0, 2^b - 1]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..targets import BITS_RANGE

CLIP_FRACTIONS = torch.linspace(0.05, 1.0, 96)


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Return (qmin, qmax) of a b-bit grid; narrow=True gives the symmetric weight grid."""
    lo, hi = BITS_RANGE
    if not lo <= bits <= hi:
        raise ValueError(f"bits={bits} outside {lo}..{hi}")
    if not signed:
        return 0, 2**bits - 1
    return (-(2 ** (bits - 1)) + (1 if narrow else 0)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ONNX QuantizeLinear) with an identity gradient."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Return x with its gradient scaled by g (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


class FakeQuantizer(nn.Module):
    """Learned-step-size fake quantizer: x -> s * clamp(round(x / s), qmin, qmax)."""

    def __init__(self, bits: int, signed: bool, narrow: bool = False, channels: int | None = None,
                 axis: int = 0):
        super().__init__()
        self.bits, self.signed, self.narrow, self.axis = bits, signed, narrow, axis
        self.qmin, self.qmax = qrange(bits, signed, narrow)
        self.per_channel = channels is not None
        self.scale = nn.Parameter(torch.ones(channels if channels is not None else 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.onnx_mode = False  # forward through torch.fake_quantize_* ops (they export to Q/DQ)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, q=[{self.qmin}, {self.qmax}], {kind}"

    def _shaped(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return s.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return s.reshape(shape)

    def step(self) -> torch.Tensor:
        """Return the positive step size(s), detached-free (gradients flow)."""
        return self.scale.abs().clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_calibrating", False):
            return x
        if self.onnx_mode:
            return self.forward_onnx(x)
        n = x.numel() / (self.scale.numel() if self.per_channel else 1)
        g = 1.0 / math.sqrt(max(n * self.qmax, 1.0))
        s = self._shaped(grad_scale(self.step(), g), x)
        return round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s

    def forward_onnx(self, x: torch.Tensor) -> torch.Tensor:
        """Same function through a clamp to the b-bit range and an 8-bit fake_quantize op.

        torch's ONNX exporters only take the (0,255), (-128,127) and (0,127) fake-quant ranges:
        clamping to the b-bit range first and then quantizing on the 8-bit grid of the same scale
        is bit-identical on the values that matter and lowers to Clip -> QuantizeLinear -> DequantizeLinear.
        """
        s = self.step().detach()
        lo8, hi8 = (0, 255) if not self.signed else (-128, 127)
        if (self.qmin, self.qmax) != (lo8, hi8):
            x = torch.clamp(x, self.qmin * self._shaped(s, x), self.qmax * self._shaped(s, x)) \
                if self.per_channel else torch.clamp(x, self.qmin * float(s), self.qmax * float(s))
        if self.per_channel:
            zp = torch.zeros(s.numel(), dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(x, s, zp, self.axis, lo8, hi8)
        return torch.fake_quantize_per_tensor_affine(x, float(s), 0, lo8, hi8)

    @torch.no_grad()
    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """Return the integer codes round(clamp(x / s)) as int32 (what export stores)."""
        s = self._shaped(self.step(), x)
        return torch.clamp(torch.round(x / s), self.qmin, self.qmax).to(torch.int32)

    @torch.no_grad()
    def init_mse(self, x: torch.Tensor, fractions: torch.Tensor = CLIP_FRACTIONS) -> torch.Tensor:
        """Set the step size by an MSE search over clip fractions of max|x| (per channel or tensor)."""
        x = x.detach().float()
        if self.per_channel:
            flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        else:
            flat = x.reshape(1, -1)
            if flat.shape[1] > 1_000_000:  # a fixed-seed subsample keeps calibration cheap and repeatable
                idx = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:1_000_000]
                flat = flat[:, idx]
        amax = (flat.abs() if self.signed else flat.clamp_min(0)).amax(1).clamp_min(1e-8)
        top = self.qmax if self.signed or self.qmin == 0 else -self.qmin
        best_err = torch.full_like(amax, float("inf"))
        best = amax / top
        for f in fractions.tolist():
            s = (amax * f / top).unsqueeze(1)
            err = ((torch.clamp(torch.round(flat / s), self.qmin, self.qmax) * s - flat) ** 2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s.squeeze(1), best)
        self.scale.copy_(best if self.per_channel else best.reshape(1))
        self.initialized.fill_(True)
        return self.scale
