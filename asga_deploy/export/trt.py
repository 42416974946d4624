"""TensorRT 10/11: engine build from the QDQ ONNX, CUDA-event latency, per-layer times, precision check.

TensorRT 10 builds weakly typed by default (INT8 from Q/DQ, FP16 allowed for float layers by flag) or
strongly typed on request; TensorRT 11 is always strongly typed (no precision flags exist): float
layers are FP16 only when the graph says so (`asga export --fp16`). Buffers are torch CUDA tensors.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError, MissingDependencyError, require
from ..io import atomic_write_bytes, atomic_write_text
from .ort import session
from .timing import percentiles
from .trt_check import check_precisions, expectations, onnx_names, per_policy_layer, split_name

_KEEP: list = []
INSTALL_HINT = ("pip install 'asga-deploy[trt]' on a machine with an NVIDIA GPU and driver, or run the "
                "NGC container from the Dockerfile")


@dataclass(frozen=True)
class TrtConfig:
    """Engine build and timing settings (optimization profile over the batch, workspace, iterations)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_gb: float = 4.0
    optimization_level: int = 3
    strongly_typed: bool = False  # TensorRT 10 only (11 is always strongly typed)
    fp16: bool = True  # TensorRT 10 weak typing: let float layers run FP16
    warmup: int = 50
    iters: int = 500
    layer_iters: int = 50
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    precision_check: str = "fail"  # a layer not in its policy precision: "fail" the export or "warn"
    log_lines: int = 200  # build log lines kept in memory (all INFO and above go to trt_build.log)
    verbose: bool = False  # also log TensorRT's VERBOSE messages (to the file)


def require_tensorrt():
    """Return the tensorrt module, or raise MissingDependencyError naming what is missing and how to get it."""
    import torch

    try:
        trt = require("tensorrt", "trt")
    except MissingDependencyError:
        raise MissingDependencyError(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise MissingDependencyError("no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT "
                                     f"needs an NVIDIA GPU, its driver and a CUDA build of torch; {INSTALL_HINT}")
    return trt


def trt_major(trt) -> int:
    """Return TensorRT's major version."""
    return int(trt.__version__.split(".")[0])


def _logger(trt, path: str | Path | None = None, keep: int = 200, verbose: bool = False):
    """Return a TensorRT logger that streams INFO and above (VERBOSE too if asked) to a file, keeps only the last
    `keep` lines in memory and counts every severity (a build logs hundreds of thousands of VERBOSE lines)."""

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: deque[str] = deque(maxlen=keep)
            self.counts: Counter = Counter()
            self.file = open(path, "w") if path is not None else None  # noqa: SIM115 (closed by close())

        def log(self, severity, msg):
            level = str(severity).rsplit(".", 1)[-1]
            self.counts[level] += 1
            if level == "VERBOSE" and not verbose:
                return
            line = f"[{level}] {msg}"
            self.lines.append(line)
            if self.file is not None:
                self.file.write(line + "\n")

        def close(self):
            if self.file is not None:
                self.file.close()
                self.file = None

    return _Log()


def build_engine(onnx_path: str | Path, out_dir: str | Path, cfg: TrtConfig = TrtConfig()) -> dict:
    """Build and save model.engine (timing cache and build log kept beside it); return the build facts."""
    trt = require_tensorrt()
    out_dir = Path(out_dir)
    major = trt_major(trt)
    log = _logger(trt, out_dir / "trt_build.log", cfg.log_lines, cfg.verbose)
    try:
        return _build(trt, major, log, onnx_path, out_dir, cfg)
    finally:
        log.close()


def _build(trt, major: int, log, onnx_path, out_dir: Path, cfg: TrtConfig) -> dict:
    builder = trt.Builder(log)
    strongly = major >= 11 or cfg.strongly_typed
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if (major < 11 and strongly) else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errs[:500]}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = cfg.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    if not strongly:  # TensorRT 10 weak typing: Q/DQ need INT8 enabled; FP16 for the float layers
        config.set_flag(trt.BuilderFlag.INT8)
        if cfg.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        profile.set_shape(t.name, (cfg.min_batch, *rest), (cfg.opt_batch, *rest), (cfg.max_batch, *rest))
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        errors = [x for x in log.lines if x.startswith(("[ERROR]", "[INTERNAL_ERROR]"))][-5:]
        raise ExportError(f"TensorRT engine build failed: {' | '.join(errors)[:500]} (log: {out_dir / 'trt_build.log'})")
    engine_path = atomic_write_bytes(out_dir / "model.engine", bytes(plan))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {"engine": str(engine_path), "tensorrt": trt.__version__, "strongly_typed": strongly,
            "fp16_flag": (not strongly) and cfg.fp16, "build_s": build_s, "timing_cache": str(cache_path),
            "build_log": str(out_dir / "trt_build.log"), "log_counts": dict(log.counts), "config": asdict(cfg)}


