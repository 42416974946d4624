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


def _quantize(x: torch.Tensor, s: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Return s * clamp(round(x / s)) (round half to even, a true division as QuantizeLinear's)."""
    return torch.clamp(torch.round(x / s), qmin, qmax) * s


class _ActQDQ(torch.autograd.Function):
    """Per-tensor fake quantization that exports as exactly the Q/DQ nodes described in forward_onnx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, qmin: int, qmax: int, signed: bool, requant8: bool,
                signed_u8: bool):
        return _quantize(x, torch.tensor(scale, dtype=x.dtype), qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale: float, qmin: int, qmax: int, signed: bool, requant8: bool, signed_u8: bool):
        s32 = torch.tensor(scale, dtype=torch.float32)
        s = g.op("Constant", value_t=s32)
        zp = torch.tensor(0, dtype=torch.int8 if signed else torch.uint8)
        if signed and signed_u8:  # the same codes shifted by 128, the form ONNX Runtime's x86 kernels take
            zp = torch.tensor(128, dtype=torch.uint8)
        zp = g.op("Constant", value_t=zp)
        lo8, hi8 = (-128, 127) if signed else (0, 255)

        q = g.op("QuantizeLinear", x, s, zp) if requant8 else None
        if (qmin, qmax) != (lo8, hi8) and requant8:  # the b-bit range on the 8-bit codes: an integer Clip
            shift = 128 if (signed and signed_u8) else 0
            code = torch.uint8 if (signed_u8 or not signed) else torch.int8
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin + shift, dtype=code)),
                     g.op("Constant", value_t=torch.tensor(qmax + shift, dtype=code)))
        elif (qmin, qmax) != (lo8, hi8):  # the b-bit range in float: QuantizeLinear maps its ends to qmin / qmax
            x = g.op("Clip", x, g.op("Constant", value_t=s32 * qmin), g.op("Constant", value_t=s32 * qmax))
        return g.op("DequantizeLinear", q if q is not None else g.op("QuantizeLinear", x, s, zp), s, zp)


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
        self.onnx_mode = False  # exact step, exportable as Q/DQ (forward_onnx)
        self.requant8 = False  # set by the lowering where an 8-bit Q/DQ pair must come first (forward_onnx)
        self.signed_u8 = False  # set by the lowering: a signed grid exported as UINT8, zero point 128

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
        """The same function with the exact step (no LSQ gradient scaling); exports as Q/DQ.

        It divides by the step as QuantizeLinear does (torch's fake_quantize ops multiply by 1/s, which
        disagrees near rounding ties). Per tensor it lowers to [Clip ->] QuantizeLinear -> DequantizeLinear
        on the 8-bit type of the same scale (every b-bit grid is a subset of it); with `requant8` to
        QuantizeLinear -> Clip (on the 8-bit codes) -> DequantizeLinear, so that a conv before it ends in a Q
        and fuses into an integer kernel; with `signed_u8` a signed grid as UINT8 with zero point 128 (what ORT
        converts INT8 to on x86, which it fails to do where the DQ has several consumers: those ops stay float).
        """
        s = self.step().detach()
        if self.per_channel:
            return _quantize(x, self._shaped(s, x), self.qmin, self.qmax)
        return _ActQDQ.apply(x, float(s.reshape(())), self.qmin, self.qmax, self.signed,
                             bool(getattr(self, "requant8", False)), bool(getattr(self, "signed_u8", False)))

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
