"""ONNX Runtime CPU latency of torchvision ResNet-18: fp32 vs ORT's quantize_static vs our W8A8 / mixed exports.

Random weights (no hub access here); every quantized model is calibrated on the same random images.
Two settings: batch 1 at 3x224x224 and batch 32 at 3x32x32 (each export is made at its input size).
The four models of a setting are timed in one process, alternating in rounds (K runs each per round,
order rotated every round), and compared by their medians: the machine is shared, so absolute times
are noisy and the ratios are the result.

    python benchmarks/ort_latency.py [--rounds 20 --runs 10 --threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asga_deploy.export.kernels import integer_kernels  # noqa: E402
from asga_deploy.export.onnx_qdq import LoweringConfig, lower, prepare_model  # noqa: E402
from asga_deploy.export.ort import session  # noqa: E402
from asga_deploy.io import atomic_write_json, git_commit, machine_info, versions  # noqa: E402
from asga_deploy.models import create_model  # noqa: E402
from asga_deploy.policy import LayerBits, Policy, uniform_policy  # noqa: E402
from asga_deploy.quant import apply_policy, calibrate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "ort_latency.json"


def mixed_policy(base: Policy) -> Policy:
    """A mixed policy: weights 8/6/4 bits in turn, 8-bit activations, 6-bit activations in layer4."""
    pol = copy.deepcopy(base)
    edges = set(base.cost.get("excluded", []))
    for i, (n, b) in enumerate(list(pol.layers.items())):
        if n in edges:
            continue
        w = (8, 6, 4)[i % 3]
        a = 6 if n.startswith("layer4") and "downsample" not in n else 8
        pol.layers[n] = LayerBits(w, a, b.act_signed)
    return pol


def calib_batches(size: int) -> list[torch.Tensor]:
    """Return the random calibration images shared by every quantizer (2 at 224, 8 at 32: CPU time)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn((2 if size > 64 else 8, 3, size, size), generator=g)]


def log(msg: str) -> None:
    """Progress on stderr (a benchmark script, not library code)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_fp32(model: torch.nn.Module, size: int, path: Path) -> None:
    """Export the float model (dynamic batch)."""
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def ort_quantize(fp32: Path, out: Path, batches: list[torch.Tensor]) -> None:
    """ORT's own quantize_static: QDQ, per-channel weights, U8 activations / S8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def our_export(float_model: torch.nn.Module, policy: Policy, size: int, path: Path,
               batches: list[torch.Tensor]) -> None:
    """apply_policy (with ORT's deploy quantizers) -> calibrate -> exact QDQ lowering."""
    m = copy.deepcopy(float_model)
    pol = copy.deepcopy(policy)
    apply_policy(m, pol, validate=False)
    calibrate(m, batches, len(batches))
    proto, _ = lower(prepare_model(m), pol, LoweringConfig("ort"), (3, size, size), {})
    path.write_bytes(proto.SerializeToString())


