"""sum_k p_k * Q_k(x) as ONE autograd node: the same values and LSQ/STE gradients as summing FakeQuantizers.

Why: with five candidates per layer, the separate quantizers' autograd graphs (about 20 elementwise
nodes each, each saving a full activation) cost several times the convolution itself on a CPU. Here the
forward keeps nothing but x, and the backward recomputes each candidate's grid in a few passes.
"""

from __future__ import annotations

import math

import torch

from ..quant.quantizers import FakeQuantizer


def _scale_of(q: FakeQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return (the step as FakeQuantizer.forward computes its value, broadcastable to x) and LSQ's g."""
    n = x.numel() / (q.scale.numel() if q.per_channel else 1)
    g = 1.0 / math.sqrt(max(n * q.qmax, 1.0))
    step = q.scale.detach().abs().clamp_min(1e-8)
    s = (step - step * g) + step * g  # grad_scale's value, bit for bit
    return q._shaped(s, x), g


def _reduce_to(t: torch.Tensor, q: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Sum t over every axis except the quantizer's channel axis (per tensor: over all)."""
    if not q.per_channel:
        return t.sum().reshape(1)
    dims = [d for d in range(x.dim()) if d != q.axis]
    return t.sum(dim=dims)


class _MixQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, quantizers, *scales):
        out = None
        for k, q in enumerate(quantizers):
            s, _ = _scale_of(q, x)
            y = torch.round(torch.clamp(x / s, q.qmin, q.qmax)) * s
            term = probs[k] * y
            out = term if out is None else out + term
        ctx.quantizers = quantizers
        ctx.save_for_backward(x, probs, *scales)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, probs, *scales = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_p = torch.zeros_like(probs)
        grad_scales = []
        for k, (q, raw) in enumerate(zip(ctx.quantizers, scales, strict=False)):
            s, g = _scale_of(q, x)
            v = x / s
            inside = (v > q.qmin) & (v < q.qmax)  # as torch.clamp's backward: no gradient AT a bound
            qv = torch.round(torch.clamp(v, q.qmin, q.qmax))
            grad_p[k] = (grad_out * (qv * s)).sum()
            if grad_x is not None:
                grad_x.add_(grad_out * inside, alpha=float(probs[k]))
            # LSQ: d(s * round_ste(clamp(x / s)))/ds = q - v inside the range, q outside
            ds = _reduce_to(grad_out * (qv - torch.where(inside, v, torch.zeros_like(v))), q, x) * probs[k]
            dscale = ds * g * torch.sign(raw) * (raw.abs() >= 1e-8)
            grad_scales.append(dscale.reshape(raw.shape))
        return (grad_x, grad_p, None, *grad_scales)


def mixed_quantize(x: torch.Tensor, probs: torch.Tensor, quantizers) -> torch.Tensor:
    """Return sum_k probs[k] * quantizers[k](x) with the quantizers' LSQ/STE gradients, as one node."""
    return _MixQuant.apply(x, probs, tuple(quantizers), *[q.scale for q in quantizers])
