"""`asga train`, `asga eval`, `asga models`: float training, accuracy of a checkpoint, the model zoo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import app
from .common import DEVICE, SEED, RichProgress, console, handle_errors, kv_table, number

# what the progress bar (steps) and the per-epoch lines show
KEYS = ("loss", "acc", "img/s", "train_loss", "train_top1", "test_top1")



def _history(report: dict) -> str:
    return " ".join(f"{t:.4f}" for t in report["top1_per_epoch"])


@app.command("train")
@handle_errors
def train(
    model: str = typer.Option("smallcnn", help="registered model name (asga models)"),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist, cifar10, imagefolder or fake"),
    epochs: int = typer.Option(3, min=1, help="epochs (3 give smallcnn 91% top-1 on Fashion-MNIST)"),
    batch_size: int = typer.Option(128, min=1, help="batch size per process"),
    lr: float = typer.Option(0.1, callback=number(0, lo_open=True),
                             help="peak learning rate (SGD, Nesterov, cosine decay)"),
    weight_decay: float = typer.Option(5e-4, callback=number(0), help="weight decay"),
    warmup_epochs: int = typer.Option(0, min=0, help="linear warm-up epochs"),
    seed: int = typer.Option(0, **SEED, help="seed of weights, data order and augmentation"),
    run: str = typer.Option(None, "--run", "--name",
                            help="run folder name (default: MODEL-DATASET); under torchrun write --name (torchrun takes --run for its --run-path)"),
    out: Path = typer.Option(Path("export"), help="parent folder of the run folder"),
    resume: bool = typer.Option(False, help="continue from the run's last checkpoint"),
    force: bool = typer.Option(False, help="overwrite an existing run"),
    data_dir: Path = typer.Option(None, help="dataset folder (default: the system dataset folders)"),
    download: bool = typer.Option(False, help="download the dataset if missing (needs internet)"),
    augment: bool = typer.Option(False, help="random crop + horizontal flip on the training split "
                                 "(helps long runs; slows 3-epoch runs down)"),
    train_limit: int = typer.Option(None, min=1, help="train on a class-balanced subset of this many images"),
    test_limit: int = typer.Option(None, min=1, help="evaluate on a class-balanced subset of this many images"),
    exclude_proxy: int = typer.Option(None, min=1,
                                      help="leave out of training the N-image search proxy that `asga search "
                                      "--subset N --proxy-seed S` draws (a float init that never saw the proxy)"),
    proxy_seed: int = typer.Option(0, **SEED, help="the seed of the proxy left out by --exclude-proxy"),
    workers: int = typer.Option(0, min=0, help="data-loader worker processes"),
    device: str = typer.Option("auto", **DEVICE),
    bf16: bool = typer.Option(False, help="bfloat16 autocast (CUDA)"),
):
    """Train a float model: writes OUT/RUN/float.pt (every epoch) and OUT/RUN/train.json."""
    from ..train import TrainConfig, run_train

    cfg = TrainConfig(model=model, dataset=dataset, data_dir=str(data_dir) if data_dir else None, epochs=epochs,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                      seed=seed, workers=workers, augment=augment, download=download, train_limit=train_limit,
                      test_limit=test_limit, exclude_proxy=exclude_proxy, proxy_seed=proxy_seed, device=device,
                      amp_bf16=bf16, out_dir=str(out), run=run)
    progress = RichProgress(keys=KEYS)
    try:
        res = run_train(cfg, resume=resume, force=force, callback=progress)
    finally:
        progress.close()
    if res.is_main:
        r = res.report
        console.print(kv_table(f"asga train {model} on {dataset}", [
            ("checkpoint", str(res.checkpoint)), ("report", str(res.report_path)),
            ("epochs", str(len(r["top1_per_epoch"]))), ("top-1 per epoch", _history(r)),
            ("final top-1", f"{r['top1']:.4f} on {r['test_count']} test images"),
            ("time", f"{r['time_s']:.1f} s on {r['world_size']} process(es)")]))


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="float.pt, finetuned.pt, model.onnx, or a policy .json with --ptq"),
    dataset: str = typer.Option(None, help="dataset (default: the one the checkpoint records)"),
    data_dir: Path = typer.Option(None, help="dataset folder"),
    limit: int = typer.Option(None, min=1, help="evaluate the first N test images only"),
    batch_size: int = typer.Option(256, min=1),
    workers: int = typer.Option(0, min=0),
    device: str = typer.Option("auto", **DEVICE),
    ptq: bool = typer.Option(False, "--ptq", help="CHECKPOINT is a policy: quantize --float after training "
                             "(calibrate, re-estimate BatchNorm) and evaluate it"),
    float_ckpt: Path = typer.Option(None, "--float", help="--ptq: the float.pt the policy is applied to"),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                          help="accept a checkpoint of an interrupted run (the output says so)"),
):
    """Report the top-1 accuracy of a checkpoint, an ONNX file, or a policy after PTQ, on a test split."""
    from ..errors import AsgaError
    from ..evaluate import evaluate_checkpoint
    from ..ptq import evaluate_ptq

    if ptq or checkpoint.suffix == ".json":
        if not (ptq and float_ckpt):
            raise AsgaError(f"{checkpoint}: a policy is evaluated by post-training quantization of a float model: "
                            "add --ptq --float FLOAT.pt")
        res = evaluate_ptq(checkpoint, float_ckpt, dataset, str(data_dir) if data_dir else None, limit,
                           batch_size=batch_size, allow_incomplete=allow_incomplete)
    else:
        progress = RichProgress(keys=("top1",))
        try:
            res = evaluate_checkpoint(checkpoint, dataset, str(data_dir) if data_dir else None, limit, batch_size,
                                      workers, device, callback=progress, allow_incomplete=allow_incomplete)
        finally:
            progress.close()
    rows = [("kind", str(res["kind"])), ("dataset", str(res["dataset"])), ("images", str(res["count"])),
            ("top-1", f"{res['top1']:.4f}")]
    if res.get("incomplete"):
        rows.insert(0, ("checkpoint", f"INCOMPLETE: {res['incomplete']} (accepted with --allow-incomplete)"))
    if res.get("loss") is not None:  # ONNX evaluation reports accuracy only
        rows.append(("loss", f"{res['loss']:.4f}"))
    console.print(kv_table(f"asga eval {checkpoint}", rows))


@app.command("models")
@handle_errors
def models_cmd():
    """List the registered models with their default input size."""
    from ..models import list_models, model_info

    table = Table(title="registered models")
    for col in ("name", "input", "proxy of", "description"):
        table.add_column(col)
    for name in list_models():
        info = model_info(name)
        table.add_row(name, f"{info.input_size}x{info.input_size}", info.proxy_of or "", info.description)
    console.print(table)
