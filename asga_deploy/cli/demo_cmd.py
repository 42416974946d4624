"""`asga demo`: the whole chain on Fashion-MNIST with the default small model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import app
from .common import SEED, RichProgress, console, handle_errors, number


@app.command("demo")
@handle_errors
def demo(model: str = typer.Option("smallcnn", help="registered model name"),
         dataset: str = typer.Option("fashion-mnist", help="dataset name"),
         data_dir: Path = typer.Option(None, help="dataset folder (default: found automatically)"),
         budget_bitops: float = typer.Option(0.125, callback=number(0, 1, lo_open=True),
                                             help="BitOPs budget as a ratio of W8A8, in (0, 1]"),
         proxy_size: int = typer.Option(1000, min=1, help="class-balanced proxy images for the search"),
         train_epochs: int = typer.Option(3, min=1), search_epochs: int = typer.Option(15, min=1),
         finetune_epochs: int = typer.Option(1, min=1),
         target: str = typer.Option("ort", help="sim | ort | tensorrt"),
         seed: int = typer.Option(0, **SEED), out: Path = typer.Option(Path("export/demo"), help="output folder"),
         redo: bool = typer.Option(False, "--redo", help="recompute every step instead of reusing results")):
    """Train, search (ASGA), fine-tune, export and time the default model; writes OUT/report.md."""
    from ..demo import DemoConfig, run_demo
    from ..report.demo import summary_rows

    cfg = DemoConfig(model=model, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                     budget_bitops=budget_bitops, proxy_size=proxy_size, train_epochs=train_epochs,
                     search_epochs=search_epochs, finetune_epochs=finetune_epochs, target=target, seed=seed,
                     out_dir=str(out), redo=redo)
    progress = RichProgress(keys=("loss", "acc", "img/s", "gap", "rho", "cost"))
    try:
        summary = run_demo(cfg, progress)
    finally:
        progress.close()
    batches = list(summary["latency"]["batches"])
    t = Table(title=f"{model} on {dataset}: float vs quantized (ONNX Runtime, {summary['latency']['threads']} threads)")
    for col in ["policy", "top-1%", "BitOPs%", "KB", "int"] + [c for b in batches for c in (f"ms b{b}", f"x b{b}")]:
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in summary_rows(summary):
        t.add_row(r["label"], f"{100 * r['top1']:.2f}",
                  "" if r["bitops_vs_w8a8"] is None else f"{100 * r['bitops_vs_w8a8']:.2f}",
                  f"{1000 * r['weight_mb']:.1f}", r["integer_layers"],
                  *[c for b in batches for c in (f"{r[f'ms_b{b}']:.3f}", f"{r[f'x_b{b}']:.2f}x")])
    console.print(t)
    console.print("BitOPs% of W8A8 (searched layers); KB: weights; int: layers on ONNX Runtime integer kernels; "
                  "x: speed-up over fp32 in the same run")
    console.print(f"report: {out / 'report.md'}  (total {summary['times']['total_s'] / 60:.1f} min)")