def load_engine(path: str | Path):
    """Return (tensorrt module, deserialized engine)."""
    trt = require_tensorrt()
    runtime = trt.Runtime(_logger(trt, keep=50))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    _KEEP.append(runtime)  # a runtime must outlive the engines it deserialized
    if engine is None:
        raise ExportError(f"{path} is not a TensorRT engine for this TensorRT version/GPU")
    return trt, engine


class Runner:
    """Runs an engine on torch CUDA tensors (names from the engine's I/O tensors)."""

    def __init__(self, trt, engine):
        import torch

        self.trt, self.engine, self.torch = trt, engine, torch
        self.ctx = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream()

    def max_batch(self) -> int:
        """Return the largest batch of the engine's first optimization profile."""
        return int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])

    def input_shape(self) -> tuple[int, ...]:
        """Return the (C, H, W) the engine takes."""
        return tuple(int(d) for d in self.engine.get_tensor_shape(self.inputs[0]))[1:]

    def bind(self, x):
        """Set shapes and addresses for input x (CUDA float tensor); return the output tensors."""
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream())  # x was written on the current stream
        self.ctx.set_input_shape(self.inputs[0], tuple(x.shape))
        self.ctx.set_tensor_address(self.inputs[0], x.data_ptr())
        outs = {}
        for n in self.outputs:
            dt = {self.trt.float16: torch.float16}.get(self.engine.get_tensor_dtype(n), torch.float32)
            outs[n] = torch.empty(tuple(self.ctx.get_tensor_shape(n)), dtype=dt, device="cuda")
            self.ctx.set_tensor_address(n, outs[n].data_ptr())
        return outs

    def execute(self) -> None:
        """Enqueue one inference on the runner's stream."""
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed")

    def __call__(self, x):
        outs = self.bind(x.contiguous())
        self.execute()
        self.stream.synchronize()
        return outs[self.outputs[0]].float()


