"""TensorRT engine inspection without TensorRT: layer names and precisions (TensorRT 10 and 11 inspector JSON),
the precision check against the policy and the graph, per-layer times summed per policy layer.

A quantized layer must run INT8 (or FP8) in, and INT8 out where the ONNX graph quantizes its output (a conv
that runs INT8-in / FP32-out because a Q did not fuse is what this check exists to catch); a float layer
must run in the float type it was exported for (FP16 on TensorRT).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import require

# layer types that only move or reformat data: their precision says nothing about a policy layer
_PLUMBING = ("reformat", "shuffle", "nodeeque", "noop", "copy")
# (substring, dtype), checked in this order: "bfloat16" and "float" overlap, as do "fp8" and "fp16"
_DTYPES = (("bf16", "bf16"), ("bfloat16", "bf16"), ("int8", "int8"), ("fp8", "fp8"), ("e4m3", "fp8"),
           ("int4", "int4"), ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32"), ("float", "fp32"),
           ("int32", "int32"), ("int64", "int64"), ("bool", "bool"))
# ops the check follows from a layer's output to find out whether the graph quantizes it (TensorRT fuses them)
_EPILOGUE = ("Relu", "Clip", "Add", "BatchNormalization", "Identity", "LeakyRelu", "Sigmoid")


def split_name(name: str) -> list[str]:
    """Return the parts of a fused TensorRT layer name ("conv1 + relu")."""
    return [p.strip() for p in name.split(" + ") if p.strip()]


def onnx_names(layer: dict) -> list[str]:
    """Return the ONNX node names a TensorRT layer came from (Metadata, else its fused name)."""
    found = re.findall(r"ONNX Layer:\s*([^\]\x1e]+)", str(layer.get("Metadata", "")))
    return [f.strip() for f in found] or split_name(str(layer.get("Name", "")))


def dtype(tensor: dict) -> str:
    """Return a tensor's type from either inspector schema ("Format/Datatype": "Row major linear FP32";
    "DataType": "Half"), or "unknown"."""
    text = f"{tensor.get('DataType', '')} {tensor.get('Format/Datatype', '')}".lower()
    return next((name for key, name in _DTYPES if key in text), "unknown")


def precision(layer: dict) -> dict[str, list[str]]:
    """Return the types of a layer's input and output tensors."""
    def types(key: str) -> list[str]:
        return [dtype(t) for t in layer.get(key, []) if isinstance(t, dict)]

    return {"inputs": types("Inputs"), "outputs": types("Outputs")}


def quantized_outputs(proto, layers: list[str]) -> set[str]:
    """Return the layers whose output the ONNX graph quantizes: every consumer is a QuantizeLinear (or a Clip/Relu
    before one), after single-consumer epilogue ops that TensorRT fuses into the layer (ReLU, a residual Add)."""
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def to_q(tensor: str, depth: int = 0) -> bool:
        users = consumers.get(tensor, [])
        return bool(users) and depth < 4 and all(
            u.op_type == "QuantizeLinear" or (u.op_type in ("Clip", "Relu") and to_q(u.output[0], depth + 1))
            for u in users)

    by_name = {n.name: n for n in proto.graph.node}
    out = set()
    for name in layers:
        node, seen = by_name.get(name), 0
        while node is not None and seen < 8:
            if to_q(node.output[0]):
                out.add(name)
                break
            users = consumers.get(node.output[0], [])
            node = users[0] if len(users) == 1 and users[0].op_type in _EPILOGUE else None
            seen += 1
    return out


def expectations(onnx_path, quantized: list[str], float_layers: list[str], weak_fp16: bool
                 ) -> tuple[set[str] | None, str]:
    """Return (the quantized layers whose output must be INT8, the float layers' type) for an engine's ONNX file:
    FP16 where the graph says so (asga export --fp16) or TensorRT 10 may choose it (weak typing, FP16 flag)."""
    if onnx_path is None or not Path(onnx_path).is_file():
        return None, "fp16" if weak_fp16 else "fp32"
    proto = require("onnx", "onnx").load(str(onnx_path), load_external_data=False)
    halves = {i.name for i in proto.graph.initializer if i.name.endswith(".weight.fp16")}
    graph_fp16 = bool(float_layers) and all(f"{n}.weight.fp16" in halves for n in float_layers)
    return quantized_outputs(proto, quantized), "fp16" if graph_fp16 or weak_fp16 else "fp32"


def check_precisions(layers: list[dict], quantized: list[str], float_layers: list[str],
                     int8_outputs: set[str] | None = None, float_dtype: str = "fp16") -> dict:
    """Return per policy layer the input/output types its TensorRT layers ran in, and every mismatch.

    int8_outputs: the quantized layers whose output must be INT8 (None: inputs only are checked).
    """
    ran: dict[str, list[dict]] = {}
    for d in layers:
        if str(d.get("LayerType", "")).lower() in _PLUMBING:
            continue
        for n in onnx_names(d):
            ran.setdefault(n, []).append(precision(d))
    report, problems = {}, []
    for n in [*quantized, *float_layers]:
        seen = ran.get(n, [])
        ins = sorted({t for p in seen for t in p["inputs"]})
        outs = sorted({t for p in seen for t in p["outputs"]})
        report[n] = {"inputs": ins or ["absent"], "outputs": outs or ["absent"]}
        if n in quantized:
            if not seen or not set(ins) & {"int8", "fp8"}:
                problems.append(f"{n}: runs {'/'.join(ins) or 'absent'} in, not INT8")
            elif int8_outputs is not None and n in int8_outputs and not set(outs) & {"int8", "fp8"}:
                problems.append(f"{n}: INT8 in but {'/'.join(outs)} out (the Q after it did not fuse)")
        elif float_dtype not in ins:
            problems.append(f"{n}: float layer runs {'/'.join(ins) or 'absent'}, not {float_dtype.upper()}")
    return {"layers": report, "problems": problems, "passed": not problems,
            "not_int8": [p.split(":")[0] for p in problems if p.split(":")[0] in quantized],
            "float_not_fp16": [p.split(":")[0] for p in problems if p.split(":")[0] in float_layers]}


def per_policy_layer(rows: list[dict], policy_layers: list[str]) -> dict[str, float]:
    """Return the summed mean time (ms) of the TensorRT layers that each policy layer was fused into; the rest
    (pooling, reformats, unnamed layers) under "(other)". A TensorRT layer holding two policy layers counts for
    the first."""
    out = {n: 0.0 for n in policy_layers}
    out["(other)"] = 0.0
    for r in rows:
        hit = next((n for n in r["onnx_nodes"] if n in out and n != "(other)"), "(other)")
        out[hit] += r["mean_ms"]
    return out
