"""Exact lowering of a fake-quant model to ONNX QDQ (architecture.md, "Targets ... and exact lowering").

Weights go in as INT8 (or INT4) initializers already on their b-bit grid, per output channel (axis 0),
zero point 0, feeding DequantizeLinear; biases of quantized layers (ONNX Runtime targets) as INT32 codes
on the accumulator grid s_x s_w behind a DequantizeLinear (a Gemm becomes QGemm only so); activations
are per-tensor Q/DQ with the training scale and a float Clip in front below 8 bits, after a plain 8-bit
Q/DQ pair where the producer is a conv or pooling (units.mark_requant), as one QLinearAdd where it
requantizes another unsigned grid and that is exact (requant.fuse_requant). Conv/Gemm nodes are renamed to
their module names, residual Adds and global poolings to theirs, so that ORT's optimized graph and
TensorRT's layer names map back to the policy.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_model
from ..errors import ExportError, UnsupportedTargetError, require
from ..io import atomic_write_bytes
from ..models import model_info
from ..policy import Policy
from ..quant import QuantConv2d, QuantLinear
from ..quant.apply import fold_bn
from ..quant.quantizers import FakeQuantizer
from ..targets import get_target
from .graph import (  # noqa: F401
    fp16_variant,
    guard_float_inputs,
    initializer_identities,
    int4_weights,
    name_layers,
    name_ops,
    prune,
    size_report,
)
from .requant import fuse_requant
from .units import mark_requant, quantize_pooling, relax_relu6, share_quantizers

INT4_OPSET = 21
DEFAULT_OPSET = 17  # QDQ per-channel needs >= 13; 17 is inside TensorRT's parser range and fuses in ORT
# leaf modules the exporter knows how to lower (parameter-free torch.nn modules are left to torch.onnx)
HANDLED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Identity, FakeQuantizer)


@dataclass(frozen=True)
class LoweringConfig:
    """How to lower: target backend, opset (None: the target's default), INT4 weight storage, FP16 floats."""

    target: str = "ort"
    opset: int | None = None
    int4_storage: bool = False
    fp16_float_layers: bool = False  # tensorrt: float layers FP16 in the graph (TensorRT 11 strong typing)


def resolve_opset(cfg: LoweringConfig) -> int:
    """Return the opset to export with, or raise UnsupportedTargetError for an impossible choice."""
    target = get_target(cfg.target)
    opset = cfg.opset if cfg.opset is not None else (INT4_OPSET if cfg.int4_storage else target.default_opset)
    if opset < 13:
        raise UnsupportedTargetError(f"opset {opset} has no per-channel QDQ; use 13 or newer")
    if cfg.int4_storage and not target.int4_storage:
        why = ("ONNX Runtime's Conv selector rejects INT4 weights, so every <= 4-bit conv would run as a float "
               "Conv (slower than INT8); target sim exports INT4 storage for study" if target.integer_kernels_required
               else "its convolutions take INT8 weights (INT4 is weight-only for GEMM)")
        raise UnsupportedTargetError(f"--int4-storage is not for {target.name}: {why}")
    if cfg.int4_storage and opset < INT4_OPSET:
        raise UnsupportedTargetError(f"--int4-storage needs opset {INT4_OPSET} or newer, got {opset}")
    target.check_opset(opset)
    if cfg.fp16_float_layers and target.float_dtype != "fp16":
        raise UnsupportedTargetError(f"--fp16 (FP16 float layers) is an export option of targets whose float "
                                     f"layers run FP16, not of {target.name}")
    return opset


def check_representable(model: nn.Module, policy: Policy, target_name: str) -> None:
    """Raise UnsupportedTargetError naming every layer and quantizer the target cannot run."""
    t = get_target(target_name)
    bad = [f"{n} (W{b.weight_bits}A{b.act_bits}{'s' if b.act_signed else 'u'}: {why})"
           for n, b in policy.layers.items() if (why := t.check(b.weight_bits, b.act_bits, b.act_signed))]
    if t.signed_int8_only:
        bad += [f"{n} (unsigned 8-bit deploy quantizer)" for n, q in model.named_modules()
                if isinstance(q, FakeQuantizer) and n.startswith("deploy_quant.") and not q.signed
                and q.bits == 8]
    if bad:
        raise UnsupportedTargetError(f"target {t.name} cannot represent: {'; '.join(bad)}"
                                     + (" (it takes signed INT8 only: use act_bits <= 7 after a ReLU)"
                                        if t.signed_int8_only else ""))


def check_layer_types(model: nn.Module) -> None:
    """Raise ExportError naming leaf modules with parameters that the exporter does not handle."""
    bad = []
    for name, m in model.named_modules():
        if name.endswith("weight_quantizer") or name.endswith("input_quantizer") or list(m.children()):
            continue
        has_state = any(True for _ in m.parameters(recurse=False)) or any(
            b is not None and b.numel() > 1 for b in m.buffers(recurse=False))
        if has_state and not isinstance(m, HANDLED):
            bad.append(f"{name} ({type(m).__name__})")
        elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            bad.append(f"{name} (Conv2d padding_mode={m.padding_mode!r})")
    if bad:
        raise ExportError(f"the exporter does not handle these layers: {', '.join(bad)} "
                          f"(handled: {', '.join(t.__name__ for t in HANDLED)} and parameter-free torch.nn modules)")


def prepare_model(model: nn.Module, target: str = "ort", round_bias: bool = True) -> nn.Module:
    """Return an eval copy with BN folded and every quantizer in onnx_mode (the float parity reference).

    round_bias puts each quantized layer's bias on its integer accumulator grid (input scale x weight
    scale, per channel) and keeps the codes (`bias_int32`): integer kernels add an INT32 bias, so the
    exported function has that bias. For targets with quantized pooling a copy of the classifier's input
    quantizer follows the global pooling (same grid: an exact no-op in torch); with fused requantization
    sub-8-bit quantizers after a conv get their 8-bit Q/DQ pair (units.mark_requant).
    """
    tgt = get_target(target)
    m = copy.deepcopy(model).cpu().eval()
    fold_bn(m)
    for q in m.modules():
        if isinstance(q, FakeQuantizer):
            q.onnx_mode = True
            q.signed_u8 = tgt.signed_as_u8
    if round_bias:
        with torch.no_grad():
            for layer in m.modules():
                if isinstance(layer, (QuantConv2d, QuantLinear)) and layer.bias is not None:
                    grid = (layer.input_quantizer.step().float().reshape(()) * layer.weight_quantizer.step().float())
                    codes = torch.round(layer.bias / grid).clamp(-(2**31), 2**31 - 1)
                    layer.register_buffer("bias_int32", codes.to(torch.int32))
                    layer.bias.copy_(codes * grid)
    if tgt.quantized_pooling:
        quantize_pooling(m)
    share_quantizers(m)
    if tgt.fused_requant:
        relax_relu6(m)
        mark_requant(m)
    return m


class _WeightDQ(torch.autograd.Function):
    """Dequantized weight codes * scale; exports as DequantizeLinear(INT8 initializer, scale, 0, axis=0)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.reshape((-1,) + (1,) * (codes.dim() - 1))

    @staticmethod
    def symbolic(g, codes, scale, zp):
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=0)


class _BiasDQ(torch.autograd.Function):
    """INT32 bias codes * (s_x s_w); exports as DequantizeLinear(INT32 initializer, scale, axis=0)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale

    @staticmethod
    def symbolic(g, codes, scale):
        return g.op("DequantizeLinear", codes, scale, axis_i=0)


def _patch_layers(model: nn.Module, int32_bias: bool) -> dict[str, nn.Module]:
    """Give each quantized layer INT8 weight codes behind a DQ (and its INT32 bias behind one); return them."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    for m in layers.values():
        wq = m.weight_quantizer
        m.register_buffer("weight_int8", wq.integer(m.weight).to(torch.int8))
        m.register_buffer("weight_scale", wq.step().detach().clone().float())
        m.register_buffer("weight_zero_point", torch.zeros(m.weight.shape[0], dtype=torch.int8))
        m.quantized_weight = (lambda mod=m: _WeightDQ.apply(mod.weight_int8, mod.weight_scale,
                                                            mod.weight_zero_point))
        if int32_bias and getattr(m, "bias_int32", None) is not None:
            grid = m.input_quantizer.step().detach().float().reshape(()) * wq.step().detach().float()
            m.register_buffer("bias_scale", grid)
            m.layer_bias = (lambda mod=m: _BiasDQ.apply(mod.bias_int32, mod.bias_scale))
    return layers


def _signed_activations(model: nn.Module) -> None:
    """Signed-INT8-only backends (TensorRT): lower unsigned b-bit (b <= 7) activations through signed INT8 Q/DQ (same values)."""
    for q in model.modules():
        if isinstance(q, FakeQuantizer) and not q.per_channel and not q.signed:
            if q.qmax > 127:
                raise UnsupportedTargetError(f"unsigned {q.bits}-bit activation does not fit signed INT8")
            q.signed = True  # forward_onnx then clamps to [0, qmax*s] and uses the (-128, 127) range


def lower(model: nn.Module, policy: Policy, cfg: LoweringConfig, input_shape: tuple[int, ...],
          metadata: dict[str, str]) -> tuple:
    """Return (onnx.ModelProto, reference torch module) for a prepared (BN-folded, onnx_mode) model."""
    onnx = require("onnx", "onnx")
    opset = resolve_opset(cfg)
    if cfg.fp16_float_layers:
        raise ValueError("lower() writes the exact FP32 graph; apply fp16_variant() to it")
    tgt = get_target(cfg.target)
    m = copy.deepcopy(model).eval()
    layers = _patch_layers(m, tgt.int32_bias)
    if tgt.signed_int8_only:
        _signed_activations(m)
    buf = io.BytesIO()
    x = torch.zeros((1, *input_shape))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on the constant scales are expected: they are constants
            torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=min(opset, 20), input_names=["input"],
                              output_names=["logits"], do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed: {first[:300]}") from None
    proto = onnx.load_from_string(buf.getvalue())
    if opset > 20:  # torch's exporter stops at 20; the ops we emit mean the same at 21 (types only widened)
        next(o for o in proto.opset_import if o.domain in ("", "ai.onnx")).version = opset
    initializer_identities(proto)
    name_layers(proto, layers, policy)
    if tgt.guard_float_inputs:
        guard_float_inputs(proto, list(policy.float_layers))
    name_ops(proto, m)
    if tgt.requant_add:
        fuse_requant(proto)
    if cfg.int4_storage:
        int4_weights(proto, {n: mod.weight_quantizer.bits for n, mod in layers.items()})
    prune(proto)
    for k, v in {**metadata, "asga.lowering": json.dumps(asdict(cfg)), "asga.opset": str(opset)}.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name, proto.doc_string = "asga-deploy", f"QDQ export of {policy.model} for {cfg.target}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
    return proto, m


def export_float(checkpoint, out, opset: int = DEFAULT_OPSET) -> Path:
    """Write the fp32 ONNX (dynamic batch) of a float checkpoint (kind "float"); return the path."""
    require("onnx", "onnx")
    model, ckpt = load_model(checkpoint, "float")
    chans, size = int(ckpt["in_chans"]), int(ckpt.get("input_size") or model_info(ckpt["model_name"]).input_size)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, chans, size, size),), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return atomic_write_bytes(Path(out), buf.getvalue())
