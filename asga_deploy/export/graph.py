"""ONNX graph surgery after torch's export: layer names, INT4 weights, FP16 float layers, pruning, sizes."""

from __future__ import annotations

import copy
import json

from ..errors import ExportError, require
from ..policy import Policy
from ..quant.residual import is_add, trace_model
from .units import is_global_pool


def consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def readers(graph) -> dict[str, list]:
    """Return {tensor name: the nodes that read it}."""
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def constant_reader(graph):
    """Return a function: tensor name -> its array where it is an initializer or a Constant node's output, else None."""
    numpy_helper = require("onnx", "onnx").numpy_helper
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def const(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = constants.get(name)
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
        return None if value is None else numpy_helper.to_array(value)
    return const


def initializer_identities(proto) -> None:
    """Replace torch's Identity(initializer) de-duplication by distinct initializers (one per use)."""
    g = proto.graph
    by_name = {i.name: i for i in g.initializer}
    for node in [n for n in g.node if n.op_type == "Identity" and n.input[0] in by_name]:
        t = copy.deepcopy(by_name[node.input[0]])
        t.name = node.output[0]
        g.initializer.append(t)
        g.node.remove(node)


def name_layers(proto, layers: dict, policy: Policy) -> None:
    """Rename each quantized / float layer's Conv/Gemm node to its module name; assert the DQ wiring."""
    g = proto.graph
    inits = {i.name for i in g.initializer}
    for name in layers:
        wname = f"{name}.weight_int8"
        if wname not in inits:
            raise ExportError(f"layer {name}: its INT8 weight did not reach the graph (constant folding?)")
        dqs = [n for n in consumers(g, wname) if n.op_type == "DequantizeLinear"]
        ops = [c for dq in dqs for c in consumers(g, dq.output[0])]
        if len(dqs) != 1 or not ops:
            raise ExportError(f"layer {name}: expected one DequantizeLinear feeding it, found {len(dqs)}")
        ops[0].name = name
    for name in policy.float_layers:
        for c in consumers(g, f"{name}.weight"):
            c.name = name


def guard_float_inputs(proto, float_layers: list[str]) -> list[str]:
    """Give each float layer that reads a per-tensor DequantizeLinear its own per-channel one (axis 1, the scale
    and zero point repeated per channel: the same values); return the layers guarded.

    ONNX Runtime's WeightBiasQuantization rewrites any Conv/Gemm whose input 0 comes from a DequantizeLinear with
    a scalar scale and whose weight is a float initializer: it quantizes the weight to INT8 per tensor and the
    layer runs as QLinearConv / QGemm, not in float. A per-channel input scale is outside its pattern.
    """
    onnx = require("onnx", "onnx")
    numpy_helper, helper = onnx.numpy_helper, onnx.helper
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    const = constant_reader(g)
    guarded, floats = [], set(float_layers)
    for node in [n for n in g.node if n.name in floats and n.op_type in ("Conv", "Gemm")]:
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        scale = const(dq.input[1])
        if scale is None or scale.size != 1:
            continue  # already per channel (or not a constant: outside ORT's pattern too)
        shape = _in_channels(node, inits, numpy_helper)
        if shape is None or shape < 2:
            raise ExportError(f"float layer {node.name}: reads a dequantized tensor of {shape} channel(s); ONNX "
                              "Runtime would quantize its weights (WeightBiasQuantization); quantize the layer")
        zp = const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        base = f"{node.name}.input_dq"
        g.initializer.append(numpy_helper.from_array(scale.reshape(1).repeat(shape), f"{base}.scale"))
        inputs = [dq.input[0], f"{base}.scale"]
        if zp is not None:
            g.initializer.append(numpy_helper.from_array(zp.reshape(1).repeat(shape), f"{base}.zero_point"))
            inputs.append(f"{base}.zero_point")
        new = helper.make_node("DequantizeLinear", inputs, [f"{base}.out"], name=base, axis=1)
        g.node.insert(list(g.node).index(node), new)
        node.input[0] = f"{base}.out"
        guarded.append(node.name)
    return guarded


def _in_channels(node, inits: dict, numpy_helper) -> int | None:
    """Return the input channels of a Conv (weight dim 1 x group) or Gemm (by transB) from its weight initializer."""
    if node.input[1] not in inits:
        return None
    w = inits[node.input[1]].dims
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "Conv":
        return int(w[1]) * int(attrs.get("group", 1))
    return int(w[1] if attrs.get("transB", 0) else w[0])


def name_ops(proto, model) -> dict[str, list[str]]:
    """Rename the two-tensor Add and the GlobalAveragePool nodes to the model's fx add nodes and pooling modules
    (both in execution order) so that the kernel report names them; return the names given."""
    graph = trace_model(model)
    if graph is None:
        return {}
    adds = [n.name for n in graph.nodes if is_add(n)]
    pools = [str(n.target) for n in graph.nodes if n.op == "call_module" and is_global_pool(model, n)]
    g = proto.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    onnx_adds = [n for n in g.node if n.op_type == "Add" and len(n.input) == 2 and not set(n.input) & consts]
    onnx_pools = [n for n in g.node if n.op_type == "GlobalAveragePool"]
    named = {}
    for kind, ours, theirs in (("adds", adds, onnx_adds), ("pools", pools, onnx_pools)):
        if len(ours) == len(theirs):  # otherwise the mapping is not certain: keep torch's names
            for node, name in zip(theirs, ours, strict=True):
                node.name = name
            named[kind] = ours
    return named


def int4_weights(proto, bits: dict[str, int]) -> None:
    """Store the codes of weights with <= 4 bits as INT4 initializers, each with its own INT4 zero point."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    by_name = {i.name: i for i in g.initializer}
    for name, b in bits.items():
        if b > 4:
            continue
        t = by_name[f"{name}.weight_int8"]
        arr = numpy_helper.to_array(t)
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.INT4, arr.shape, arr.reshape(-1).tolist()))
        zp = helper.make_tensor(f"{name}.weight_zero_point_int4", TensorProto.INT4, [arr.shape[0]],
                                [0] * arr.shape[0])
        g.initializer.append(zp)
        for dq in consumers(g, t.name):  # zero points may be shared between layers: give each its own
            if dq.op_type == "DequantizeLinear":
                dq.input[2] = zp.name


def fp16_float_layers(proto, float_layers: list[str]) -> None:
    """Make each float Conv/Gemm compute in FP16: FP16 weights and bias, Casts around it."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    by_name = {i.name: i for i in g.initializer}
    for node in [n for n in g.node if n.name in set(float_layers) and n.op_type in ("Conv", "Gemm", "MatMul")]:
        for i, inp in enumerate(node.input):
            if i == 0 or not inp:
                continue
            if inp not in by_name:
                raise ExportError(f"float layer {node.name}: parameter {inp} is not an initializer")
            half = numpy_helper.from_array(numpy_helper.to_array(by_name[inp]).astype("float16"), f"{inp}.fp16")
            g.initializer.append(half)
            node.input[i] = half.name
        x, y = node.input[0], node.output[0]
        node.input[0], node.output[0] = f"{node.name}.input_fp16", f"{node.name}.output_fp16"
        idx = list(g.node).index(node)
        g.node.insert(idx, helper.make_node("Cast", [x], [node.input[0]], name=f"{node.name}.to_fp16",
                                            to=TensorProto.FLOAT16))
        g.node.insert(idx + 2, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}.to_fp32",
                                                to=TensorProto.FLOAT))


