"""The exported model's measured latency against the latency budget its policy was searched for."""

from __future__ import annotations

import time

import numpy as np

from ..export.ort import session
from ..export.timing import time_session
from .table import LutError, load_lut, predict_latency


def budget_latency(model: bytes, recorded: dict, policy, seconds: float = 3.0) -> dict:
    """Return the exported model's measured latency next to the latency budget and prediction a policy records.

    `recorded`: the policy's metrics["latency"] ({"predicted_ms", "budget_ms", "lut"}). The model is timed as the
    table was measured (its batch, input shape and ONNX Runtime threads, the model's own session entries), median
    of the runs done in `seconds`; the prediction is recomputed from the table when it is still there.
    """
    out = {"budget_ms": recorded.get("budget_ms"), "predicted_ms": recorded.get("predicted_ms"),
           "lut": recorded.get("lut")}
    try:
        table = load_lut(recorded["lut"]) if recorded.get("lut") else None
    except LutError as e:
        table, out["lut_problem"] = None, str(e)
    if table is None:
        out["status"] = "not measured: " + out.get("lut_problem", "the policy records no latency table")
        return out
    if table.key.get("backend") != "onnxruntime":
        out["status"] = f"not measured: the table is for {table.key.get('backend')}; time the engine with asga profile"
        return out
    out["predicted_ms"] = predict_latency(table, policy)
    batch, shape, threads = int(table.key["batch"]), tuple(table.key["input_shape"]), int(table.key["threads"])
    sess = session(model, threads)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    time_session(sess, x, 5, 1)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 10:
        times += time_session(sess, x, 0, 1)
    measured = float(np.median(times))
    budget = out["budget_ms"]
    out.update(measured_ms=measured, runs=len(times), batch=batch, threads=threads,
               predicted_error=measured / out["predicted_ms"] - 1.0,
               meets_budget=None if budget is None else measured <= budget,
               status="measured")
    return out
