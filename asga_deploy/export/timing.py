"""Timing primitives shared by ONNX Runtime and TensorRT profiling: percentiles, timed session runs."""

from __future__ import annotations

import time

import numpy as np

from ..errors import AsgaError


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
