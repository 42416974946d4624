"""`asga sensitivity`: measure the sensitivity oracle of a float model (JSON table + heatmap)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import SEED, RichProgress, console, handle_errors, kv_table, number
from .search_cmd import _bits


def _reference(text: str | None, bitops: float | None, candidates: tuple[int, ...]) -> tuple[int, int]:
    """Return the reference (w, a): given, or the smallest uniform WbAb at or above a BitOPs ratio, or W3A3."""
    from ..errors import AsgaError

    if text:
        ref = _bits(text, "reference")
        if len(ref) != 2:
            raise AsgaError(f"--reference {text!r}: give weight and activation bits, e.g. 3,3")
        return ref[0], ref[1]
    if bitops is not None:
        above = [b for b in sorted(candidates) if b * b / 64 >= bitops]
        if above:
            return above[0], above[0]
    return 3, 3


@app.command("sensitivity")
@handle_errors
def sensitivity(
    float_ckpt: Path = typer.Option(..., "--float", help="float.pt of `asga train`"),
    dataset: str = typer.Option(None, help="dataset (default: the checkpoint's)"),
    data_dir: Path = typer.Option(None, help="dataset folder"),
    target: str = typer.Option("ort", help="sim | ort | tensorrt (narrows the candidates)"),
    weight_bits: str = typer.Option("2,3,4,6,8", help="candidate weight bit-widths"),
    act_bits: str = typer.Option("2,3,4,6,8", help="candidate activation bit-widths"),
    reference: str = typer.Option(None, help="reference W,A (default: the smallest uniform WbAb at or above "
                                  "--budget-bitops, else 3,3)"),
    budget_bitops: float = typer.Option(None, "--budget-bitops", callback=number(0, 1, lo_open=True),
                                        help="only to choose the default reference"),
    images: int = typer.Option(2000, min=1, help="held-out training images the loss is measured on"),
    calib_images: int = typer.Option(256, min=1, help="images that calibrate the activation step sizes"),
    bn_images: int = typer.Option(1024, min=1, help="images that re-estimate BatchNorm statistics"),
    finetune_steps: int = typer.Option(0, min=0, help="> 0: also the short-fine-tune oracle, with this many steps"),
    finetune_warmup: int = typer.Option(200, min=0, help="steps of the reference before the single-layer changes"),
    hessian_samples: int = typer.Option(4, min=0,
                                        help="Rademacher vectors per batch for the Hessian traces (0: skip)"),
    float_choice: bool = typer.Option(False, "--float-choice", help="also measure each layer left float"),
    seed: int = typer.Option(0, **SEED, help="seed of the held-out images, fine-tune batches and probes"),
    out: Path = typer.Option(None, help="output folder (default runs/sensitivity/<model>-<dataset>-w<W>a<A>)"),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="accept an interrupted float.pt"),
    force: bool = typer.Option(False, help="overwrite an existing table"),
):
    """Measure each searched layer's loss increase for every candidate (w, a): sensitivity.json + heatmap.png."""
    from ..checkpoint import incomplete_note, load_checkpoint
    from ..io import check_writable
    from ..naming import sensitivity_dir
    from ..oracle import write_table
    from ..sensitivity import SensitivityConfig, measure
    from ..targets import get_target

    wb, ab = _bits(weight_bits, "weight-bits"), _bits(act_bits, "act-bits")
    ref = _reference(reference, budget_bitops, tuple(set(wb) & set(ab)) or wb)
    cfg = SensitivityConfig(str(float_ckpt), dataset, str(data_dir) if data_dir else None, target, wb, ab, ref,
                            images, calib_images, bn_images, finetune_steps=finetune_steps,
                            finetune_warmup=finetune_warmup, hessian_samples=hessian_samples,
                            float_choice=float_choice, seed=seed, allow_incomplete=allow_incomplete)
    cfg.check()
    get_target(target)
    ckpt = load_checkpoint(float_ckpt, "float", allow_incomplete)
    folder = out or sensitivity_dir(ckpt["model_name"], dataset or ckpt.get("dataset", "data"), ref)
    check_writable(folder / "sensitivity.json", force)  # before minutes of measuring
    check_writable(folder / "heatmap.png", True)
    progress = RichProgress()
    try:
        table = measure(cfg, progress)
    finally:
        progress.close()
    path = write_table(table, folder, force)
    note = incomplete_note(ckpt)
    console.print(kv_table(f"asga sensitivity {ckpt['model_name']} (reference W{ref[0]}A{ref[1]})", [
        ("table", str(path)), ("heatmap", str(folder / "heatmap.png")),
        *([("float checkpoint", f"INCOMPLETE: {note} (accepted with --allow-incomplete)")] if note else []),
        ("reference loss / top-1", f"{table['loss_ref']:.4f} / {table['top1_ref']:.4f} on {images} held-out images"),
        ("oracles", ", ".join(k for k in ("ptq", "finetune", "hessian") if table.get(k) is not None)),
        ("next", f"asga search --method sensitivity --sensitivity {path} --budget-bitops R")]))
