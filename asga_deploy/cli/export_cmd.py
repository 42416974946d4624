"""`asga export` (QDQ ONNX, parity, optional TensorRT engine) and `asga profile` (latency of .onnx / .engine)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import app
from .common import RichProgress, console, handle_errors, kv_table, number

MAX_BATCH = 4096  # profile batches above this only exhaust memory


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1 or max(out) > MAX_BATCH:
        raise typer.BadParameter(f"{text!r}: give batch sizes in 1..{MAX_BATCH} separated by commas, e.g. 1,8,32")
    return out


@app.command("export")
@handle_errors
def export(
    policy: Path = typer.Argument(..., help="policy file; its stem names the output folder"),
    checkpoint: Path = typer.Option(None, help="finetuned.pt (default: export/<policy stem>/finetuned.pt)"),
    target: str = typer.Option(None, help="ort, tensorrt or sim (default: the policy's target)"),
    out: Path = typer.Option(None, help="output folder (default: export/<policy stem>)"),
    opset: int = typer.Option(None, min=1, help="ONNX opset (default 17; 21 with --int4-storage; tensorrt 17..20)"),
    int4_storage: bool = typer.Option(False, "--int4-storage", help="store weights of <= 4 bits as INT4 (opset 21)"),
    fp16: bool = typer.Option(False, "--fp16", help="tensorrt: float layers FP16 in the graph (TensorRT 11)"),
    parity_images: int = typer.Option(1000, min=1, help="real test images for the torch-vs-ORT parity check"),
    min_agreement: float = typer.Option(0.995, callback=number(0, 1), help="minimum top-1 agreement (fraction)"),
    max_accuracy_diff: float = typer.Option(0.1, callback=number(0),
                                            help="maximum accuracy difference (percentage points)"),
    dataset: str = typer.Option(None, help="test data for parity (default: the checkpoint's dataset)"),
    data_dir: Path = typer.Option(None, help="dataset folder"),
    threads: int = typer.Option(0, min=0, help="ONNX Runtime threads (0: default)"),
    trt: bool = typer.Option(False, "--trt", help="also build and profile a TensorRT engine (GPU + TensorRT)"),
    trt_max_batch: int = typer.Option(64, min=1, help="largest batch of the engine's optimization profile"),
    trt_strongly_typed: bool = typer.Option(False, "--trt-strongly-typed",
                                            help="TensorRT 10: strongly typed network (11 always is)"),
    warn_float_kernels: bool = typer.Option(False, "--warn-float-kernels",
                                            help="ort: export even if a quantized layer runs on a float kernel"),
    trt_warn_precision: bool = typer.Option(False, "--trt-warn-precision",
                                            help="TensorRT: report layers not in their policy precision, do not fail"),
    latency_seconds: float = typer.Option(3.0, callback=number(0, 600),
                                          help="a policy searched for a latency budget: seconds of timing the export "
                                               "as its latency table was measured (0: skip)"),
    force: bool = typer.Option(False, help="overwrite existing outputs"),
):
    """Export POLICY's fine-tuned model as exact ONNX QDQ; writes model.qdq.onnx and report.json."""
    from ..export.ort import ParityConfig
    from ..export.run import ExportConfig, run_export
    from ..export.trt import TrtConfig

    ckpt = checkpoint or (out or Path("export") / policy.stem) / "finetuned.pt"
    cfg = ExportConfig(policy=str(policy), checkpoint=str(ckpt), target=target, out_dir=str(out) if out else None,
                       opset=opset, int4_storage=int4_storage, fp16_float_layers=fp16, dataset=dataset,
                       data_dir=str(data_dir) if data_dir else None,
                       parity=ParityConfig(parity_images, 100, min_agreement, max_accuracy_diff, threads),
                       trt=trt, trt_config=TrtConfig(max_batch=trt_max_batch, opt_batch=min(8, trt_max_batch),
                                            strongly_typed=trt_strongly_typed,
                                            precision_check="warn" if trt_warn_precision else "fail"),
                       float_kernels="warn" if warn_float_kernels else "fail", latency_seconds=latency_seconds)
    progress = RichProgress()
    try:
        r = run_export(cfg, force=force, callback=progress)
    finally:
        progress.close()
    p, s = r["parity"], r["sizes"]
    rows = [("onnx", f"{r['onnx']} ({s['file_bytes'] / 1e6:.3f} MB; INT8 storage {s['file_bytes_int8_storage'] / 1e6:.3f}"
                     f" MB, INT4 storage {s['file_bytes_int4_storage'] / 1e6:.3f} MB)"),
            ("report", r["report"]),
            ("parity", f"top-1 agreement {p['top1_agreement']:.4f} on {p['images']} images; "
                       f"max |dlogit| {p['max_abs_logit_diff']:.3g} ({p['max_output_steps']} logit steps), "
                       f"median {p['median_abs_logit_diff']:.3g}; CPU {p['isa']['kind']}")]
    if "torch_top1" in p:
        rows.append(("accuracy", f"torch {p['torch_top1']:.4f}, onnx {p['onnx_top1']:.4f}"))
    if "ort_integer_kernels" in r:
        k = r["ort_integer_kernels"]
        req = k.get("requants", {})
        rows.append(("ORT integer kernels", f"{k['integer']}/{k['total']} quantized layers"
                     + (f"; not: {', '.join(k['not_integer'])}" if k["not_integer"] else "")
                     + (f"; requantizations {len(req) - len(k['requants_not_integer'])}/{len(req)} on QLinearAdd"
                        if req else "")))
    if "latency_budget" in r:
        lb = r["latency_budget"]
        if lb.get("status") == "measured":
            verdict = "" if lb["meets_budget"] is None else (" (meets it)" if lb["meets_budget"] else " (OVER BUDGET)")
            budget = "none" if lb["budget_ms"] is None else f"{lb['budget_ms']:.3f} ms"
            rows.append(("latency", f"measured {lb['measured_ms']:.3f} ms (median of {lb['runs']} runs, batch "
                         f"{lb['batch']}), predicted {lb['predicted_ms']:.3f} ms, budget {budget}{verdict}"))
            st = lb.get("machine_state")
            if st and not st["same_state"]:
                rows.append(("machine state", f"the table's W8A8 model runs {st['ratio']:.2f}x its table time "
                             f"({st['w8a8_now_ms']:.3f} vs {st['w8a8_table_ms']:.3f} ms): this machine is not in the "
                             "state the table was measured in, so measured vs predicted says little; time again "
                             "later, or measure the table again (asga lut --force)"))
        else:
            rows.append(("latency", lb["status"]))
    if "tensorrt" in r:
        t = r["tensorrt"]
        rows.append(("tensorrt", f"{t['build']['engine']}; p50 ms {t['p50_ms']}; not INT8: "
                     f"{t['precision_check']['not_int8'] if t['precision_check'] else 'n/a'}"))
    console.print(kv_table(f"asga export {policy.name} (target {r['target']}, opset {r['opset']})", rows))


