"""Which kernel ONNX Runtime runs each layer on (read from its optimized graph), and which layers could saturate.

The plan is the exported graph: every Conv/Gemm (quantized when its weight is an integer initializer
behind a DequantizeLinear) and the residual Adds and global poolings the lowering named. The runtime
is ORT's optimized graph (all optimizations, the model's own session entries): the node that consumes a
quantized layer's weight, or the node that kept the layer's name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from ..errors import require
from ..quant import QuantConv2d, QuantLinear
from ..targets import pair_saturates, u8_max
from .graph import readers
from .ort import session
from .requant import SUFFIX as REQUANT

# ops that run on integer data in ORT's optimized graph (QDQ node units fused into integer kernels)
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm",
               "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearConcat"}
LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
NAMED_OPS = ("Add", "GlobalAveragePool")
_PASS = ("Relu", "Clip", "Flatten", "Reshape")  # ops between a named op and its QuantizeLinear


def quantized_weights(proto) -> dict[str, str]:
    """Return {layer (Conv/Gemm/MatMul node name): weight initializer} for weights that feed a DequantizeLinear."""
    inits = {i.name: len(i.dims) for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], 0) >= 2:
            for c in consumers.get(n.output[0], []):
                if c.op_type in LAYER_OPS:
                    out[c.name or n.input[0]] = n.input[0]
    return out


def _by_name(opt, name: str) -> list:
    """Return the optimized nodes that kept a node's name (ORT appends _token_N and similar to fused nodes)."""
    return [n for n in opt.graph.node if n.name == name or n.name.startswith(name + "_token")]


def _kernel(ops: list[str]) -> dict:
    return {"kernel": "+".join(sorted(set(ops))) or "absent", "integer": bool(ops) and all(o in INTEGER_OPS for o in ops)}


def integer_kernels(path: str | Path | bytes, threads: int = 0, keep_optimized: str | Path | None = None) -> dict:
    """Return every Conv/Gemm of a model (and its named residual Adds and poolings) with the kernel ORT runs it on.

    `integer`/`total`/`not_integer` count the quantized layers; `float_layers` lists the others; `requants` are the
    requantizations written as Adds (requant.fuse_requant: QLinearAdd when fused; exact either way, only slower).
    """
    onnx = require("onnx", "onnx")
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
    plan = quantized_weights(proto)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep_optimized) if keep_optimized else Path(tmp) / "optimized.onnx"
        session(path, threads, optimized_path=out)
        opt = onnx.load(str(out), load_external_data=False)
    consumers = readers(opt.graph)
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    users = readers(proto.graph)

    def requantized(tensor: str, depth: int = 3) -> bool:  # every path reaches a QuantizeLinear (through Relu...)
        after = users.get(tensor, [])
        return bool(after) and all(u.op_type == "QuantizeLinear" or (
            depth > 0 and u.op_type in _PASS and requantized(u.output[0], depth - 1)) for u in after)
    layers, ops, requants = {}, {}, {}
    for node in proto.graph.node:
        if node.op_type in LAYER_OPS:
            weight = plan.get(node.name)
            found = []
            for n in consumers.get(weight, []) if weight else []:
                found += [c.op_type for c in consumers.get(n.output[0], [])] if n.op_type == "DequantizeLinear" \
                    else [n.op_type]
            found = found or [n.op_type for n in _by_name(opt, node.name)]
            layers[node.name] = {"op": node.op_type, "quantized": weight is not None, **_kernel(found)}
        elif node.op_type == "Add" and node.name.endswith(REQUANT):  # a requantization (requant.fuse_requant)
            requants[node.name] = {"op": node.op_type, **_kernel([n.op_type for n in _by_name(opt, node.name)])}
        elif node.op_type in NAMED_OPS and not node.name.startswith("/"):  # named by the lowering
            # on a grid both sides (every input from a DequantizeLinear, a QuantizeLinear after it): ORT can run
            # it as a QLinear op; next to a float layer of the policy (a pooling before a float classifier) it
            # stays float by design
            quantized = all(producer.get(i) == "DequantizeLinear" for i in node.input) and requantized(node.output[0])
            ops[node.name] = {"op": node.op_type, "quantized": quantized,
                              **_kernel([n.op_type for n in _by_name(opt, node.name)])}
    counts: dict[str, int] = {}
    for n in opt.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    quantized = [n for n, v in layers.items() if v["quantized"]]
    not_int = [n for n in quantized if not layers[n]["integer"]]
    return {"layers": layers, "integer": len(quantized) - len(not_int), "total": len(quantized),
            "not_integer": not_int, "float_layers": [n for n, v in layers.items() if not v["quantized"]],
            "ops": ops, "ops_not_integer": [n for n, v in ops.items() if v["quantized"] and not v["integer"]],
            "requants": requants, "requants_not_integer": [n for n, v in requants.items() if not v["integer"]],
            "optimized_ops": dict(sorted(counts.items()))}


def saturating_layers(model: nn.Module) -> dict[str, dict]:
    """Return the quantized layers whose u8 x s8 product pairs can leave int16 (x86 without VNNI), with the bound."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            wmax = int(m.weight_quantizer.integer(m.weight).abs().max())
            iq = m.input_quantizer
            if pair_saturates(wmax, iq.bits, iq.signed):
                umax = u8_max(iq.bits, iq.signed)
                out[name] = {"max_weight_code": wmax, "max_u8_activation": umax, "max_pair_sum": 2 * umax * wmax}
    return out
