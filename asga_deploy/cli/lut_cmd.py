"""`asga lut`: the measured per-layer latency table of a model on a target (cached), shown as a table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import app
from .common import RichProgress, console, handle_errors


@app.command("lut")
@handle_errors
def lut(
    model: str = typer.Argument(..., help="registered model name (asga models)"),
    target: str = typer.Option("ort", help="ort, ort-w8 (ONNX Runtime CPU) or tensorrt (GPU with TensorRT)"),
    batch_size: int = typer.Option(1, min=1, max=4096, help="batch size the table is measured at"),
    input_size: int = typer.Option(None, min=1, help="input height/width (default: the model's)"),
    in_chans: int = typer.Option(None, min=1, help="input channels (default: 1 at <= 28 px, else 3)"),
    num_classes: int = typer.Option(10, min=1, help="classifier outputs"),
    threads: int = typer.Option(0, min=0, help="ONNX Runtime threads (0: deployment's default, every usable core)"),
    rounds: int = typer.Option(15, min=1, max=10_000, help="alternating timing rounds"),
    out: Path = typer.Option(None, help="table path (default: runs/lut/<model>-<target>-b<B>-...-<key>.json)"),
    force: bool = typer.Option(False, help="measure again even when a table with this key exists"),
):
    """Measure MODEL's latency per layer for every choice of the target (cached by backend, version, CPU ISA, threads,
    batch and input shape); print the table; write JSON and a PNG plot."""
    from ..lut import LutConfig, run_lut
    from ..lut.plot import kernel_rows

    cfg = LutConfig(model, target, batch_size, input_size, in_chans, num_classes, threads,
                    str(out) if out else None, rounds)
    progress = RichProgress()
    try:
        table = run_lut(cfg, force=force, callback=progress)
    finally:
        progress.close()
    k, d = table.key, table.data
    rows = kernel_rows(table)
    t = Table(title=f"asga lut {k['model']} ({k['target']}, batch {k['batch']}, input {k['input_shape']}, "
                    f"{k['threads']} threads, {k['backend']} {k['backend_version']}, {k['isa']})")
    t.add_column("layer")
    for label in rows:
        t.add_column(f"{label} ms", justify="right")
    for n in table.layers:
        t.add_row(n, *[f"{row[n]:.4f}" if n in row else "-" for row in rows.values()])
    console.print(t)
    ref = d.get("reference_ms", {})
    facts = [f"rest of the graph {table.rest_ms:.4f} ms"]
    if ref:
        facts.append("whole model measured: " + ", ".join(f"{a} {b:.4f} ms" for a, b in ref.items()))
    for label, c in (d.get("rest_check") or {}).items():
        facts.append(f"check, {label}: predicted {c['predicted_ms']:.4f} ms vs measured {c['measured_ms']:.4f} ms "
                     f"(ratio {c['ratio']:.3f})")
    if d.get("edges"):
        facts.append(f"{len(d['edges'])} float pairs with their own correction")
    console.print("; ".join(facts))
    console.print(f"{'cached' if d.get('cached') else 'written'}: {table.path}"
                  + (f" (plot {d['plot']})" if d.get("plot") else ""))
