"""Top-1 accuracy and loss of a torch model, an asga checkpoint (float or finetuned), or an ONNX file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import data
from .checkpoint import incomplete_note, load_model
from .dist import DistInfo, all_reduce_sum, init_distributed, shutdown
from .errors import CheckpointError, DatasetError, require
from .export.ort import evaluate_onnx
from .io import not_a_file
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


def check_channels(dataset_name: str, dataset_chans: int, model_chans: int, source: str,
                   model_dataset: str | None = None) -> None:
    """Raise DatasetError when a dataset's images have another channel count than a model takes.

    The data loader could convert grey to colour (or back) silently; only the model's own dataset may be
    read that way (its training did the same).
    """
    if dataset_chans != model_chans and dataset_name != model_dataset:
        raise DatasetError(
            f"dataset {dataset_name} has {dataset_chans}-channel images but the model in {source} takes "
            f"{model_chans} channels; use data of the kind it was trained on, or train a float model on "
            f"{dataset_name} first (asga train --dataset {dataset_name})")


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
    check_channels(dataset, spec.in_chans, int(ckpt["in_chans"]), str(path), ckpt.get("dataset"))
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
    return {**res, "dataset": dataset, "kind": ckpt["kind"], "model": ckpt["model_name"],
            "incomplete": incomplete_note(ckpt)}


def onnx_io(path: Path) -> tuple[list, list]:
    """Return the (input dims, output dims) of an ONNX classifier: ints where fixed, None where named or free."""
    onnx = require("onnx", "onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a protobuf decode error: not an ONNX file
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(e).__name__}); give a .onnx file "
                              "written by asga export (or another ONNX exporter)") from None
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise CheckpointError(f"{path} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                              "asga eval takes a classifier with one image input and logits as its first output")

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    return dims(inputs[0]), dims(model.graph.output[0])


def _evaluate_onnx(path: Path, dataset, data_dir, limit, batch_size, workers) -> dict:
    problem = not_a_file(path)
    if problem:
        raise CheckpointError(f"ONNX file {path} {problem}")
    if not dataset:
        raise DatasetError(f"pass --dataset to evaluate {path}")
    spec = data.dataset_spec(dataset, data_dir)
    inp, out = onnx_io(path)
    if len(inp) != 4 or inp[1] is None or inp[2] is None:
        raise CheckpointError(f"{path}: input shape {inp} is not N x C x H x W with fixed channels and size; "
                              "export it with a fixed image size")
    if len(out) != 2 or (out[1] is not None and out[1] != spec.num_classes):
        raise DatasetError(f"{path} outputs {out[1] if len(out) == 2 else out} logits but dataset {dataset} has "
                           f"{spec.num_classes} classes; evaluate it on the dataset it was made for")
    check_channels(dataset, spec.in_chans, inp[1], str(path))
    if inp[0] is not None and inp[0] != 1:
        raise CheckpointError(f"{path} takes batches of exactly {inp[0]} images; export it with a dynamic batch "
                              "(asga export does) or with batch 1")
    if inp[0] == 1:
        batch_size = 1  # a fixed batch of one: evaluated image by image
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1 (got {limit})")
    res = evaluate_onnx(path, dataset=dataset, data_dir=data_dir, limit=limit, batch_size=batch_size,
                        workers=workers)
    return {**res, "dataset": dataset, "kind": "onnx"}
