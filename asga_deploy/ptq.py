"""Post-training quantization of a policy: apply, calibrate, re-estimate BatchNorm, evaluate.

What `asga eval POLICY --float CKPT --ptq` reports, and the measurement the sensitivity oracle is
built on (method.md section 9): the accuracy a policy has before any fine-tuning repairs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from . import data
from .checkpoint import incomplete_note, load_model
from .errors import CheckpointError
from .evaluate import check_channels, check_classes
from .policy import Policy, check_policy_shape, validate_policy
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


def evaluate_ptq(policy_path: str | Path, float_checkpoint: str | Path, dataset: str | None = None,
                 data_dir: str | Path | None = None, limit: int | None = None, calib_images: int = 256,
                 bn_images: int = 1024, seed: int = 0, batch_size: int = 256, allow_incomplete: bool = False) -> dict:
    """Return the test accuracy and loss of a policy applied to a float model by post-training quantization.

    Calibration and BatchNorm re-estimation use seeded class-balanced training images; the test split
    (its first `limit` images, all by default) is evaluated.
    """
    policy = Policy.load(policy_path)
    model, ckpt = load_model(float_checkpoint, "float", allow_incomplete)
    if ckpt["model_name"] != policy.model:
        raise CheckpointError(f"{float_checkpoint} holds a {ckpt['model_name']} model but {policy_path} is for "
                              f"{policy.model}")
    validate_policy(policy, model, str(policy_path))
    dataset = dataset or ckpt.get("dataset")
    if not dataset:
        raise CheckpointError(f"{float_checkpoint} does not record its dataset; pass --dataset")
    spec = data.dataset_spec(dataset, data_dir)
    check_classes(dataset, spec.num_classes, int(ckpt["num_classes"]), str(float_checkpoint))
    check_channels(dataset, spec.in_chans, int(ckpt["in_chans"]), str(float_checkpoint), ckpt.get("dataset"))
    chans, size = int(ckpt["in_chans"]), int(ckpt.get("input_size") or spec.input_size)
    check_policy_shape(policy, (chans, size, size), str(policy_path))
    train = data.get_dataset(dataset, "train", data_dir, chans, size)
    sub, _ = data.proxy_subset(train, min(calib_images + bn_images, len(train)), seed, dataset, "train")
    loader = data.make_loader(sub, batch_size, shuffle=True, seed=seed)
    batches = list(loader)
    n_calib = max(1, round(len(batches) * calib_images / (calib_images + bn_images)))
    test = data.get_dataset(dataset, "test", data_dir, chans, size)
    if limit is not None:
        test = Subset(test, range(min(limit, len(test))))
    model.eval()
    ptq(model, policy, batches[:n_calib], batches[n_calib:] or batches)
    loss, top1 = loss_and_top1(model, data.make_loader(test, batch_size, shuffle=False, seed=0))
    return {"top1": top1, "loss": loss, "count": len(test), "dataset": dataset, "kind": "ptq",
            "policy": str(policy_path), "float_checkpoint": str(float_checkpoint), "incomplete": incomplete_note(ckpt)}
