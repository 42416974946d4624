"""The timing process of `measure.median_times` (python -m asga_deploy.lut.worker JOB OUT).

It runs apart so that its ONNX Runtime environment can be created with ONE global intra-op thread pool of the
deployment's thread count, shared by every session it times. With a pool per session (ORT's default), the
idle sessions' worker threads keep spinning while another session runs: measured here, ResNet-20 (batch 1, 2
threads) ran 0.163 ms alternating with 6 other sessions against 0.114 ms alone; with one shared pool it runs
0.115 ms alternating, as alone. Session options are otherwise those of export/ort.session (all graph
optimizations, the model's session entries).

Two ways of running a unit, each round: alone, back to back (a whole model, a layout change), or inside a
sequence, once per pass through units that run one after the other in model order, so that each finds the
caches as the layers before it leave them in the whole model (a layer whose weights stay cached when it runs
alone may not in the model: ResNet-18's float weights are 47 MB). Its stdout is a line protocol
({"round": r} per round) read by the parent; the result is written to OUT as JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time


def sessions(units: dict, threads: int, config: dict) -> dict:
    """Return an InferenceSession per unit, all on one global thread pool of `threads` intra-op threads."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as pybind

    pybind.set_global_thread_pool_sizes(max(int(threads), 1), 1)
    out = {}
    for k, (model, *_) in units.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.use_per_session_threads = False
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in config.items():
            so.add_session_config_entry(key, value)
        out[k] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return out


def _passes(seconds: list[float], cfg: dict) -> int:
    """Return how many runs (or passes) a round gives something that takes about min(seconds)."""
    return int(min(cfg["max_runs"], max(1, round(cfg["target_ms"] / max(1000.0 * min(seconds), 1e-3)))))


def run(job: dict) -> dict:
    """Time every unit of a job in alternating rounds; return {key: {median_ms, p10_ms, p90_ms, runs}} (units in
    a sequence under "<sequence>/<key>"; a unit timed alone also has per_round_ms, its mean in each round, for
    ratios paired within a round)."""
    import numpy as np

    from .measure import feed
    from .units import Unit

    cfg, batch, units = job["cfg"], job["batch"], job["units"]
    seqs: dict[str, list[str]] = job.get("sequences") or {}
    sess = sessions(units, cfg["threads"], job.get("session_config") or {})
    feeds = {k: {sess[k].get_inputs()[0].name: feed(Unit(k, b"", tuple(units[k][1]), units[k][2]), batch, i)}
             for i, k in enumerate(units)}

    def once(k: str) -> float:
        t0 = time.perf_counter()
        sess[k].run(None, feeds[k])
        return time.perf_counter() - t0

    alone = [k for k in units if not any(k in s for s in seqs.values())]
    items = [("unit", k) for k in alone] + [("seq", name) for name in seqs]
    reps = {}
    for kind, k in items:  # warm-up, and a first estimate that sizes the runs per round
        t = [sum(once(u) for u in seqs[k]) if kind == "seq" else once(k) for _ in range(max(cfg["warmup"], 1))]
        reps[k] = _passes(t, cfg)
    samples: dict[str, list[float]] = {k: [] for k in alone}
    samples.update({f"{name}/{k}": [] for name, keys in seqs.items() for k in keys})
    per_round: dict[str, list[float]] = {k: [] for k in alone}  # mean of a unit's runs in each round
    for r in range(cfg["rounds"]):
        for kind, k in items[r % len(items):] + items[:r % len(items)]:
            if kind == "unit":
                samples[k] += [1000.0 * once(k) for _ in range(reps[k])]
                per_round[k].append(float(np.mean(samples[k][-reps[k]:])))
                continue
            for _ in range(reps[k]):
                for u in seqs[k]:
                    samples[f"{k}/{u}"].append(1000.0 * once(u))
        sys.stdout.write(json.dumps({"round": r + 1, "rounds": cfg["rounds"], "load": os.getloadavg()[0]}) + "\n")
        sys.stdout.flush()
    return {k: {"median_ms": float(np.median(v)), "p10_ms": float(np.percentile(v, 10)),
                "p90_ms": float(np.percentile(v, 90)), "runs": len(v),
                **({"per_round_ms": per_round[k]} if k in per_round else {})} for k, v in samples.items()}


def main(argv: list[str]) -> int:
    """Read the pickled job, time it, write the JSON result; return the exit code."""
    with open(argv[0], "rb") as f:
        job = pickle.load(f)  # written by measure.median_times in a private temporary folder
    result = run(job)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
