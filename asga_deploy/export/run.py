"""`asga export`: policy + finetuned.pt -> model.qdq.onnx (+ parity report, optional TensorRT engine)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_finetuned
from ..errors import CheckpointError, ExportError
from ..io import atomic_write_bytes, atomic_write_json, check_writable, machine_info, provenance, versions
from ..lut.check import budget_latency
from ..naming import export_dir
from ..policy import Policy
from ..progress import Callback, ProgressEvent, emit
from ..targets import get_target
from . import onnx_qdq as lq
from .check import check_tensorrt
from .kernels import integer_kernels, saturating_layers
from .ort import SESSION_CONFIG_KEY, ParityConfig, cpu_isa, test_loader
from .parity import parity
from .reference import integer_reference
from .trt import (
    Runner,
    TrtConfig,
    build_engine,
    compare_with_ort,
    load_engine,
    profile_engine,
    require_tensorrt,
)
from .units import find_units

ONNX_NAME, REPORT_NAME = "model.qdq.onnx", "report.json"


@dataclass(frozen=True)
class ExportConfig:
    """Everything `asga export` needs; recorded whole in report.json."""

    policy: str
    checkpoint: str
    target: str | None = None  # None: the policy's target
    out_dir: str | None = None  # None: export/<policy stem>
    opset: int | None = None
    int4_storage: bool = False
    fp16_float_layers: bool = False
    dataset: str | None = None  # None: the checkpoint's dataset
    data_dir: str | None = None
    parity: ParityConfig = field(default_factory=ParityConfig)
    trt: bool = False
    trt_config: TrtConfig = field(default_factory=TrtConfig)
    float_kernels: str = "fail"  # a policy layer on a float ORT kernel: "fail" the export or "warn" (report it)
    latency_seconds: float = 3.0  # timing of a policy searched for a latency budget (0: not timed)


def _outputs(cfg: ExportConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else export_dir(cfg.policy)


def only_ties_failed(p: dict, tol: ParityConfig, all_integer: bool) -> bool:
    """Return whether a parity report of a graph with float layers failed on the accuracy criterion alone: their float
    rounding (ORT's optimized kernels, its literal graph, torch) decides ties at the next quantizer, so a few images
    can flip either way without a wrong graph (measured: a searched ResNet-20 with a float first stage, 2 of 1,000)."""
    agree = min(p["top1_agreement"], p["comparisons"]["ort_vs_fake_quant"]["top1_agreement"])
    return not all_integer and agree >= tol.min_agreement and p.get("accuracy_diff_points", 0.0) > tol.max_accuracy_diff


def ties_hint(p: dict, tol: ParityConfig, all_integer: bool) -> str:
    """Return what to do when only the accuracy criterion failed on a graph with float layers (only_ties_failed)."""
    if not only_ties_failed(p, tol, all_integer):
        return ""
    flips = round((1.0 - p["comparisons"]["ort_vs_fake_quant"]["top1_agreement"]) * p["images"])
    same = p["comparisons"]["ort_vs_unoptimized"]["identical_fraction"]
    return (f". Only the accuracy criterion failed, on {flips} differing image(s) of {p['images']}: the policy's float "
            f"layers round differently in ORT's optimized and literal graphs (identical logits {same:.1%}), so ties "
            "at the next quantizer go either way; measure on more images (--parity-images 10000) or accept the "
            "difference with --max-accuracy-diff (recorded in report.json)")


def run_export(cfg: ExportConfig, force: bool = False, callback: Callback | None = None,
               loader: Iterable | None = None) -> dict:
    """Export, check parity on real test images, optionally build a TensorRT engine; return report.json's dict."""
    policy = Policy.load(cfg.policy)
    target = cfg.target or policy.target
    tgt = get_target(target)
    lcfg = lq.LoweringConfig(target, cfg.opset, cfg.int4_storage, cfg.fp16_float_layers)
    opset = lq.resolve_opset(lcfg)
    out = _outputs(cfg)
    onnx_path, report_path = out / ONNX_NAME, out / REPORT_NAME
    for p in [onnx_path, report_path] + ([out / "model.engine", out / "latency.json"] if cfg.trt else []):
        check_writable(p, force)
    if cfg.trt:
        require_tensorrt()  # before any file is written
    model, ckpt, trained, deploy = load_finetuned(cfg.checkpoint, policy)
    lq.check_layer_types(model)
    lq.check_representable(model, policy, target)
    size = int(ckpt.get("input_size") or policy.cost.get("input_shape", [0, 0, 0])[-1])
    input_shape = (int(ckpt["in_chans"]), size, size)
    if loader is None:  # the test data is read before anything is written: a bad dataset leaves no file
        dataset = cfg.dataset or ckpt.get("dataset")
        if not dataset:
            raise CheckpointError(f"{cfg.checkpoint} does not record its dataset; pass --dataset")
        loader = test_loader(dataset, input_shape[0], input_shape[1], cfg.parity.images, cfg.data_dir,
                             cfg.parity.batch_size)
    emit(callback, ProgressEvent("info", "export", message=f"lowering {policy.model} for {target} (opset {opset})"))
    ref = lq.prepare_model(model, target)
    saturating = saturating_layers(ref)
    session_config = tgt.session_config(bool(saturating))
    recorded = {**trained.to_dict(), "deploy": {"quantizers": deploy}}  # the trained structure, with its target
    meta = {"asga.policy": json.dumps(recorded), "asga.target": target,
            "asga.provenance": json.dumps(provenance(checkpoint=str(cfg.checkpoint), policy_file=str(cfg.policy))),
            "asga.checkpoint_provenance": json.dumps(ckpt.get("provenance", {}), default=str)}
    if session_config:
        meta[SESSION_CONFIG_KEY] = json.dumps(session_config)
    proto, _ = lq.lower(ref, policy, lq.LoweringConfig(target, opset, cfg.int4_storage, False), input_shape, meta)
    exact = proto.SerializeToString()
    problems = check_tensorrt(proto) if tgt.static_check else []
    if problems:
        raise ExportError(f"the tensorrt export fails the static TensorRT check: {'; '.join(problems[:5])}")
    final = proto
    if cfg.fp16_float_layers:
        final = lq.fp16_variant(proto, policy.float_layers)
    data = final.SerializeToString()
    atomic_write_bytes(onnx_path, data)
    report = {"config": asdict(cfg), "target": target, "opset": opset, "onnx": str(onnx_path),
              "policy": recorded, "deploy_quantizers": deploy,
              "sizes": lq.size_report(proto, data, {n: b.weight_bits for n, b in policy.layers.items()}),
              "isa": cpu_isa(), "ort_session_config": session_config,
              "u8s8_saturating_layers": saturating, "machine": machine_info(), "versions": versions(),
              "provenance": provenance()}
    if tgt.static_check:
        report["tensorrt_static_check"] = {"problems": problems, "passed": not problems}
    float_units: set[str] = set()
    if tgt.integer_kernel_report:
        k = report["ort_integer_kernels"] = integer_kernels(exact, cfg.parity.threads)
        float_units = set(k["not_integer"]) | {n for n, v in k["ops"].items() if not v["integer"]}
        off = [n for n in k["not_integer"] if n in policy.layers] + k["ops_not_integer"]
        if off and tgt.integer_kernels_required and cfg.float_kernels != "warn":
            report["status"] = "float_kernels"
            atomic_write_json(report_path, report)
            raise ExportError(f"{len(off)} quantized op(s) run on float ONNX Runtime kernels: "
                              + ", ".join(f"{n} ({k['layers'].get(n, k['ops'].get(n, {})).get('kernel')})" for n in off)
                              + f"; see {report_path} (ort_integer_kernels); --warn-float-kernels exports anyway")
    emit(callback, ProgressEvent("info", "export", message=f"parity on {cfg.parity.images} test images"))
    units = find_units(ref)
    if units is None or not tgt.integer_kernel_report:  # no kernel report: ORT's integer units are unknown
        int_ref, step, all_integer = ref, None, False
    else:
        int_ref = integer_reference(ref, units, float_units)
        step = logit_step(ref, units, float_units)
        all_integer = not float_units and not policy.float_layers  # a float layer's rounding decides ties
    t0 = time.perf_counter()
    report["parity"] = parity(ref, int_ref, exact, loader, cfg.parity, step, all_integer)
    report["parity"]["graph"] = "fp32 twin of the FP16 file" if cfg.fp16_float_layers else "the written file"
    report["parity"]["time_s"] = time.perf_counter() - t0
    if not report["parity"]["passed"]:
        report["status"] = "parity_failed"
        report["parity"]["only_ties_failed"] = only_ties_failed(report["parity"], cfg.parity, all_integer)
        atomic_write_json(report_path, report)
        p = report["parity"]
        raise ExportError(f"parity off tolerance: top-1 agreement {p['top1_agreement']:.4f} with the integer "
                          f"reference and {p['comparisons']['ort_vs_fake_quant']['top1_agreement']:.4f} with the "
                          f"fake-quant model (min {cfg.parity.min_agreement}), logits up to {p['max_output_steps']} "
                          f"steps off (max {cfg.parity.max_output_steps}), accuracy difference "
                          f"{p.get('accuracy_diff_points', float('nan')):.3f} points (max {cfg.parity.max_accuracy_diff}); "
                          f"{onnx_path} and {report_path} kept for inspection{ties_hint(p, cfg.parity, all_integer)}")
    report["status"] = "ok"
    recorded_latency = (policy.provenance.get("metrics") or {}).get("latency")
    if recorded_latency and cfg.latency_seconds > 0 and not tgt.runs_engine:
        emit(callback, ProgressEvent("info", "export", message="timing the model against its latency budget"))
        report["latency_budget"] = budget_latency(data, recorded_latency, policy, cfg.latency_seconds)
    if cfg.trt:
        t = report["tensorrt"] = _tensorrt(onnx_path, out, cfg, policy, loader)
        problems = (t["precision_check"] or {}).get("problems", [])
        if problems and cfg.trt_config.precision_check != "warn":
            report["status"] = "precision_mismatch"
            atomic_write_json(report_path, report)
            raise ExportError(f"TensorRT runs {len(problems)} layer(s) outside their policy precision: "
                              + "; ".join(problems[:6]) + f" (see {report_path}; --trt-warn-precision exports anyway)")
    atomic_write_json(report_path, report)
    report["report"] = str(report_path)
    return report


def logit_step(ref: torch.nn.Module, units, float_units: set[str]):
    """Return the logit step s_x s_w[c] of an integer (QGemm) classifier, or None when the logits are float."""
    heads = [n for n, out in units.layers.items() if out is None and n not in float_units]
    if len(heads) != 1:
        return None
    m = ref.get_submodule(heads[0])
    return (m.input_quantizer.step().detach().float().reshape(()) * m.weight_quantizer.step().detach().float()).numpy()


def _tensorrt(onnx_path: Path, out: Path, cfg: ExportConfig, policy: Policy, loader: Iterable) -> dict:
    """Build model.engine, time it, check layer precisions against the policy (fail unless told to warn),
    compare with ORT."""
    built = build_engine(onnx_path, out, cfg.trt_config)
    prof = profile_engine(built["engine"], cfg.trt_config, list(policy.layers), list(policy.float_layers), onnx_path)
    trt, engine = load_engine(built["engine"])
    images = torch.cat([(b[0] if isinstance(b, (tuple, list)) else b) for b in loader])[:cfg.parity.images]
    cmp = compare_with_ort(Runner(trt, engine), onnx_path, images)
    latency = {"model": built["engine"], **prof, "machine": {**machine_info(), "isa": cpu_isa()},
               "versions": versions(), "provenance": provenance()}
    atomic_write_json(out / "latency.json", latency)
    check = prof.get("precision_check") or {}
    res = {"build": built, "latency": str(out / "latency.json"), "ort_vs_trt": cmp, "precision_check": check,
           "p50_ms": {r["batch"]: r.get("p50_ms") for r in prof["batches"]}}
    return res
