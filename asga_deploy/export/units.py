"""Where ONNX Runtime forms integer node units in a prepared (BN-folded) fake-quant model, found with torch.fx.

ONNX Runtime runs an op on integers only as a node unit: DequantizeLinear on every input, the op, one
QuantizeLinear on its output (a Relu in front of a zero-point-0 UINT8 Q is dropped). In the torch model:
  - a quantized conv/linear whose output (through folded-BN Identity and ReLU, each single-user) has one
    quantizer as its only consumer: QLinearConv (the quantizer's 8-bit grid is the unit's output);
  - the classifier, a quantized Linear whose output is the logits: QGemm with float output (needs its
    bias as INT32 behind a DequantizeLinear);
  - a two-tensor Add whose inputs are quantizer outputs and whose output (through a ReLU) has one
    quantizer consumer: QLinearAdd;
  - global average pooling between two quantizers: QLinearGlobalAveragePool.
The lowering uses these to place Q/DQ (quantized pooling, 8-bit requantization before a sub-8-bit Clip)
and the integer reference (reference.py) to compute each unit as ONNX Runtime's kernels round it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantConv2d, QuantLinear
from ..quant.quantizers import FakeQuantizer
from ..quant.residual import install_forward, is_add, is_relu, module_of, trace_model

_PASS = (nn.BatchNorm2d, nn.Identity, nn.Dropout)
_FLAT = (nn.Flatten, nn.Identity, nn.Dropout)
POOL_Q = "pool_quant"  # container of the quantizers inserted after global pooling


@dataclass
class Units:
    """The integer node units of a model: quantized layer -> output quantizer (None: float logits), adds, pools."""

    layers: dict[str, str | None] = field(default_factory=dict)
    adds: list[tuple[str, str, str, str]] = field(default_factory=list)  # (fx node, quantizer a, b, out)
    pools: list[tuple[str, str, str]] = field(default_factory=list)  # (pool module, quantizer in, out)


def _quantizer_name(model: nn.Module, node: torch.fx.Node) -> str | None:
    """Return the module name of the per-tensor quantizer a node applies first (its own, or a layer's input one)."""
    m = module_of(model, node)
    if isinstance(m, FakeQuantizer) and not m.per_channel:
        return str(node.target)
    if isinstance(m, (QuantConv2d, QuantLinear)):
        return f"{node.target}.input_quantizer"
    return None


def _through(model: nn.Module, node: torch.fx.Node, kinds: tuple, relu: bool) -> tuple[torch.fx.Node, bool]:
    """Follow single-user nodes of the given module kinds (torch.flatten with nn.Flatten, ReLUs if relu);
    return (the last node, whether a ReLU was passed)."""
    seen = False
    while len(node.users) == 1:
        (u,) = node.users
        flat = nn.Flatten in kinds and u.op == "call_function" and u.target is torch.flatten
        if isinstance(module_of(model, u), kinds) or flat:
            node = u
        elif relu and is_relu(model, u):
            node, seen = u, True
        else:
            break
    return node, seen


def _output_quantizer(model: nn.Module, node: torch.fx.Node, kinds: tuple = _PASS) -> str | None:
    """Return the quantizer that alone consumes a node's output (through kinds and ReLU), if it ends a unit."""
    tail, relu = _through(model, node, kinds, relu=True)
    if len(tail.users) != 1:
        return None
    (user,) = tail.users
    name = _quantizer_name(model, user)
    if name is None:
        return None
    q = model.get_submodule(name)
    return None if (relu and q.signed) else name  # ORT drops a Relu only before a zero-point-0 UINT8 Q


def is_global_pool(model: nn.Module, node: torch.fx.Node) -> bool:
    m = module_of(model, node)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return m.output_size in (1, (1, 1))
    return node.op == "call_function" and node.target is F.adaptive_avg_pool2d and node.args[1:2] in ((1,), ((1, 1),))


def find_units(model: nn.Module) -> Units | None:
    """Return the integer node units of a prepared model (None when it is not fx-traceable)."""
    graph = trace_model(model)
    if graph is None:
        return None
    units = Units()
    for node in graph.nodes:
        m = module_of(model, node)
        if isinstance(m, (QuantConv2d, QuantLinear)):
            out = _output_quantizer(model, node)
            logits = len(node.users) == 1 and next(iter(node.users)).op == "output"
            if out is not None or (logits and isinstance(m, QuantLinear)):
                units.layers[str(node.target)] = out
        elif is_add(node):
            ins = [_quantizer_name(model, a) if isinstance(module_of(model, a), FakeQuantizer) else None
                   for a in node.args if isinstance(a, torch.fx.Node)]
            out = _output_quantizer(model, node, ())
            q = model.get_submodule(out) if out is not None else None
            if None not in ins and q is not None and (q.bits == 8 or q.requant8):
                units.adds.append((node.name, ins[0], ins[1], out))
        elif is_global_pool(model, node) and node.op == "call_module":
            src = node.args[0]
            qin = _quantizer_name(model, src) if isinstance(module_of(model, src), FakeQuantizer) else None
            out = _output_quantizer(model, node, ())
            if qin is not None and out is not None:
                units.pools.append((str(node.target), qin, out))
    return units


def quantize_pooling(model: nn.Module) -> list[str]:
    """Insert, after each global average pooling that a quantized layer consumes (through flatten), a copy of
    that layer's input quantizer (same grid: the layer's own quantizer then changes nothing); return the pools.

    ONNX Runtime then runs DequantizeLinear -> GlobalAveragePool -> QuantizeLinear as QLinearGlobalAveragePool.
    """
    graph = trace_model(model)
    if graph is None:
        return []
    container, done = nn.Module(), []
    for node in list(graph.nodes):
        if not (is_global_pool(model, node) and node.op == "call_module"):
            continue
        src = node.args[0]
        if not isinstance(module_of(model, src), FakeQuantizer):
            continue  # its input is not on a grid: no unit
        tail, _ = _through(model, node, _FLAT, relu=False)
        if len(tail.users) != 1 or not isinstance(module_of(model, next(iter(tail.users))), (QuantConv2d, QuantLinear)):
            continue
        layer = module_of(model, next(iter(tail.users)))
        key = str(node.target).replace(".", "_")
        container.add_module(key, copy.deepcopy(layer.input_quantizer))
        model.add_module(POOL_Q, container)
        with graph.inserting_after(node):
            qn = graph.call_module(f"{POOL_Q}.{key}", (node,))
        for u in list(node.users):
            if u is not qn:
                u.replace_input_with(node, qn)
        done.append(str(node.target))
    if done:
        graph.lint()
        install_forward(model, graph)
    return done


# ops that vanish from the exported graph (an op between a DQ and the layer must stay followed by its own Q/DQ:
# ONNX Runtime fuses DQ -> MaxPool/Flatten -> Q into UINT8 ops, and a layer fuses only with a DQ right before it)
_VANISH = (nn.Identity, nn.Dropout)


def _grid(q: FakeQuantizer) -> tuple:
    return float(q.step().detach().reshape(-1)[0]), q.qmin, q.qmax, q.signed


def _grid_consumer(model: nn.Module, node: torch.fx.Node) -> tuple[tuple, str] | None:
    """Return (the grid, the quantizer's module name) a node applies first to its input, if it quantizes it."""
    name = _quantizer_name(model, node)
    if name is None or getattr(module_of(model, node), "input_on_grid", False):
        return None
    return _grid(model.get_submodule(name)), name


def share_quantizers(model: nn.Module) -> list[str]:
    """Give every value one Q/DQ pair per grid: consumers that quantize it to the same grid share one quantizer
    call, and a layer whose input comes straight out of a quantizer of its grid skips its own; return the layers
    that skip theirs.

    A max-pool of a quantizer's output gets that quantizer again after it. All exact (quantizing twice on one
    grid is quantizing once). ONNX Runtime runs DequantizeLinear -> MaxPool -> QuantizeLinear on UINT8 only with
    one Q of the same grid after the pool, and leaves some doubled pairs unfused.
    """
    graph = trace_model(model)
    if graph is None:
        return []
    for node in list(graph.nodes):  # a max-pool of grid values stays on the grid: its one Q makes it a UINT8 op
        src = node.args[0] if node.args else None
        if isinstance(module_of(model, node), nn.MaxPool2d) and isinstance(src, torch.fx.Node) and isinstance(
                q := module_of(model, src), FakeQuantizer) and not q.per_channel and node.users:
            with graph.inserting_after(node):
                again = graph.call_module(str(src.target), (node,))
            node.replace_all_uses_with(again, delete_user_cb=lambda u, a=again: u is not a)
    for node in list(graph.nodes):  # a quantizer right after one of its grid changes nothing
        src = node.args[0] if node.args else None
        q = module_of(model, node)
        if isinstance(q, FakeQuantizer) and not q.per_channel and isinstance(src, torch.fx.Node) and isinstance(
                p := module_of(model, src), FakeQuantizer) and not p.per_channel and _grid(p) == _grid(q):
            node.replace_all_uses_with(src)
            graph.erase_node(node)
    for node in list(graph.nodes):
        groups: dict[tuple, list[tuple[torch.fx.Node, str]]] = {}
        for u in node.users:
            if u.args and u.args[0] is node and (g := _grid_consumer(model, u)) is not None:
                groups.setdefault(g[0], []).append((u, g[1]))
        for members in groups.values():
            if len(members) < 2:
                continue
            with graph.inserting_after(node):
                shared = graph.call_module(members[0][1], (node,))
            for u, _ in members:
                if isinstance(module_of(model, u), FakeQuantizer):
                    u.replace_all_uses_with(shared)
                    graph.erase_node(u)
                else:
                    u.replace_input_with(node, shared)
    done = []
    for node in graph.nodes:
        layer = module_of(model, node)
        if not isinstance(layer, (QuantConv2d, QuantLinear)) or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, torch.fx.Node) and isinstance(module_of(model, src), _VANISH):
            src = src.args[0]
        q = module_of(model, src) if isinstance(src, torch.fx.Node) else None
        if isinstance(q, FakeQuantizer) and not q.per_channel and _grid(q) == _grid(layer.input_quantizer):
            layer.input_on_grid = True
            done.append(str(node.target))
    graph.lint()
    install_forward(model, graph)
    return done


