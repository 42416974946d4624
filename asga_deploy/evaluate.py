"""Top-1 accuracy and loss of a torch model, an asga checkpoint (float or finetuned), or an ONNX file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import data
from .checkpoint import load_model
from .dist import DistInfo, all_reduce_sum, init_distributed, shutdown
from .errors import CheckpointError, DatasetError
from .export.ort import evaluate_onnx
from .progress import Callback, ProgressEvent, emit


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
             info: DistInfo | None = None, callback: Callback | None = None, stage: str = "eval") -> dict:
    """Return {"top1", "loss", "count"} of model on loader (summed over ranks when distributed)."""
    device = torch.device(device)
    was = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    steps = len(loader)
    try:
        for step, (x, y) in enumerate(loader, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
            emit(callback, ProgressEvent("step", stage, 1, 1, step, steps, {"top1": correct / max(count, 1)}))
    finally:
        model.train(was)
    if info is not None:
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], info)
    count = int(count)
    return {"top1": correct / count if count else 0.0, "loss": loss_sum / count if count else 0.0,
            "count": count}


def check_classes(dataset_name: str, dataset_classes: int, model_classes: int, source: str) -> None:
    """Raise DatasetError when a dataset's class count differs from a model head's outputs."""
    if dataset_classes != model_classes:
        raise DatasetError(
            f"dataset {dataset_name} has {dataset_classes} classes but the model in {source} has "
            f"{model_classes} outputs; use the dataset the model was trained on, or train a float model "
            f"on {dataset_name} first (asga train --dataset {dataset_name})")


def evaluate_checkpoint(path: str | Path, dataset: str | None = None, data_dir: str | Path | None = None,
                        limit: int | None = None, batch_size: int = 256, workers: int = 0,
                        device: str = "auto", callback: Callback | None = None, allow_incomplete: bool = False) -> dict:
    """Return {"top1", "loss", "count", "dataset", "kind"} of a float.pt, finetuned.pt or .onnx file."""
    path = Path(path)
    if path.suffix == ".onnx":
        return _evaluate_onnx(path, dataset, data_dir, limit, batch_size, workers)
    model, ckpt = load_model(path, allow_incomplete=allow_incomplete)
    dataset = dataset or ckpt.get("dataset")
    if not dataset:
        raise CheckpointError(f"{path} does not record its dataset; pass --dataset")
    spec = data.dataset_spec(dataset, data_dir)
    check_classes(dataset, spec.num_classes, int(ckpt["num_classes"]), str(path))
    test = data.get_dataset(dataset, "test", data_dir, in_chans=int(ckpt["in_chans"]),
                            input_size=int(ckpt.get("input_size") or spec.input_size))
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be at least 1 (got {limit})")
        test = Subset(test, range(min(limit, len(test))))
    info = init_distributed(device)
    try:
        loader = data.make_loader(test, batch_size, shuffle=False, seed=0, workers=workers,
                                  distributed=info.distributed)
        res = evaluate(model.to(info.device), loader, info.device, info,
                       callback if info.is_main else None)
    finally:
        shutdown(info)
    return {**res, "dataset": dataset, "kind": ckpt["kind"], "model": ckpt["model_name"]}


def _evaluate_onnx(path: Path, dataset, data_dir, limit, batch_size, workers) -> dict:
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} does not exist")
    if not dataset:
        raise DatasetError(f"pass --dataset to evaluate {path}")
    res = evaluate_onnx(path, dataset=dataset, data_dir=data_dir, limit=limit, batch_size=batch_size,
                        workers=workers)
    return {**res, "dataset": dataset, "kind": "onnx"}
