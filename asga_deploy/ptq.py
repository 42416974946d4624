"""Post-training quantization of a policy: apply, calibrate, re-estimate BatchNorm, evaluate.

What `asga eval POLICY --float CKPT --ptq` reports, and the measurement the sensitivity oracle is
built on (method.md section 9): the accuracy a policy has before any fine-tuning repairs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .policy import Policy
from .quant import apply_policy, calibrate

Batch = tuple[torch.Tensor, torch.Tensor]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor | Batch]) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over the batches; return their count.

    Quantization shifts the statistics each BN sees; the float model's running averages no longer fit.
    """
    bns = _batch_norms(model)
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    n = 0
    try:
        for b in batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            model(x)
            n += 1
    finally:
        for m, (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)
        model.train(was)
    return n


def ptq(model: nn.Module, policy: Policy, calib: Sequence, bn_batches: Sequence) -> list[dict]:
    """Quantize model (in place) with the policy after training: apply, calibrate, re-estimate BN; return the
    deploy quantizer records."""
    records = apply_policy(model, policy, validate=False)
    calibrate(model, calib, num_batches=len(calib))
    reestimate_bn(model, bn_batches)
    return records


@torch.no_grad()
def loss_and_top1(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """Return (mean cross-entropy, top-1 fraction) of model in eval mode over (x, y) batches."""
    was = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
    finally:
        model.train(was)
    return loss / max(count, 1), correct / max(count, 1)