@app.command("profile")
@handle_errors
def profile(
    model: Path = typer.Argument(..., help="model.qdq.onnx (ONNX Runtime, CPU) or model.engine (TensorRT)"),
    batch_sizes: str = typer.Option("1,8,32", help="batch sizes, comma separated"),
    threads: int = typer.Option(0, min=0, help="ONNX Runtime intra-op threads (0: all usable cores)"),
    warmup: int = typer.Option(10, min=0, help="untimed runs first"),
    iters: int = typer.Option(50, min=1, help="timed runs per batch size"),
    input_size: int = typer.Option(None, min=1, help="spatial size when the model's input size is dynamic"),
    out: Path = typer.Option(None, help="latency.json path (default: beside the model)"),
    force: bool = typer.Option(False, help="overwrite an existing latency.json"),
):
    """Time MODEL (p50/p90/p99, throughput per batch size); for ONNX also list layers not on integer kernels."""
    from ..export.latency import ProfileConfig, run_profile

    cfg = ProfileConfig(_batches(batch_sizes), threads, warmup, iters, input_size)
    r = run_profile(model, cfg, out, force)
    table = Table(title=f"asga profile {model.name} ({r['runtime']})")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
        table.add_column(col, justify="right")
    for b in r["batches"]:
        if "p50_ms" in b:
            table.add_row(str(b["batch"]), f"{b['p50_ms']:.3f}", f"{b['p90_ms']:.3f}", f"{b['p99_ms']:.3f}",
                          f"{b['throughput_ips']:.1f}")
    console.print(table)
    k = r.get("integer_kernels")
    if k:
        console.print(f"integer kernels: {k['integer']}/{k['total']} quantized layers"
                      + (f"; not integer: {', '.join(k['not_integer'])}" if k["not_integer"] else ""))
    console.print(f"written: {r['path']}")
