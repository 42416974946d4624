"""Timing primitives shared by ONNX Runtime and TensorRT profiling: percentiles, alternating rounds."""

from __future__ import annotations

import time

import numpy as np

from ..errors import AsgaError
from .ort import default_threads, session


def percentiles(times_ms: list[float], batch: int) -> dict:
    """Return p50/p90/p99/mean (ms) and throughput (images/s at the median) of a list of timings."""
    a = np.asarray(times_ms, dtype=np.float64)
    p50 = float(np.percentile(a, 50))
    return {"batch": batch, "iters": len(a), "p50_ms": p50, "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "throughput_ips": batch * 1000.0 / p50 if p50 > 0 else None}


def time_session(sess, x: np.ndarray, warmup: int, iters: int) -> list[float]:
    """Return per-run wall times (ms) of an ORT session on x after warm-up."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def input_shape(sess, input_size: int | None) -> tuple[int, int, int]:
    """Return the (C, H, W) an ORT session takes, using input_size where H/W are dynamic."""
    shape = sess.get_inputs()[0].shape
    c, h, w = shape[1:4]
    if not isinstance(c, int):
        raise AsgaError(f"the model input {shape} has no fixed channel count")
    if not (isinstance(h, int) and isinstance(w, int)):
        if input_size is None:
            raise AsgaError(f"the model input {shape} has a dynamic size: pass --input-size")
        h = w = input_size
    return c, h, w


def alternate_latency(models: dict[str, str], batches, rounds: int, iters: int) -> dict:
    """Return per-model, per-batch median latency (ms) over alternating rounds, and ratios to 'float'."""
    threads = default_threads()
    sessions = {k: session(p, threads) for k, p in models.items()}
    c, h, w = input_shape(next(iter(sessions.values())), None)
    rng = np.random.default_rng(0)
    out: dict = {"threads": threads, "rounds": rounds, "iters_per_round": iters, "batches": {}}
    for b in batches:
        x = rng.standard_normal((b, c, h, w)).astype(np.float32)
        samples: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            time_session(s, x, 5, 1)  # warm-up
        for _ in range(rounds):
            for k, s in sessions.items():
                samples[k] += time_session(s, x, 0, iters)
        med = {k: float(np.median(v)) for k, v in samples.items()}
        out["batches"][str(b)] = {"median_ms": med, "vs_float": {k: v / med["float"] for k, v in med.items()}}
    if not out["batches"]:
        raise AsgaError("no batch sizes to time")
    return out
