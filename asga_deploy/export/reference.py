"""The integer reference: the prepared fake-quant model with its integer node units computed as ONNX Runtime rounds.

A float reference (conv in float, then divide by the output scale) and an integer kernel (exact INT32
accumulator, then multiply by s_x s_w / s_y in float32) disagree on values near a rounding tie, so bit
identity can only be tested against the kernels' own arithmetic (MLAS, x86; the same on AVX2 and
AVX512-VNNI CPUs when no u8 x s8 pair saturates):
  - QLinearConv / QGemm requantization: q = clamp(round_even(f32(acc + bias) * f32(f32(s_x s_w) / s_y)));
  - QGemm with float output (the logits): y = f32(acc + bias) * f32(s_x s_w);
  - QLinearAdd (AVX2 kernel, also used by AVX-512 CPUs): with r = s_in / s_out and the fixed part
    z_c - (r_a z_a + r_b z_b), c = fma(a, r_a, fma(b, r_b, fixed)); q = clamp(round_even(c));
  - QLinearGlobalAveragePool: q = clamp(round_even(f32(sum - z_x N) * f32(s_x / f32(s_y N)))).
Signed activations run as UINT8 with zero point 128 on x86 (ONNX Runtime converts them), which the
formulas above include. Accumulators are computed in float64 (exact for integers below 2^53).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantConv2d, QuantLinear
from ..quant.quantizers import FakeQuantizer
from ..quant.residual import install_forward, trace_model
from .units import Units

INT_ADDS = "int_add"


def _step(q: FakeQuantizer) -> torch.Tensor:
    return q.step().detach().float()


def _u8(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, int]:
    """Return (the UINT8 codes ONNX Runtime holds for a value on q's grid, as float64; the zero point)."""
    zp = 128 if q.signed else 0
    codes = torch.clamp(torch.round(x / _step(q).reshape(())), q.qmin, q.qmax)
    return codes.double() + zp, zp


class IntegerLayer:
    """A quantized conv/linear's forward as an integer kernel: exact accumulator, ONNX Runtime's requantization."""

    def __init__(self, layer: QuantConv2d | QuantLinear, out: FakeQuantizer | None):
        self.layer, self.out = layer, out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, iq = self.layer, self.layer.input_quantizer
        sx, sw = _step(iq).reshape(()), _step(m.weight_quantizer)
        codes = torch.clamp(torch.round(x / sx), iq.qmin, iq.qmax).double()
        w = m.weight_quantizer.integer(m.weight).double()
        if isinstance(m, QuantConv2d):
            acc, shape = F.conv2d(codes, w, None, m.stride, m.padding, m.dilation, m.groups), (1, -1, 1, 1)
        else:
            acc, shape = F.linear(codes, w), (1, -1)
        bias = getattr(m, "bias_int32", None)
        if bias is not None:
            acc = acc + bias.double().reshape(shape)
        grid = (sx * sw).reshape(shape)
        if self.out is None:  # QGemm with float output
            return acc.float() * grid
        sy = _step(self.out).reshape(())
        lo, hi = (-128, 127) if self.out.signed else (0, 255)
        return torch.round(torch.clamp(acc.float() * (grid / sy), lo, hi)) * sy


class IntegerAdd(nn.Module):
    """QLinearAdd of two quantizer outputs into a third quantizer's grid (MLAS's AVX2 kernel, FMA included)."""

    def __init__(self, qa: FakeQuantizer, qb: FakeQuantizer, qc: FakeQuantizer):
        super().__init__()
        self.qa, self.qb, self.qc = qa, qb, qc

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        (ca, za), (cb, zb) = _u8(a, self.qa), _u8(b, self.qb)
        zc = 128 if self.qc.signed else 0
        sc = _step(self.qc).reshape(())
        ra, rb = _step(self.qa).reshape(()) / sc, _step(self.qb).reshape(()) / sc
        fixed = torch.tensor(float(zc), dtype=torch.float32) - (ra * float(za) + rb * float(zb))
        # each fma rounds once: the float64 products and sums here are exact before the float32 rounding
        t = (cb * rb.double() + fixed.double()).float()
        c = (ca * ra.double() + t.double()).float()
        q = torch.clamp(torch.round(c), 0, 255)
        return (q - zc) * sc


class IntegerGlobalPool:
    """A global pooling's forward as QLinearGlobalAveragePool: the exact sum of UINT8 codes, requantized as MLAS."""

    def __init__(self, qin: FakeQuantizer, qout: FakeQuantizer):
        self.qin, self.qout = qin, qout

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        codes, zx = _u8(x, self.qin)
        n = x.shape[-2] * x.shape[-1]
        acc = codes.sum(dim=(-2, -1), keepdim=True) - zx * n
        sx, sy = _step(self.qin).reshape(()), _step(self.qout).reshape(())
        scale = sx / (sy * torch.tensor(float(n), dtype=torch.float32))
        zy = 128 if self.qout.signed else 0
        q = torch.round(torch.clamp(acc.float() * scale, -zy, 255 - zy))
        return q * sy


def integer_reference(model: nn.Module, units: Units, float_kernels: set[str] = frozenset()) -> nn.Module:
    """Return a copy of a prepared model whose units (except those named in float_kernels: layers, add nodes,
    pools that ONNX Runtime left in float) compute as ONNX Runtime's integer kernels do."""
    ref = copy.deepcopy(model).eval()
    adds = [a for a in units.adds if a[0] not in float_kernels]
    if adds:
        graph = trace_model(ref)
        nodes = {n.name: n for n in graph.nodes}
        container = nn.Module()
        for name, qa, qb, qc in adds:
            container.add_module(name, IntegerAdd(*(ref.get_submodule(q) for q in (qa, qb, qc))))
        ref.add_module(INT_ADDS, container)
        for name, *_ in adds:
            node = nodes[name]
            with graph.inserting_after(node):
                new = graph.call_module(f"{INT_ADDS}.{name}", tuple(a for a in node.args if isinstance(a, torch.fx.Node)))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        graph.lint()
        install_forward(ref, graph)
    # instance forwards, not module swaps: the module tree (and every path the forward uses) stays as it is
    for name, out in units.layers.items():
        if name not in float_kernels:
            layer = ref.get_submodule(name)
            layer.forward = IntegerLayer(layer, None if out is None else ref.get_submodule(out))
    for name, qin, qout in units.pools:
        if name not in float_kernels:
            ref.get_submodule(name).forward = IntegerGlobalPool(ref.get_submodule(qin), ref.get_submodule(qout))
    return ref
