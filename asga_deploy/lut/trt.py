"""`asga lut --target tensorrt`: a latency table from per-layer engine profiles (TensorRT's IProfiler).

Three engines of the whole model, each exported as `asga export` does for TensorRT (signed INT8 Q/DQ, float
layers FP16 in the graph) and statically checked (export/check.check_tensorrt): every layer at the target's
highest bits (INT8, the reference), every layer with 4-bit activations (INT8 with a Clip before each Q), and
every layer float (FP16). Each layer's entry is the summed mean time of the TensorRT layers it was fused into
(export/trt_check.per_policy_layer), at the table's batch size; rest_ms = the INT8 engine's end-to-end median
less the sum of its layers. Reformatting between FP16 and INT8 layers of a mixed engine is not in the table
(no float-pair edges either): `rest_check` is left to a mixed engine on the GPU.

Not run here (no TensorRT on these machines): without TensorRT or a GPU it fails with MissingDependencyError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import ExportError
from ..models import create_model
from ..policy import costs_at
from ..progress import Callback, ProgressEvent, emit
from ..targets import Target
from .table import FORMAT, cache_key
from .units import kernel_choices, lowered, make_policy

TRT_KERNELS = ("int8", "requant", "float")


def trt_key(cfg, shape: tuple[int, int, int]) -> dict:
    """Return the cache key of a TensorRT table (TensorRT version, GPU name); raise MissingDependencyError without
    TensorRT or a GPU."""
    import torch

    from ..export.trt import require_tensorrt

    trt = require_tensorrt()
    return cache_key(backend="tensorrt", backend_version=trt.__version__, isa=torch.cuda.get_device_name(0),
                     threads=0, batch=cfg.batch_size, input_shape=list(shape), model=cfg.model,
                     num_classes=cfg.num_classes, target=cfg.target, format=FORMAT)


def trt_graphs(model: str, target: Target, shape: tuple[int, int, int], num_classes: int, seed: int = 0
               ) -> tuple[dict, dict]:
    """Return ({kernel: ONNX ModelProto the engine is built from}, layer costs); every graph passes the static
    TensorRT check (else ExportError naming the problems)."""
    from ..export.check import check_tensorrt
    from ..export.graph import fp16_variant

    costs = costs_at(create_model(model, num_classes=num_classes, in_chans=shape[0]), shape, model)
    uniform = kernel_choices(target, costs)
    choices = {"int8": uniform["int8"], "requant": uniform["requant"], "float": dict.fromkeys(costs)}
    out = {}
    for kernel in TRT_KERNELS:
        pol = make_policy(model, target.name, costs, choices[kernel], shape, num_classes)
        proto = lowered(model, pol, shape, num_classes, seed)
        if pol.float_layers:
            proto = fp16_variant(proto, pol.float_layers)
        problems = check_tensorrt(proto)
        if problems:
            raise ExportError(f"the {kernel} graph of {model} fails the static TensorRT check: {'; '.join(problems[:4])}")
        out[kernel] = proto
    return out, costs


def measure_trt(cfg, target: Target, shape: tuple[int, int, int], callback: Callback | None = None) -> dict:
    """Return the table body measured from per-layer profiles of three TensorRT engines at the table's batch."""
    from ..export.trt import (
        Runner,
        TrtConfig,
        build_engine,
        layer_times,
        load_engine,
        require_tensorrt,
        time_engine,
    )
    from ..export.trt_check import per_policy_layer
    from .build import legal_keys

    require_tensorrt()
    graphs, costs = trt_graphs(cfg.model, target, shape, cfg.num_classes, cfg.seed)
    names = list(costs)
    b = cfg.batch_size
    tcfg = TrtConfig(min_batch=b, opt_batch=b, max_batch=b, batch_sizes=(b,), fp16=True)
    per_layer, e2e, builds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, proto in graphs.items():
            emit(callback, ProgressEvent("info", "lut", message=f"TensorRT engine ({kernel}), batch {b}"))
            d = Path(tmp) / kernel
            d.mkdir()
            onnx_path = d / "model.qdq.onnx"
            onnx_path.write_bytes(proto.SerializeToString())
            built = build_engine(onnx_path, d, tcfg)
            trt, engine = load_engine(built["engine"])
            runner = Runner(trt, engine)
            e2e[kernel] = time_engine(runner, (b,), tcfg.warmup, tcfg.iters)[0]
            rows = layer_times(trt, engine, runner, b, tcfg.layer_iters)
            per_layer[kernel] = per_policy_layer(rows, names)
            builds[kernel] = {k: v for k, v in built.items() if k in ("tensorrt", "strongly_typed", "build_s")}
    kernels = {n: {k: per_layer[k][n] for k in TRT_KERNELS} for n in names}
    lut = {n: {c: k["float"] if c == "float" else (k["int8"] if c.endswith(f"a{max(target.act_bits(costs[n].input_signed))}")
                                                   or c == "w8a8" else k["requant"])
               for c in legal_keys(target, costs[n].input_signed)} for n, k in kernels.items()}
    rest = e2e["int8"]["p50_ms"] - sum(k["int8"] for k in kernels.values())
    return {"layers": lut, "kernels": kernels, "edges": [], "rest_ms": rest,
            "reference_ms": {"w8a8": e2e["int8"]["p50_ms"], "float_layers": e2e["float"]["p50_ms"]},
            "other_ms": {k: v["(other)"] for k, v in per_layer.items()}, "engines": builds,
            "layer_info": {n: {"kind": c.kind, "macs": c.macs, "params": c.params, "input_signed": c.input_signed}
                           for n, c in costs.items()},
            "note": "per-layer IProfiler means (they include the profiler's overhead); reformatting between FP16 and "
                    "INT8 layers of mixed engines is not modelled"}
