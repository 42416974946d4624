"""apply_policy (float -> fake-quant model), calibration of step sizes, exact BatchNorm folding."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models import set_module
from ..policy import Policy, validate_policy
from ..targets import get_target
from .modules import QuantConv2d, QuantLinear
from .quantizers import FakeQuantizer
from .residual import insert_deploy_quantizers
from .tracing import trace


def apply_policy(model: nn.Module, policy: Policy, validate: bool = True, source: str = "<policy>") -> list[dict]:
    """Swap each policy layer of model for its quantized version (in place); return the deploy quantizers added.

    Float layers are kept. Weight step sizes are initialised by MSE at once; activation step sizes need
    `calibrate`. On a target with residual quantization (ort: around residual Adds and conv outputs; tensorrt:
    on residual Add inputs), 8-bit quantizers are also placed: their records (name, role, sign) are returned;
    the policy is not changed (its `deploy.residual_quant: false` switches them off).
    """
    if validate:
        validate_policy(policy, model, source)
    for name, bits in policy.layers.items():
        m = model.get_submodule(name)
        if isinstance(m, (QuantConv2d, QuantLinear)):
            raise ValueError(f"layer {name} is already quantized")
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        set_module(model, name, cls.from_float(m, bits.weight_bits, bits.act_bits, bits.act_signed))
    mode = get_target(policy.target).residual_quant
    if policy.deploy.get("residual_quant", True) is False:  # the policy's switch: no deploy quantizers
        mode = ""
    return insert_deploy_quantizers(model, mode) if mode else []


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """Return {name: module} of the quantized layers, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Return every per-tensor activation quantizer by module name (layer inputs and extra points)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizer) and not m.per_channel}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int = 4) -> int:
    """Initialise every activation step size by MSE on the inputs seen over a few batches; return the count.

    Quantizers are calibrated in module order, each on inputs produced by the already-calibrated
    quantizers before it, so that the step sizes fit the quantized model that will run.
    """
    quants = activation_quantizers(model)
    device = next(model.parameters()).device
    xs = []
    for i, b in enumerate(batches):
        if i >= num_batches:
            break
        xs.append((b[0] if isinstance(b, (tuple, list)) else b).to(device))
    if not xs or not quants:
        return 0
    was = model.training
    model.eval()
    try:
        for q in quants.values():  # pass-through until calibrated
            q._calibrating = True
        for q in quants.values():
            seen: list[torch.Tensor] = []
            h = q.register_forward_pre_hook(lambda m, inp, seen=seen: seen.append(inp[0].detach()))
            for x in xs:
                model(x)
            h.remove()
            q.init_mse(torch.cat([s.reshape(-1) for s in seen]))
            q._calibrating = False
    finally:
        for q in quants.values():
            q._calibrating = False
        model.train(was)
    return len(quants)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Return (conv, bn) module-name pairs where the BN consumes only that conv's output."""
    gm = trace(model)
    pairs = []
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
                src = node.args[0]
                if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                        and isinstance(gm.get_submodule(src.target), nn.Conv2d)):
                    pairs.append((src.target, node.target))
        return pairs
    # not traceable: a BatchNorm2d right after a Conv2d in module order, with matching channels
    mods = list(model.named_modules())
    for (n1, m1), (n2, m2) in zip(mods, mods[1:], strict=False):
        if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d) and m1.out_channels == m2.num_features:
            pairs.append((n1, n2))
    return pairs


@torch.no_grad()
def fold_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d into its conv (in place, eval statistics); return the folded pairs.

    With c = gamma / sqrt(var + eps): W' = c W, b' = beta + c (b - mean), and a per-channel weight
    step size s' = |c| s, so that q(W') = c q(W) exactly: folding commutes with quantization.
    """
    pairs = _conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        c = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = bn.bias + c * (bias - bn.running_mean)
        conv.weight.copy_(conv.weight * c.reshape(shape))
        conv.bias = nn.Parameter(new_bias)
        if isinstance(conv, QuantConv2d):
            conv.weight_quantizer.scale.copy_(conv.weight_quantizer.step() * c.abs())
        set_module(model, bn_name, nn.Identity())
    return pairs
