"""`asga finetune`: quantization-aware training of a model under a fixed policy."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import DEVICE, SEED, RichProgress, choice, console, handle_errors, kv_table, number
from .train_cmd import KEYS, _history


@app.command("finetune")
@handle_errors
def finetune(
    policy: Path = typer.Argument(..., help="policy file (policies/*.json); its stem names the output folder"),
    float_checkpoint: Path = typer.Option(None, "--float", help="float.pt from `asga train`"),
    weights: str = typer.Option(None, callback=choice("torchvision"),
                                help="'torchvision': start from torchvision's pretrained weights"),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist, cifar10, imagefolder or fake"),
    epochs: int = typer.Option(3, min=1, help="QAT epochs"),
    batch_size: int = typer.Option(128, min=1, help="batch size per process"),
    lr: float = typer.Option(0.04, callback=number(0, lo_open=True),
                             help="peak learning rate (SGD, Nesterov momentum 0.9, cosine)"),
    weight_decay: float = typer.Option(5e-5, callback=number(0), help="weight decay (never on quantizer step sizes)"),
    warmup_epochs: int = typer.Option(None, min=0, help="linear warm-up epochs (default min(5, epochs // 5))"),
    kd: bool = typer.Option(False, help="distil from the float model"),
    kd_temperature: float = typer.Option(4.0, callback=number(0, lo_open=True), help="distillation temperature"),
    kd_alpha: float = typer.Option(0.5, callback=number(0, 1), help="weight of the distillation loss"),
    freeze_bn_after: int = typer.Option(None, min=0, help="freeze BatchNorm statistics after N epochs"),
    calib_batches: int = typer.Option(4, min=1, help="training batches for activation step-size calibration"),
    seed: int = typer.Option(0, **SEED),
    run: str = typer.Option(None, "--run", "--name",
                            help="output folder name (default: the policy file's stem); under torchrun write --name"),
    out: Path = typer.Option(Path("export"), help="parent folder of the output folder"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint"),
    force: bool = typer.Option(False, help="overwrite an existing finetuned.pt"),
    data_dir: Path = typer.Option(None, help="dataset folder"),
    download: bool = typer.Option(False, help="download the dataset if missing (needs internet)"),
    augment: bool = typer.Option(False, help="random crop + horizontal flip on the training split "
                                 "(helps long runs; slows 3-epoch runs down)"),
    train_limit: int = typer.Option(None, min=1, help="train on a class-balanced subset of this many images"),
    test_limit: int = typer.Option(None, min=1, help="evaluate on a class-balanced subset of this many images"),
    workers: int = typer.Option(0, min=0),
    device: str = typer.Option("auto", **DEVICE),
    bf16: bool = typer.Option(False, help="bfloat16 autocast (CUDA)"),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="accept a --float checkpoint of an "
                                          "interrupted `asga train` (recorded in finetune.json and finetuned.pt)"),
):
    """Fine-tune POLICY's quantized model: writes OUT/<policy stem>/finetuned.pt and finetune.json."""
    from ..finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(policy=str(policy), float_checkpoint=str(float_checkpoint) if float_checkpoint else None,
                         weights=weights, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                         epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         warmup_epochs=warmup_epochs, kd=kd, kd_temperature=kd_temperature, kd_alpha=kd_alpha,
                         freeze_bn_after=freeze_bn_after, calib_batches=calib_batches, seed=seed, workers=workers,
                         augment=augment, download=download, train_limit=train_limit, test_limit=test_limit,
                         device=device, amp_bf16=bf16, out_dir=str(out), run=run, allow_incomplete=allow_incomplete)
    progress = RichProgress(keys=KEYS)
    try:
        res = run_finetune(cfg, resume=resume, force=force, callback=progress)
    finally:
        progress.close()
    if res.is_main:
        r = res.report
        console.print(kv_table(f"asga finetune {policy.name} ({r['model']}, target {r['target']})", [
            ("checkpoint", str(res.checkpoint)), ("report", str(res.report_path)),
            ("float top-1", f"{r['float_top1']:.4f}" + (f" (INCOMPLETE float checkpoint: {r['float_incomplete']})"
                                                        if r.get("float_incomplete") else "")),
            ("top-1 per epoch", _history(r)),
            ("final top-1", f"{r['top1']:.4f} on {r['test_count']} test images"),
            ("time", f"{r['time_s']:.1f} s on {r['world_size']} process(es)")]))
