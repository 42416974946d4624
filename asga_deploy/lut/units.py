"""The ONNX graphs a latency table times: whole models lowered for a policy, and each layer's unit cut out of them.

Every graph here comes from the export's own lowering (`onnx_qdq.prepare_model` + `lower` + the same graph
passes as `asga export`) of the registered model with random weights calibrated on random data: timing does
not depend on the values, and the units are exactly the nodes the deployed model runs for a layer. A unit is
the layer's node unit with what its choice adds in front (the sub-8-bit requantization), from the tensor that
enters it (the 8-bit codes its producer emits, or the model input) to the tensor it hands on (its output
codes, or the logits):

    int8        u8 -> DequantizeLinear -> Conv -> [Relu] -> QuantizeLinear -> u8    (ORT: QLinearConv)
    requant     u8 -> Clip (or DQ -> Q -> Clip, or QLinearAdd) -> DequantizeLinear -> Conv -> ...  (sub-8-bit)
    float       u8 -> DequantizeLinear -> Conv -> [Relu] -> QuantizeLinear -> u8    (float weights: FP32 Conv)

A float unit is timed as an island between quantized neighbours (its own DQ and Q included); two float layers
in a row (conv -> relu -> conv) skip the Q/DQ between them, measured as a pair unit (`direct_edges`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from ..cost import LayerCost
from ..errors import require
from ..export.requant import SUFFIX as REQUANT
from ..models import create_model
from ..policy import LayerBits, Policy, compute_cost
from ..quant import apply_policy, calibrate
from ..targets import Target

WALK_BACK = ("DequantizeLinear", "Clip")  # ops of a unit's input side (its requantization and dequantization)


def _requant(node) -> bool:
    """Whether a node is a requantization Add (export.requant: QLinearAdd with 0), part of its reader's unit."""
    return node.op_type == "Add" and node.name.endswith(REQUANT)


@dataclass(frozen=True)
class Unit:
    """One graph to time: its key, the ONNX bytes, and the input it takes (shape without the batch, dtype)."""

    key: str
    onnx: bytes
    input_shape: tuple[int, ...]
    input_dtype: str  # "uint8" | "int8" | "float32"


def kernel_choices(target: Target, costs: dict[str, LayerCost]) -> dict[str, dict[str, tuple[int, int] | None]]:
    """Return the uniform choices that show each distinct ORT kernel: {kernel: {layer: (w, a) or None (float)}}.

    int8: every layer at the target's highest bits (the W8A8 reference: 7-bit weights on ort); requant: the
    same weights with 4-bit activations (every activation below 8 bits runs the same requantization);
    float_even / float_odd: every other layer float (module order), the rest int8, so each float layer is an
    island between quantized neighbours.
    """
    names = list(costs)
    hi = {n: target.highest(costs[n].input_signed) for n in names}
    low = {n: target.clamp_bits(hi[n][0], 4, costs[n].input_signed) for n in names}
    out = {"int8": dict(hi), "requant": low}
    for parity, label in ((0, "float_even"), (1, "float_odd")):
        out[label] = {n: (None if i % 2 == parity else hi[n]) for i, n in enumerate(names)}
    return out


def make_policy(model_name: str, target: str, costs: dict[str, LayerCost], choice: dict, input_shape,
                num_classes: int) -> Policy:
    """Return the Policy of {layer: (w, a) or None (float)} over every layer."""
    layers = {n: LayerBits(*choice[n], costs[n].input_signed) for n in costs if choice.get(n) is not None}
    pol = Policy(model_name, target, layers, [n for n in costs if choice.get(n) is None])
    pol.cost = compute_cost(pol, costs, input_shape, num_classes, [])
    return pol