def time_alternating(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int, runs: int) -> dict:
    """Time the models in alternating rounds; return median/p90 ms and counts per model."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(5):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            for _ in range(runs):
                t0 = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: {"median_ms": float(np.median(v)), "p10_ms": float(np.percentile(v, 10)),
                "p90_ms": float(np.percentile(v, 90)), "n": len(v)} for k, v in times.items()}


def fused_convs(path: Path, threads: int) -> dict:
    """Return how many quantized Conv/Gemm layers ORT turned into integer kernels."""
    k = integer_kernels(path, threads)
    convs = {n: v for n, v in k["layers"].items() if "fc" not in n}
    return {"convs_integer": sum(v["integer"] for v in convs.values()), "convs": len(convs),
            "not_integer": k["not_integer"], "optimized_ops": k["optimized_ops"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    float_model = create_model("resnet18", num_classes=1000, in_chans=3).eval()
    results, settings = {}, [("b1_224", 1, 224), ("b32_32", 32, 32)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for key, batch, size in settings:
            batches = calib_batches(size)
            w8a8 = uniform_policy("resnet18", 8, 8, "ort", num_classes=1000, in_chans=3, input_size=size)
            paths = {k: tmp / f"{key}_{k}.onnx" for k in ("fp32", "ort_quantize_static", "ours_w8a8", "ours_mixed")}
            log(f"{key}: exporting fp32 and ORT quantize_static")
            export_fp32(float_model, size, paths["fp32"])
            ort_quantize(paths["fp32"], paths["ort_quantize_static"], batches)
            log(f"{key}: our W8A8 export (apply_policy, calibrate, lower)")
            our_export(float_model, w8a8, size, paths["ours_w8a8"], batches)
            log(f"{key}: our mixed export")
            our_export(float_model, mixed_policy(w8a8), size, paths["ours_mixed"], batches)
            log(f"{key}: timing {args.rounds} rounds x {args.runs} runs, alternating")
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            timing = time_alternating(paths, x, args.threads, args.rounds, args.runs)
            med = {k: v["median_ms"] for k, v in timing.items()}
            results[key] = {"batch": batch, "input": [3, size, size], "timing": timing,
                            "ratios": {"ours_w8a8_vs_ort_quantize_static": med["ours_w8a8"] / med["ort_quantize_static"],
                                       "ours_w8a8_vs_fp32": med["ours_w8a8"] / med["fp32"],
                                       "ort_quantize_static_vs_fp32": med["ort_quantize_static"] / med["fp32"],
                                       "ours_mixed_vs_fp32": med["ours_mixed"] / med["fp32"]},
                            "integer_kernels": {k: fused_convs(paths[k], args.threads)
                                                for k in ("ort_quantize_static", "ours_w8a8", "ours_mixed")},
                            "mixed_policy": {n: [b.weight_bits, b.act_bits]
                                             for n, b in mixed_policy(w8a8).layers.items()}}
    head = results["b1_224"]["ratios"]
    report = {"benchmark": "ort_latency", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "git_commit": git_commit(), "command": "python " + " ".join(sys.argv),
              "machine": machine_info(), "versions": versions(),
              "settings": {"model": "torchvision resnet18, random weights, 1000 classes",
                           "calibration": "one batch of random-normal images (2 at 224, 8 at 32), the same for ORT and ours",
                           "threads": args.threads, "rounds": args.rounds, "runs_per_round": args.runs,
                           "timing": "alternating rounds, order rotated per round; medians of all runs; "
                                     "the machine was shared with other jobs (noisy)",
                           "ratio_definition": "median latency of our W8A8 export / ORT quantize_static "
                                               "(QDQ, per-channel, U8S8) at batch 1, 3x224x224",
                           "targets": {"ours_w8a8_vs_ort_quantize_static": "<= 1.1", "ours_w8a8_vs_fp32": "<= 0.4"}},
              "results": results, "ratio": head["ours_w8a8_vs_ort_quantize_static"],
              "targets_met": {"ours_w8a8_vs_ort_quantize_static": head["ours_w8a8_vs_ort_quantize_static"] <= 1.1,
                              "ours_w8a8_vs_fp32": head["ours_w8a8_vs_fp32"] <= 0.4,
                              "every_conv_integer": all(
                                  r["integer_kernels"]["ours_w8a8"]["convs_integer"] == r["integer_kernels"]["ours_w8a8"]["convs"]
                                  for r in results.values())}}
    atomic_write_json(OUT, report)
    for key, r in results.items():
        print(key, {k: round(v["median_ms"], 3) for k, v in r["timing"].items()},
              {k: round(v, 3) for k, v in r["ratios"].items()},
              {k: f"{v['convs_integer']}/{v['convs']}" for k, v in r["integer_kernels"].items()})
    print("written", OUT)


if __name__ == "__main__":
    main()
