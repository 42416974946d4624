"""Static TensorRT compatibility check of a QDQ ONNX graph (tensorrt.md): runs without TensorRT."""

from __future__ import annotations

from pathlib import Path

from ..errors import require

TRT_PARSER_OPSETS = range(9, 21)  # ONNX-TensorRT parser (TensorRT 10.x): opsets 9..20


def _load(model):
    onnx = require("onnx", "onnx")
    if isinstance(model, (str, Path)):
        return onnx.load(str(model))
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return model


def _constants(proto) -> dict:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def check_tensorrt(model, opsets: range = TRT_PARSER_OPSETS) -> list[str]:
    """Return every TensorRT incompatibility of a QDQ graph (empty list: compatible).

    Checked: opset in the parser's range; Q/DQ zero points present, signed INT8 (or INT4/FP8 weights)
    and 0; weights per output channel on axis 0 (or per tensor); activation scales per tensor; Clip
    only on float tensors; no UINT8 tensor except the network's own inputs and outputs.
    """
    onnx = require("onnx", "onnx")
    from onnx import TensorProto

    proto = _load(model)
    problems = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in opsets:
        problems.append(f"opset {opset} outside TensorRT's parser range {opsets.start}..{opsets.stop - 1}")
    g = proto.graph
    consts = _constants(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    io_names = {v.name for v in [*g.input, *g.output]}
    quant_types = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    for n in g.node:
        where = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if zp is None:
                problems.append(f"{where}: no zero point (the type defaults to UINT8)")
            else:
                if types.get(zp) not in quant_types:
                    problems.append(f"{where}: zero point type {TensorProto.DataType.Name(types.get(zp, 0))} "
                                    "(TensorRT needs signed INT8)")
                if zp in consts and consts[zp].size and (consts[zp].astype("float64") != 0).any():
                    problems.append(f"{where}: non-zero zero point (TensorRT is symmetric only)")
            scale = consts.get(n.input[1])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            x = n.input[0]
            if n.op_type == "DequantizeLinear" and x in consts and consts[x].ndim >= 2:
                if scale is not None and scale.size > 1 and (axis != 0 or scale.size != consts[x].shape[0]):
                    problems.append(f"{where}: weight scales not per output channel on axis 0 (axis={axis})")
            elif x not in consts and scale is not None and scale.size > 1:
                problems.append(f"{where}: activation quantized per channel (TensorRT wants per tensor)")
        elif n.op_type == "Clip" and n.input and types.get(n.input[0], TensorProto.FLOAT) not in float_types:
            problems.append(f"{where}: Clip on a {TensorProto.DataType.Name(types[n.input[0]])} tensor "
                            "(TensorRT clips float tensors only)")
    for name, t in types.items():
        if t == TensorProto.UINT8 and name not in io_names:
            problems.append(f"tensor {name}: UINT8 (TensorRT takes UINT8 only as a network input/output)")
    return problems
