"""`asga profile`: latency of an ONNX file (ONNX Runtime CPU) or a TensorRT engine, per batch size."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import AsgaError, require
from ..io import atomic_write_json, check_writable, machine_info, not_a_file, provenance, versions
from .kernels import integer_kernels
from .ort import cpu_isa, default_threads, recorded_session_config, session
from .timing import input_shape, percentiles, time_session
from .trt import profile_engine


@dataclass(frozen=True)
class ProfileConfig:
    """What to time: batch sizes, threads (0: all cores of this process), warm-up and timed iterations."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    threads: int = 0
    warmup: int = 10
    iters: int = 50
    input_size: int | None = None  # spatial size when the model's input is not fixed
    kernels: bool = True  # ONNX Runtime: report which quantized layers became integer kernels


def profile_onnx(path: str | Path, cfg: ProfileConfig) -> dict:
    """Return ONNX Runtime latency per batch size, and the integer-kernel report of the optimized graph."""
    threads = cfg.threads or default_threads()
    sess = session(path, threads)
    c, h, w = input_shape(sess, cfg.input_size)
    rng = np.random.default_rng(0)
    res = {"runtime": "onnxruntime", "provider": "CPUExecutionProvider", "threads": threads,
           "session_config": recorded_session_config(sess), "isa": cpu_isa(), "input_shape": [c, h, w], "batches": []}
    for b in cfg.batch_sizes:
        x = rng.standard_normal((b, c, h, w)).astype(np.float32)
        res["batches"].append(percentiles(time_session(sess, x, cfg.warmup, cfg.iters), b))
    if cfg.kernels:
        res["integer_kernels"] = integer_kernels(path, threads)
    return res


def onnx_metadata(path: str | Path) -> dict:
    """Return the asga metadata of an ONNX file (policy, target; empty for foreign files)."""
    onnx = require("onnx", "onnx")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    out = {}
    for k in ("asga.policy", "asga.provenance"):
        if k in meta:
            out[k.split(".", 1)[1]] = json.loads(meta[k])
    out.update({k.split(".", 1)[1]: v for k, v in meta.items() if k in ("asga.target", "asga.opset")})
    return out


def run_profile(model: str | Path, cfg: ProfileConfig, out: str | Path | None = None, force: bool = False) -> dict:
    """Profile an .onnx (ONNX Runtime) or .engine (TensorRT) file; write latency.json beside it; return it."""
    model = Path(model)
    problem = not_a_file(model)
    if problem:
        raise AsgaError(f"{model} {problem}")
    out = Path(out) if out is not None else model.parent / "latency.json"
    check_writable(out, force)
    if model.suffix == ".onnx":
        res = profile_onnx(model, cfg)
        meta = onnx_metadata(model)
        pol = meta.get("policy")
        if pol and "integer_kernels" in res:
            plan = [n for n in pol.get("layers", {})]
            got = res["integer_kernels"]["layers"]
            res["integer_kernels"]["policy_layers_not_integer"] = [n for n in plan if not got.get(n, {}).get(
                "integer")]
    elif model.suffix in (".engine", ".plan", ".trt"):
        sibling = model.parent / "model.qdq.onnx"  # its policy says which layers should run INT8
        pol = onnx_metadata(sibling).get("policy") if sibling.is_file() else None
        res = profile_engine(model, cfg, list(pol["layers"]) if pol else None,
                             list(pol.get("float_layers", [])) if pol else None, sibling)
    else:
        raise AsgaError(f"{model}: profile takes an .onnx or .engine file")
    report = {"model": str(model), "config": asdict(cfg), **res, "machine": {**machine_info(), "isa": cpu_isa()},
              "versions": versions(), "provenance": provenance()}
    atomic_write_json(out, report)
    report["path"] = str(out)
    return report