def time_engine(runner: Runner, batch_sizes, warmup: int, iters: int) -> list[dict]:
    """Return CUDA-event latency percentiles per batch size (batches above the profile's max skipped)."""
    torch = runner.torch
    res = []
    for b in batch_sizes:
        if b > runner.max_batch():
            res.append({"batch": b, "skipped": f"above the engine's max batch {runner.max_batch()}"})
            continue
        x = torch.randn((b, *runner.input_shape()), device="cuda")
        runner.bind(x)
        for _ in range(warmup):
            runner.execute()
        runner.stream.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(runner.stream)
            runner.execute()
            end.record(runner.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        res.append(percentiles(times, b))
    return res


def layer_times(trt, engine, runner: Runner, batch: int, iters: int) -> list[dict]:
    """Return mean per-layer times (IProfiler, a separate run) with the ONNX node names of each layer."""

    class _Prof(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name, ms):
            self.times.setdefault(layer_name, []).append(ms)

    torch = runner.torch
    prof_runner = Runner(trt, engine)
    prof = _Prof()
    prof_runner.ctx.profiler = prof
    x = torch.randn((min(batch, runner.max_batch()), *runner.input_shape()), device="cuda")
    prof_runner.bind(x)
    for _ in range(iters):
        prof_runner.execute()
        prof_runner.stream.synchronize()
    meta = {d["Name"]: onnx_names(d) for d in inspect_engine(trt, engine)}
    rows = [{"trt_layer": k, "mean_ms": float(np.mean(v)), "onnx_nodes": meta.get(k, split_name(k))}
            for k, v in prof.times.items()]
    return sorted(rows, key=lambda r: -r["mean_ms"])


def inspect_engine(trt, engine) -> list[dict]:
    """Return the engine inspector's layer list (DETAILED verbosity), TensorRT 10 or 11 schema."""
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return [d if isinstance(d, dict) else {"Name": d} for d in info.get("Layers", [])]


def compare_with_ort(runner: Runner, onnx_path: str | Path, images) -> dict:
    """Return ONNX Runtime (CPU) vs TensorRT top-1 agreement and logit differences on images (N,C,H,W)."""
    torch = runner.torch
    sess = session(onnx_path)
    name = sess.get_inputs()[0].name
    agree, diffs, count = 0, [], 0
    for i in range(0, len(images), runner.max_batch()):
        x = images[i:i + runner.max_batch()].float()
        lo = sess.run(None, {name: x.numpy()})[0]
        lt = runner(x.to("cuda")).cpu().numpy()
        agree += int((lo.argmax(1) == lt.argmax(1)).sum())
        diffs.append(np.abs(lo - lt).reshape(-1))
        count += len(x)
    torch.cuda.synchronize()
    d = np.concatenate(diffs) if diffs else np.zeros(1)
    return {"images": count, "top1_agreement": agree / max(count, 1), "max_abs_logit_diff": float(d.max()),
            "median_abs_logit_diff": float(np.median(d))}


def profile_engine(path: str | Path, cfg, quantized: list[str] | None = None,
                   float_layers: list[str] | None = None, onnx_path: str | Path | None = None) -> dict:
    """Return end-to-end CUDA-event latency, per-layer times at every batch size (summed per policy layer) and
    the inspector's precision check of an engine (its ONNX file, when given, says which outputs must be INT8)."""
    import torch

    trt, engine = load_engine(path)
    runner = Runner(trt, engine)
    warmup, iters = getattr(cfg, "warmup", 50), getattr(cfg, "iters", 500)
    res = {"runtime": "tensorrt", "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
           "input_shape": list(runner.input_shape()), "batches": time_engine(runner, cfg.batch_sizes, warmup, iters)}
    policy_layers = [*(quantized or []), *(float_layers or [])]
    res["layers"], res["per_policy_layer"] = {}, {}
    for b in cfg.batch_sizes:  # the IProfiler runs apart from the timing above: it adds overhead
        if b > runner.max_batch():
            continue
        rows = layer_times(trt, engine, runner, b, getattr(cfg, "layer_iters", 50))
        res["layers"][str(b)] = rows
        res["per_policy_layer"][str(b)] = per_policy_layer(rows, policy_layers)
    layers = inspect_engine(trt, engine)
    dump = Path(path).with_name("engine_layers.json")  # the full inspector dump, for the record
    atomic_write_text(dump, json.dumps(layers, indent=1) + "\n")
    res["inspector"] = {"layers": len(layers), "dump": str(dump)}
    if quantized is not None:
        weak_fp16 = trt_major(trt) < 11 and not getattr(cfg, "strongly_typed", False) and getattr(cfg, "fp16", True)
        int8_out, float_dtype = expectations(onnx_path, quantized, float_layers or [], weak_fp16)
        res["precision_check"] = check_precisions(layers, quantized, float_layers or [], int8_out, float_dtype)
    return res
