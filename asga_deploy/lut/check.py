"""The exported model's measured latency against the latency budget its policy was searched for."""

from __future__ import annotations

import time

from ..errors import AsgaError
from . import measure
from .table import LutError, load_lut, predict_latency

STATE_TOL = 0.10  # the table's W8A8 model timed this much slower or faster now: the machine is in another state
STATE_RETRIES, STATE_WAIT_S = 2, 20.0  # timed again this often, this far apart, while in another state


def budget_latency(model: bytes, recorded: dict, policy, seconds: float = 3.0) -> dict:
    """Return the exported model's measured latency next to the latency budget and prediction a policy records.

    `recorded`: the policy's metrics["latency"] ({"predicted_ms", "budget_ms", "lut"}). The model is timed as the
    table was measured (its batch, input shape, ONNX Runtime threads and session entries, in the table's timing
    process, alternating rounds, medians), together with the table's own W8A8 model: that one's time now against
    its time in the table says whether the machine is in the state the table describes (a prediction holds for
    that state only). In another state it is timed again (STATE_RETRIES times, STATE_WAIT_S apart; every attempt
    is reported) and the last timing is the result. The prediction is recomputed from the table when it is still
    there.
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
    from .build import reference_unit

    out["predicted_ms"] = predict_latency(table, policy)
    batch, shape, threads = int(table.key["batch"]), tuple(table.key["input_shape"]), int(table.key["threads"])
    timing = table.data.get("timing", {})
    units = {"exported": measure.Unit("exported", model, shape, "float32")}
    then = table.reference_ms.get("w8a8")
    try:
        if then:
            units["whole|int8"] = reference_unit(table)
    except (AsgaError, KeyError, TypeError) as e:  # a table whose build settings no longer lower: time the model alone
        out["reference_problem"] = f"the table's W8A8 model could not be rebuilt ({e})"
    target_ms = float(timing.get("target_ms", 5.0))  # each model runs about this long per round
    rounds = max(5, int(seconds * 1000 / (len(units) * max(target_ms, out["predicted_ms"]))))
    cfg = measure.TimingConfig(rounds=rounds, target_ms=target_ms, threads=threads,
                               session_config=tuple(tuple(e) for e in timing.get("session_config", ())))
    attempts = []
    for attempt in range(1 + STATE_RETRIES):
        if attempt:  # another state than the table's: it often passes within a minute
            time.sleep(STATE_WAIT_S)
        try:
            t = measure.median_times(units, batch, cfg)
        except measure.MeasureError as e:  # the model is exported and checked: say why it was not timed, keep it
            out["status"] = f"not measured: {e}"
            return out
        ratio = t["whole|int8"]["median_ms"] / then if "whole|int8" in t else None
        attempts.append({"measured_ms": t["exported"]["median_ms"], "state_ratio": ratio})
        if ratio is None or abs(ratio - 1.0) <= STATE_TOL:
            break
    measured, budget = t["exported"]["median_ms"], out["budget_ms"]
    out.update(measured_ms=measured, p10_ms=t["exported"].get("p10_ms"), p90_ms=t["exported"].get("p90_ms"),
               runs=t["exported"]["runs"], rounds=cfg.rounds, batch=batch, threads=threads,
               predicted_error=measured / out["predicted_ms"] - 1.0,
               meets_budget=None if budget is None else measured <= budget, status="measured", attempts=attempts)
    if "whole|int8" in t:
        now = t["whole|int8"]["median_ms"]
        out["machine_state"] = {"w8a8_table_ms": then, "w8a8_now_ms": now, "ratio": now / then,
                                "same_state": abs(now / then - 1.0) <= STATE_TOL}
    return out
