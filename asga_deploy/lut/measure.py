"""Timing of many small ONNX graphs in ONNX Runtime: deployment's session options, alternating rounds, medians.

Every graph gets its own session with the options `asga export` / `asga profile` use (`export.ort.session`),
all sessions sharing one intra-op thread pool of the deployment's thread count (in a separate process:
worker.py). The graphs are timed in rounds, each round running every graph a few times in a rotated order,
so that a slow phase of a shared machine falls on all of them alike; the result is the median (and spread)
of each graph's runs. Small graphs get more runs per round (about `target_ms` each). A layer's units run in a
sequence: once per pass, in model order, so that they find the caches as in the whole model.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import AsgaError, require
from ..progress import Callback, ProgressEvent, emit
from .units import Unit


@dataclass(frozen=True)
class TimingConfig:
    """Rounds, the time each graph gets per round (ms, at most max_runs runs), warm-up runs, ORT threads."""

    rounds: int = 15
    target_ms: float = 5.0
    max_runs: int = 50
    warmup: int = 3
    threads: int = 1
    session_config: tuple[tuple[str, str], ...] = ()  # ONNX Runtime session entries the deployed model sets


class MeasureError(AsgaError):
    """The timing process could not time the graphs."""


OTHERS_MAX = 0.1  # share of the machine's CPU other processes may take while timing before a table is flagged


def cpu_clock() -> tuple[float, float, float]:
    """Return (wall s, CPU s every process has used, CPU s of this process and its finished children) now; two
    readings give the share of the CPU other processes took between them (others_share)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")  # no /proc/stat: the share is unknown
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), busy, r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def others_share(start: tuple[float, float, float]) -> float:
    """Return the share (0..1) of the machine's CPU time that other processes used since cpu_clock() gave start
    (nan where /proc/stat is missing)."""
    wall, busy, own = cpu_clock()
    return max(0.0, (busy - start[1]) - (own - start[2])) / max((wall - start[0]) * (os.cpu_count() or 1), 1e-9)


def feed(unit: Unit, batch: int, seed: int = 0) -> np.ndarray:
    """Return a random input of the unit's shape and type at a batch size (codes for integer inputs)."""
    rng = np.random.default_rng(seed)
    shape = (batch, *unit.input_shape)
    if unit.input_dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if unit.input_dtype == "int8":
        return rng.integers(-128, 128, size=shape, dtype=np.int8)
    return rng.standard_normal(shape).astype(np.float32)


def transpose_unit(key: str, shape: tuple[int, ...], perm: tuple[int, ...], dtype: str) -> Unit:
    """Return a graph that only transposes its input (the layout change ORT puts at an integer unit's boundary)."""
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper

    elem = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}.get(dtype, TensorProto.FLOAT)
    dims = ["batch", *shape]
    out = [dims[p] for p in perm]
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=list(perm))], "transpose",
                          [helper.make_tensor_value_info("x", elem, dims)],
                          [helper.make_tensor_value_info("y", elem, out)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Unit(key, model.SerializeToString(), tuple(shape), dtype)


def boundary_transposes(unit: Unit, threads: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], str]]:
    """Return the layout changes ONNX Runtime puts in a unit between its 8-bit input or output codes and its integer
    kernel (NCHW -> NHWC before, NHWC -> NCHW after), as (side, shape without batch, perm, dtype). In the whole
    model consecutive integer layers stay NHWC: these Transposes appear only where the layout changes."""
    onnx = require("onnx", "onnx")
    from ..export.ort import session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(unit.onnx, threads, optimized_path=path)
        opt = onnx.load(str(path), load_external_data=False)
    out = onnx.load_from_string(unit.onnx).graph.output[0].type.tensor_type
    out_dims = tuple(int(d.dim_value) for d in out.shape.dim[1:])
    out_type = {2: "uint8", 3: "int8"}.get(out.elem_type)
    found = []
    for n in opt.graph.node:
        perm = tuple(next((list(a.ints) for a in n.attribute if a.name == "perm"), []))
        if n.op_type != "Transpose" or len(perm) != 4:
            continue
        if perm == (0, 2, 3, 1) and unit.input_dtype != "float32" and len(unit.input_shape) == 3:
            found.append(("in", unit.input_shape, perm, unit.input_dtype))
        elif perm == (0, 3, 1, 2) and out_type is not None and len(out_dims) == 3:
            found.append(("out", (out_dims[1], out_dims[2], out_dims[0]), perm, out_type))
    return found


def median_times(units: Mapping[str, Unit], batch: int, cfg: TimingConfig, callback: Callback | None = None,
                 sequences: Mapping[str, list[str]] | None = None) -> dict[str, dict]:
    """Return {key: {median_ms, p10_ms, p90_ms, runs}} of every unit, timed in alternating rounds in a fresh process
    whose sessions share one thread pool of cfg.threads threads (worker.py says why); the units of a sequence run
    once per pass in its order and are reported as "<sequence>/<key>"."""
    job = {"units": {k: (u.onnx, list(u.input_shape), u.input_dtype) for k, u in units.items()}, "batch": batch,
           "cfg": asdict(cfg), "session_config": dict(cfg.session_config),
           "sequences": {k: list(v) for k, v in (sequences or {}).items()}}
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="asga-lut-") as tmp:
        job_path, out_path = Path(tmp) / "job.pkl", Path(tmp) / "times.json"
        with open(job_path, "wb") as f:
            pickle.dump(job, f)
        proc = subprocess.Popen([sys.executable, "-m", "asga_deploy.lut.worker", str(job_path), str(out_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            emit(callback, ProgressEvent("step", "lut timing", 1, 1, int(msg["round"]), int(msg["rounds"]),
                                         {"load": round(float(msg["load"]), 2)}))
        err = proc.stderr.read()
        if proc.wait() != 0 or not out_path.is_file():
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no message"]
            raise MeasureError(f"the timing process failed (exit {proc.returncode}): {last[0][:300]}")
        return json.loads(out_path.read_text(encoding="utf-8"))
