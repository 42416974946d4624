"""`asga lut`: measure a model's per-layer latency table on a target at a batch size, or return the cached one.

ONNX Runtime (CPU): the units of `units.py` are cut out of the export's own lowering of four uniform policies
(int8 at the target's highest bits, 4-bit activations, every other layer float, the other half float) and
timed with the session options of deployment, alternating (`measure.py`). Below 8 bits every choice runs the
same INT8 kernel, so three distinct kernels are measured per layer and every (w, a) key is filled from them:

    w<W>a8 (and the w8a8 reference)  int8 unit  - session cost - its boundary Transposes (NCHW <-> NHWC)
    w<W>a<A>, A < 8                  requant unit - session cost - its boundary Transposes
    float                            float unit - session cost + the int8 unit's boundary Transposes
                                     (in the whole model the quantized neighbours change layout around it)

plus `edges` (two float layers in a row: pair unit - both islands + session cost - the Transposes between
them) and rest_ms = whole model at the int8 policy - sum of its layers' int8 entries, all from the same
rounds. A float entry mixes what a layer's float island costs in the int8 model with what its int8 island
saves in the every-layer-float model, so that both whole models come out as measured (model.py). The table
records a check: the predicted and measured whole model with every other layer float.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cost import choice_key
from ..errors import OptionError, require
from ..io import atomic_write_json, check_writable, machine_info, provenance, versions
from ..models import model_info
from ..policy import costs_at
from ..progress import Callback, ProgressEvent, emit
from ..targets import Target, get_target
from . import measure
from .model import combine
from .table import FORMAT, SCHEMA, LatencyTable, cache_key, default_path, from_dict, load_lut
from .units import Graph, direct_edges, float_model, kernel_choices, lowered, make_policy

MAX_BATCH = 4096
VARIANTS_PER_JOB = 8
# shares of layers float (at seeded random places, the rest int8) of the whole models the table is checked on and
# was not fitted to: a search exploits wherever the table is wrong, and the fitted alternating models cannot show it
RANDOM_FLOAT_SHARES = (0.25, 0.5)


@dataclass(frozen=True)
class LutConfig:
    """What to measure: model, target, batch size, input shape (None: the model's), threads (0: deployment's),
    output path (None: runs/lut/<key>.json), and how long to time."""

    model: str
    target: str = "ort"
    batch_size: int = 1
    input_size: int | None = None
    in_chans: int | None = None
    num_classes: int = 10
    threads: int = 0
    out: str | None = None
    rounds: int = 15
    target_ms: float = 5.0
    seed: int = 0


def resolve(cfg: LutConfig) -> tuple[Target, tuple[int, int, int], int]:
    """Return (target, input shape, threads) of a config; raise OptionError/UnknownModelError on bad values."""
    target = get_target(cfg.target)
    info = model_info(cfg.model)
    for name, v, hi in (("--batch-size", cfg.batch_size, MAX_BATCH), ("--rounds", cfg.rounds, 10_000),
                        ("--num-classes", cfg.num_classes, 100_000)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise OptionError(f"{name} {v!r}: must be an integer in 1..{hi}")
    for name, v in (("--input-size", cfg.input_size), ("--in-chans", cfg.in_chans)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise OptionError(f"{name} {v!r}: must be a positive integer")
    if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 0:
        raise OptionError(f"--threads {cfg.threads!r}: must be 0 (deployment's default) or a positive integer")
    chans = cfg.in_chans or (1 if info.input_size <= 28 else 3)
    size = cfg.input_size or info.input_size
    from ..export.ort import default_threads

    return target, (chans, size, size), cfg.threads or default_threads()


def table_key(cfg: LutConfig, target: Target, shape: tuple[int, int, int], threads: int) -> dict:
    """Return the cache key: backend and its version, CPU ISA, threads, batch, input shape, model, target."""
    if target.runs_engine:
        from .trt import trt_key

        return trt_key(cfg, shape)
    ort = require("onnxruntime", "onnx")
    from ..export.ort import cpu_isa

    return cache_key(backend="onnxruntime", backend_version=ort.__version__, isa=cpu_isa()["kind"], threads=threads,
                     batch=cfg.batch_size, input_shape=list(shape), model=cfg.model, num_classes=cfg.num_classes,
                     target=target.name, format=FORMAT)


def run_lut(cfg: LutConfig, force: bool = False, callback: Callback | None = None,
            timing: measure.TimingConfig | None = None) -> LatencyTable:
    """Return the model's latency table: the cached file when its key matches (unless force), else a new
    measurement written atomically (JSON, and a PNG plot beside it)."""
    target, shape, threads = resolve(cfg)
    key = table_key(cfg, target, shape, threads)
    path = Path(cfg.out) if cfg.out else default_path(key)
    if path.is_file() and not force:
        table = load_lut(path, expect=key)
        return LatencyTable(table.key, table.lut, table.rest_ms, table.edges, table.reference_ms,
                            {**table.data, "cached": True}, str(path))
    check_writable(path, True)
    t0 = time.time()
    if target.runs_engine:
        from .trt import measure_trt

        body = measure_trt(cfg, target, shape, callback)
    else:
        tcfg = timing or measure.TimingConfig(rounds=cfg.rounds, target_ms=cfg.target_ms, threads=threads,
                                              session_config=session_entries(target))
        body = measure_ort(cfg, target, shape, tcfg, callback)
    data = {"schema": SCHEMA, "key": key, **body, "config": asdict(cfg), "duration_s": time.time() - t0,
            "machine": machine_info(), "versions": versions(), "provenance": provenance()}
    atomic_write_json(path, data)
    try:
        from .plot import plot_lut

        data["plot"] = str(plot_lut(from_dict(data, str(path)), path.with_suffix(".png")))
        atomic_write_json(path, data)
    except ImportError:  # matplotlib is optional: the table stands without its plot
        data["plot"] = None
    return from_dict(data, str(path))


def lower_choice(cfg: LutConfig, target: Target, costs: dict, choice: dict, shape: tuple[int, int, int]):
    """Return the ONNX model `asga export` writes for {layer: (w, a) or None (float)} of the table's model (random
    weights seeded with cfg.seed): every whole model and variant a table times, and its W8A8 reference again."""
    pol = make_policy(cfg.model, target.name, costs, choice, shape, cfg.num_classes)
    return lowered(cfg.model, pol, shape, cfg.num_classes, cfg.seed)


def plan_ort(cfg: LutConfig, target: Target, shape: tuple[int, int, int], threads: int,
             callback: Callback | None = None) -> tuple[dict, dict]:
    """Return (the units to time by key, what the table needs to combine their times)."""
    from ..models import create_model

    costs = costs_at(create_model(cfg.model, num_classes=cfg.num_classes, in_chans=shape[0]), shape, cfg.model)
    names = list(costs)
    graphs, units = {}, {}
    for kernel, choice in kernel_choices(target, costs).items():
        emit(callback, ProgressEvent("info", "lut", message=f"lowering {cfg.model} ({kernel})"))
        graphs[kernel] = (Graph(lower_choice(cfg, target, costs, choice, shape)), choice)
    all_float = Graph(lower_choice(cfg, target, costs, dict.fromkeys(names), shape))
    edges = direct_edges(all_float, names)
    # the int8 (and the 4-bit) model with one layer, or one direct pair, float: what a float island costs in place,
    # next to integer layers with 8-bit or with requantized inputs (ORT's graph around it differs); and the
    # every-layer-float model with one layer int8: what a layer costs in place inside a float chain
    hi = graphs["int8"][1]
    plan = [("island", graphs["int8"][1], (n,), None) for n in names] + [
        ("island", graphs["int8"][1], e, None) for e in edges] + [
        ("islandR", graphs["requant"][1], (n,), None) for n in names] + [
        ("islandF", dict.fromkeys(names), (n,), hi[n]) for n in names]
    emit(callback, ProgressEvent("info", "lut", message=f"lowering {len(plan)} variants of the int8, 4-bit and float "
                                 "models, each with one layer (or one pair) changed"))
    variants = {}
    for prefix, base, changed, value in plan:
        key = f"{prefix}|" + "|".join(changed)
        proto = lower_choice(cfg, target, costs, {n: value if n in changed else base[n] for n in names}, shape)
        variants[key] = measure.Unit(key, proto.SerializeToString(), shape, "float32")
    for n in names:
        for kernel in ("int8", "requant", "float"):
            g = graphs[kernel if kernel != "float" else ("float_even" if graphs["float_even"][1][n] is None
                                                         else "float_odd")][0]
            units[f"{kernel}|{n}"] = g.cut(f"{kernel}|{n}", g.unit_input(n), g.unit_output(n))
    sequences = {k: [f"{k}|{n}" for n in names] for k in ("int8", "requant", "float")}
    transposes: dict[str, list[str]] = {}
    for n in names:
        for kernel in ("int8", "requant"):
            found = measure.boundary_transposes(units[f"{kernel}|{n}"], threads)
            transposes[f"{kernel}|{n}"] = []
            for side, tshape, perm, dtype in found:
                k = f"transpose|{dtype}|{'x'.join(map(str, tshape))}|{''.join(map(str, perm))}"
                units.setdefault(k, measure.transpose_unit(k, tshape, perm, dtype))
                transposes[f"{kernel}|{n}"].append(f"{side}:{k}")
    units["overhead"] = measure.transpose_unit("overhead", (1, 1, 1), (0, 2, 3, 1), "uint8")
    rng, random_float = random.Random(cfg.seed), {}
    for share in RANDOM_FLOAT_SHARES:
        picked = sorted(rng.sample(range(len(names)), max(1, round(share * len(names)))))
        floats = [names[i] for i in picked]
        key = "random|" + "|".join(floats)
        proto = lower_choice(cfg, target, costs, {n: None if n in floats else hi[n] for n in names}, shape)
        units[key] = measure.Unit(key, proto.SerializeToString(), shape, "float32")
        random_float[key] = share
    for label, proto in (("whole|int8", graphs["int8"][0].proto), ("whole|requant", graphs["requant"][0].proto),
                         ("whole|float_layers", all_float.proto),
                         ("whole|alt_float", graphs["float_odd"][0].proto),
                         ("whole|float_even", graphs["float_even"][0].proto),
                         ("whole|fp32", float_model(cfg.model, shape, cfg.num_classes, cfg.seed))):
        units[label] = measure.Unit(label, proto.SerializeToString(), shape, "float32")
    info = {"layers": {n: {"kind": c.kind, "macs": c.macs, "params": c.params, "input_signed": c.input_signed}
                       for n, c in costs.items()},
            "edges": edges, "transposes": transposes, "sequences": sequences, "variants": variants,
            "successors": {n: graphs["int8"][0].successors(n, set(names)) for n in names},
            "alt_float": {n: "float" if c is None else "int8" for n, c in graphs["float_odd"][1].items()},
            "alternating": {key: [n for n, c in graphs[kernel][1].items() if c is None]
                            for key, kernel in (("whole|alt_float", "float_odd"), ("whole|float_even", "float_even"))},
            "choices": {n: legal_keys(target, costs[n].input_signed) for n in names},
            "random_float": random_float,
            "act_max": {n: max(target.act_bits(costs[n].input_signed)) for n in names}}
    return units, info


def reference_unit(table: LatencyTable) -> measure.Unit:
    """Return the whole W8A8 model an ONNX Runtime table was built with (its "whole|int8" graph: the same
    architecture, input shape and seeded weights), to time the machine's state now against the table's."""
    from ..models import create_model

    c = table.data["config"]
    cfg = LutConfig(**{k: v for k, v in c.items() if k in LutConfig.__dataclass_fields__})
    target, shape = get_target(cfg.target), tuple(int(v) for v in table.key["input_shape"])
    costs = costs_at(create_model(cfg.model, num_classes=cfg.num_classes, in_chans=shape[0]), shape, cfg.model)
    proto = lower_choice(cfg, target, costs, kernel_choices(target, costs)["int8"], shape)
    return measure.Unit("whole|int8", proto.SerializeToString(), shape, "float32")


def session_entries(target: Target) -> tuple[tuple[str, str], ...]:
    """Return the ONNX Runtime session entries the target's exports set at its highest bits (ort-w8: 8-bit weights
    need session.x64quantprecision on CPUs without VNNI; ort: none)."""
    if target.x64_precision_option and max(target.weight_bits) == 8:
        return tuple(target.session_config(True).items())
    return ()


def legal_keys(target: Target, signed: bool) -> list[str]:
    """Return the choice keys of a layer on a target: every (w, a) it runs, w8a8 (the reference), float."""
    keys = [choice_key(w, a) for w in target.weight_bits for a in target.act_bits(signed)]
    return list(dict.fromkeys([*keys, "w8a8", "float"]))


def paired_delta(variant: dict, ref: dict) -> float:
    """Return variant - reference (ms): the median over rounds of their difference in the same round where both have
    per-round means (load that drifts, or one unlucky reference, then cancels instead of shifting every delta of
    the group), else the difference of their medians."""
    a, b = variant.get("per_round_ms"), ref.get("per_round_ms")
    if a and b and len(a) == len(b):
        d = sorted(x - y for x, y in zip(a, b, strict=True))
        mid = len(d) // 2
        return d[mid] if len(d) % 2 else (d[mid - 1] + d[mid]) / 2
    return variant["median_ms"] - ref["median_ms"]


def measure_ort(cfg: LutConfig, target: Target, shape: tuple[int, int, int], timing: measure.TimingConfig,
                callback: Callback | None = None) -> dict:
    """Return the measured table body on ONNX Runtime (CPU)."""
    units, info = plan_ort(cfg, target, shape, timing.threads, callback)
    variants = info.pop("variants")
    emit(callback, ProgressEvent("info", "lut", message=f"timing {len(units)} units and {len(variants)} whole models"
                                 f" with float islands, {timing.rounds} rounds"))
    load = os.getloadavg()[0]
    clock = measure.cpu_clock()
    times = measure.median_times(units, cfg.batch_size, timing, callback, info["sequences"])
    keys = list(variants)
    for i in range(0, len(keys), VARIANTS_PER_JOB):  # a few whole models per process: each holds its own arena
        group = {k: variants[k] for k in keys[i:i + VARIANTS_PER_JOB]}
        group.update({k: units[k] for k in ("whole|int8", "whole|requant", "whole|float_layers")})
        t = measure.median_times(group, cfg.batch_size, timing, callback)
        refs = {k: t.pop(k) for k in ("whole|int8", "whole|requant", "whole|float_layers")}
        base = {"island": "int8", "islandR": "requant", "islandF": "float_layers"}
        times.update({k: {**v, "delta_ms": paired_delta(v, refs[f"whole|{base[k.split('|', 1)[0]]}"])}
                      for k, v in t.items()})
    others = measure.others_share(clock)
    if others > measure.OTHERS_MAX:  # a loaded machine inflates small units more than whole models
        emit(callback, ProgressEvent("info", "lut", message=f"warning: other processes took {100 * others:.0f}% of the "
                                     "CPU while timing: the table's times are inflated and its checks may fail; "
                                     "measure it again on a quiet machine (--force)"))
    body = combine(times, info)
    return {**body, "layer_info": info["layers"], "units": times, "unit_transposes": info["transposes"],
            "timing": {**asdict(timing), "load_before": load, "load_after": os.getloadavg()[0],
                       "others_cpu_share": others},
            "unit_inputs": {k: [u.input_dtype, list(u.input_shape)] for k, u in units.items()}}