def prune(proto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    g = proto.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def fp16_variant(proto, float_layers: list[str]):
    """Return a copy whose float layers compute in FP16 (TensorRT 11 strong typing); checked."""
    onnx = require("onnx", "onnx")
    out = copy.deepcopy(proto)
    fp16_float_layers(out, float_layers)
    prune(out)
    for p in out.metadata_props:
        if p.key == "asga.lowering":
            p.value = json.dumps({**json.loads(p.value), "fp16_float_layers": True})
    onnx.checker.check_model(out, full_check=True)
    return out


def size_report(proto, data: bytes, weight_bits: dict[str, int]) -> dict:
    """Return the file size and its weight storage, with the size the other storage (INT8 / INT4) would have."""
    from onnx import TensorProto

    by_name = {i.name: i for i in proto.graph.initializer}
    int4_elems = small_elems = 0
    for layer, b in weight_bits.items():
        t = by_name.get(f"{layer}.weight_int8")
        if t is None or b > 4:
            continue
        n = 1
        for d in t.dims:
            n *= d
        small_elems += n
        if t.data_type == TensorProto.INT4:
            int4_elems += n
    saving = small_elems - (small_elems + 1) // 2  # bytes INT4 saves over INT8 on the <= 4-bit weights
    stored_int4 = int4_elems > 0
    return {"file_bytes": len(data), "weights": weight_storage_bytes(proto),
            "int4_storage": stored_int4, "weights_le4bit_elements": small_elems,
            "file_bytes_int8_storage": len(data) + (saving if stored_int4 else 0),
            "file_bytes_int4_storage": len(data) - (0 if stored_int4 else saving)}


def weight_storage_bytes(proto) -> dict[str, int]:
    """Return the bytes of INT8, INT4 and float initializers in a graph."""
    from onnx import TensorProto

    out = {"int8": 0, "int4": 0, "float": 0}
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if t.data_type == TensorProto.INT8:
            out["int8"] += n
        elif t.data_type in (TensorProto.INT4, TensorProto.UINT4):
            out["int4"] += (n + 1) // 2
        elif t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            out["float"] += n * (4 if t.data_type == TensorProto.FLOAT else 2)
    return out