def relax_relu6(model: nn.Module) -> list[str]:
    """Make each ReLU6 whose only consumer quantizes to at most 6 (unsigned, qmax * s <= 6) a plain ReLU; return
    the nodes changed. Exact: both give qmax above qmax * s. ONNX Runtime fuses a Relu into the unit before a
    zero-point-0 Q, but not a Clip(0, 6) that the Q's range does not make redundant.
    """
    graph = trace_model(model)
    if graph is None:
        return []
    done = []
    for node in list(graph.nodes):
        relu6 = isinstance(module_of(model, node), nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6)
        if not relu6 or len(node.users) != 1:
            continue
        name = _quantizer_name(model, next(iter(node.users)))
        q = model.get_submodule(name) if name else None
        if q is None or q.signed or float(q.qmax * q.step().detach().float()) > 6.0:
            continue
        with graph.inserting_after(node):
            new = graph.call_function(torch.relu, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done.append(node.name)
    if done:
        graph.lint()
        install_forward(model, graph)
    return done


def mark_requant(model: nn.Module) -> list[str]:
    """Flag every sub-8-bit activation quantizer to lower as Q8(s) -> Clip(codes) -> DQ(s); return their names.

    The 8-bit Q ends the producer's node unit (a conv, pooling or residual Add before it fuses into an integer
    kernel); the b-bit range is then a Clip on the UINT8 codes, bit-identical to the b-bit quantizer and one
    byte-wide op. After a DequantizeLinear of another scale it is the cheapest requantization too (DQ -> Q ->
    Clip), and ONNX Runtime does not merge it with the pair before: its DoubleQDQPairsRemover needs a Q followed
    by a DQ, which the Clip separates (a Q8 -> DQ -> Clip -> Q -> DQ form there would be merged, changing values).
    """
    marked = []
    for name, q in model.named_modules():
        if isinstance(q, FakeQuantizer) and not q.per_channel and q.bits < 8 and not name.endswith("weight_quantizer"):
            q.requant8 = True
            marked.append(name)
    return marked