def lowered(model_name: str, policy: Policy, input_shape: tuple[int, int, int], num_classes: int,
            seed: int = 0):
    """Return the ONNX ModelProto `asga export` writes for a policy, of the model with random weights calibrated on
    random images (the graph and kernels do not depend on the values)."""
    from ..export import onnx_qdq as lq

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes, in_chans=input_shape[0])
    apply_policy(model, policy, validate=False)
    g = torch.Generator().manual_seed(seed + 1)
    calibrate(model, [torch.randn((2 if input_shape[-1] > 64 else 8, *input_shape), generator=g)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lq.prepare_model(model, policy.target)
        proto, _ = lq.lower(ref, policy, lq.LoweringConfig(policy.target), tuple(input_shape), {})
    return proto


def float_model(model_name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0):
    """Return the fp32 ONNX ModelProto of the model (no quantizer anywhere; dynamic batch)."""
    import io

    onnx = require("onnx", "onnx")
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes, in_chans=input_shape[0]).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


class Graph:
    """Producer/consumer look-ups of an ONNX graph (shapes inferred, so that units can be cut out of it)."""

    def __init__(self, proto):
        onnx = require("onnx", "onnx")
        self.proto = onnx.shape_inference.infer_shapes(proto)
        g = self.proto.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.by_name = {n.name: n for n in g.node}
        self.inputs = {i.name for i in g.input}

    def unit_input(self, layer: str) -> str:
        """Return the tensor a layer's unit starts from: its producer's output codes, or the model input, or the
        float tensor a float producer hands it directly."""
        t = self.by_name[layer].input[0]
        while (p := self.producer.get(t)) is not None:
            if p.op_type in WALK_BACK or _requant(p):
                t = p.input[0]
            elif p.op_type == "QuantizeLinear":
                src = self.producer.get(p.input[0])
                if src is not None and (src.op_type in WALK_BACK or _requant(src)):  # a requantization
                    t = p.input[0]
                elif p.input[0] in self.inputs:
                    return p.input[0]  # the model input: its quantization belongs to the first layer
                else:
                    return t
            else:
                return t
        return t

    def unit_output(self, layer: str) -> str:
        """Return the tensor a layer's unit ends with: the codes of its output quantizer (through a ReLU), else its
        float output."""
        t = self.by_name[layer].output[0]
        while True:
            users = self.consumers.get(t, [])
            if len(users) == 1 and users[0].op_type == "Relu":
                t = users[0].output[0]
            elif len(users) == 1 and users[0].op_type == "QuantizeLinear":
                return users[0].output[0]
            else:
                return t

    def direct_successors(self, layer: str) -> list[str]:
        """Return the Conv/Gemm layers that read a layer's float output directly, through ReLUs and max-pools only
        (two float layers in a row: no Q/DQ between them)."""
        out, todo = [], [self.by_name[layer].output[0]]
        while todo:
            t = todo.pop()
            for u in self.consumers.get(t, []):
                if u.op_type in ("Conv", "Gemm") and u.input[0] == t:
                    out.append(u.name)
                elif u.op_type in ("Relu", "MaxPool"):
                    todo.append(u.output[0])
        return out

    def elements(self, tensor: str) -> int:
        """Return the elements per sample of a tensor (its inferred shape without the batch)."""
        vi = next((v for v in [*self.proto.graph.value_info, *self.proto.graph.output, *self.proto.graph.input]
                   if v.name == tensor), None)
        dims = [int(d.dim_value) for d in vi.type.tensor_type.shape.dim[1:]] if vi is not None else []
        n = 1
        for d in dims:
            n *= d
        return n

    def successors(self, layer: str, layers: set[str]) -> list[str]:
        """Return the layers that consume a layer's output through ReLUs, max-pools and Q/DQ/Clip only (not through
        a residual Add): those whose input bits decide what ORT makes of the graph right after it."""
        seen, todo, out = set(), [self.by_name[layer].output[0]], []
        while todo:
            for u in self.consumers.get(todo.pop(), []):
                if u.name in layers and u.op_type in ("Conv", "Gemm"):
                    out.append(u.name)
                elif (u.op_type in ("Relu", "MaxPool", "QuantizeLinear", "DequantizeLinear", "Clip", "Flatten")
                      or _requant(u)) and u.name not in seen:
                    seen.add(u.name)
                    todo.extend(u.output)
        return list(dict.fromkeys(out))

    def cut(self, key: str, start: str, end: str) -> Unit:
        """Return the unit from tensor `start` to tensor `end` (onnx.utils.Extractor), with its input's shape."""
        onnx = require("onnx", "onnx")
        from onnx import TensorProto

        sub = onnx.utils.Extractor(self.proto).extract_model([start], [end])
        for p in self.proto.opset_import:
            if p.domain in ("", "ai.onnx"):
                del sub.opset_import[:]
                sub.opset_import.append(copy.deepcopy(p))
        sub.ir_version = self.proto.ir_version
        vi = sub.graph.input[0]
        dims = vi.type.tensor_type.shape.dim
        shape = tuple(int(d.dim_value) for d in dims[1:])
        for d in (dims[0], *sub.graph.output[0].type.tensor_type.shape.dim[:1]):
            d.ClearField("dim_value")
            d.dim_param = "batch"
        dtype = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}.get(vi.type.tensor_type.elem_type, "float32")
        return Unit(key, sub.SerializeToString(), shape, dtype)


def direct_edges(graph: Graph, layers: list[str]) -> list[tuple[str, str]]:
    """Return (producer, consumer) layer pairs joined only through ReLUs and max-pools in an all-float graph: two
    float layers in a row there skip the Q/DQ (and layout changes) of an island each."""
    known = set(layers)
    return [(n, m) for n in layers for m in graph.direct_successors(n) if m in known]
