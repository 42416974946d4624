"""Deploy quantizers: 8-bit Q/DQ around residual Adds and after convs (ONNX Runtime's full node units), or on
residual Add inputs (TensorRT, mode "add_inputs": see `_plan_add_inputs`).

ONNX Runtime runs a Conv as an integer kernel only as a full node unit (DQ -> Conv -> Q) and an Add as
QLinearAdd only when its inputs and output are quantized. These quantizers are part of the deployed
function (not of the searched policy): they are inserted with torch.fx into the fake-quant model at
training time, so that torch and the exported graph compute the same function.

Placement, generic over any fx-traceable model (quantized layers and quantizers are fx leaves):
  - each input of a two-tensor Add that is not already a quantizer's output gets a quantizer;
  - an Add's output gets one, after the ReLU when a ReLU is its only user (unsigned: ORT drops a
    Relu in front of a Q with zero point 0, so the Add stays a full unit);
  - an 8-bit layer input (or Add input) fed, through max-pool/flatten, by such a quantizer of the same
    sign shares it (the same module): one scale per tensor, as ORT's own quantizer does, so ORT
    removes the repeated Q/DQ exactly instead of requantizing;
  - a quantized conv whose output (through BN and ReLU) goes to several consumers, or to one that is
    neither a quantized layer nor a quantizer (an Add, a max-pool, the head's pooling), gets one
    shared quantizer after its ReLU (ORT needs exactly one Q after the conv); placed first, so an
    Add input that already comes out of a quantizer gets no second one.
The model keeps its class and its state_dict keys; the new quantizers live under `deploy_quant`
and the model's forward is replaced by the rewritten graph (attribute look-ups stay dynamic, so
fold_bn's module swaps take effect).
"""

from __future__ import annotations

import operator
import types

import torch
from torch import nn

from .modules import QuantConv2d, QuantLinear
from .quantizers import FakeQuantizer
from .tracing import trace_graph

CONTAINER = "deploy_quant"
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__iadd__")
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = (torch.relu, torch.nn.functional.relu, torch.relu_)
_PASS_MODULES = (nn.BatchNorm2d, nn.Identity)
_NONNEG_KEEP = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten, nn.Dropout)


def is_add(node: torch.fx.Node) -> bool:
    """Return whether an fx node adds two tensors (a residual Add)."""
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(tensors) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    return ((node.op == "call_function" and node.target in _ADD_FUNCS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def module_of(gm: nn.Module, node: torch.fx.Node) -> nn.Module | None:
    """Return the module an fx call_module node calls (None for other nodes)."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_relu(model: nn.Module, node: torch.fx.Node) -> bool:
    """Return whether an fx node is a ReLU (module, function or method)."""
    m = module_of(model, node)
    return isinstance(m, _RELU_MODULES) or (node.op == "call_function" and node.target in _RELU_FUNCS) or (
        node.op == "call_method" and node.target in ("relu", "relu_"))


def _nonneg(model: nn.Module, node: torch.fx.Node, memo: dict) -> bool:
    """Whether a node's value is >= 0 by construction (ReLU, unsigned quantizer, pooling of those)."""
    if node in memo:
        return memo[node]
    m = module_of(model, node)
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if is_relu(model, node):
        out = True
    elif isinstance(m, FakeQuantizer):
        out = not m.signed
    elif isinstance(m, _NONNEG_KEEP) or (node.op == "call_function" and node.target is torch.flatten):
        out = bool(args) and _nonneg(model, args[0], memo)
    elif is_add(node):
        out = all(_nonneg(model, a, memo) for a in args)
    else:
        out = False
    memo[node] = out
    return out


def _is_quantizing_consumer(model: nn.Module, node: torch.fx.Node) -> bool:
    return isinstance(module_of(model, node), (QuantConv2d, QuantLinear, FakeQuantizer))


def conv_tail(model: nn.Module, node: torch.fx.Node) -> torch.fx.Node:
    """Follow a conv's output through single-user BN/Identity/ReLU nodes; return the last one."""
    while len(node.users) == 1:
        (user,) = node.users
        if isinstance(module_of(model, user), _PASS_MODULES) or is_relu(model, user):
            node = user
        else:
            break
    return node


class _Planner:
    def __init__(self, model: nn.Module, graph: torch.fx.Graph):
        self.model, self.graph = model, graph
        self.container = nn.Module()
        self.records: list[dict] = []
        self.memo: dict = {}

    def insert(self, key: str, src: torch.fx.Node, users: list[torch.fx.Node] | None, role: str,
               before: str, signed: bool | None = None) -> torch.fx.Node:
        """Insert quantizer `key` on src's value for the given users (all users if None); signed by default
        where the value can be negative."""
        signed = (not _nonneg(self.model, src, self.memo)) if signed is None else signed
        q = FakeQuantizer(8, signed=signed)
        self.container.add_module(key, q)
        self.model.add_module(CONTAINER, self.container)  # visible to get_submodule during planning
        targets = list(src.users) if users is None else users
        with self.graph.inserting_after(src):
            qn = self.graph.call_module(f"{CONTAINER}.{key}", (src,))
        for u in targets:
            u.replace_input_with(src, qn)
        self.memo[qn] = not signed
        self.records.append({"name": f"{CONTAINER}.{key}", "role": role, "after": _describe(src),
                             "before": before, "bits": 8, "signed": signed})
        return qn

    def reuse(self, target: str, src: torch.fx.Node, users: list[torch.fx.Node], before: str) -> torch.fx.Node:
        """Apply the existing deploy quantizer `target` again on src (same grid: an exact no-op)."""
        with self.graph.inserting_after(src):
            qn = self.graph.call_module(target, (src,))
        for u in users:
            u.replace_input_with(src, qn)
        q = self.model.get_submodule(target)
        self.memo[qn] = not q.signed
        self.records.append({"name": target, "role": "add_input", "after": _describe(src), "before": before,
                             "bits": 8, "signed": q.signed, "shared": True})
        return qn


def _source_quantizer(model: nn.Module, node: torch.fx.Node) -> tuple[torch.fx.Node, FakeQuantizer] | None:
    """Return the deploy quantizer whose grid a value is on (through max-pool/flatten/identity), if any."""
    while True:
        m = module_of(model, node)
        if isinstance(m, FakeQuantizer) and str(node.target).startswith(CONTAINER + "."):
            return node, m
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        keeps = isinstance(m, (nn.MaxPool2d, nn.Identity, nn.Flatten, nn.Dropout)) or (
            node.op == "call_function" and node.target is torch.flatten)
        if not keeps or len(args) != 1:
            return None
        node = args[0]


def _describe(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _conv_output(model: nn.Module, node: torch.fx.Node) -> bool:
    """Whether a value is a quantized conv's output (through BN/Identity) used only there (fusable into its epilogue)."""
    while isinstance(module_of(model, node), _PASS_MODULES) and node.args and isinstance(node.args[0], torch.fx.Node):
        if len(node.users) != 1:
            return False
        node = node.args[0]
    return isinstance(module_of(model, node), QuantConv2d) and len(node.users) == 1


def _normalise_add(node: torch.fx.Node) -> None:
    if node.op == "call_function" and node.target is operator.iadd:
        node.target = operator.add  # in place adds would alias tensors seen by calibration
    elif node.op == "call_method" and node.target in ("add_", "__iadd__"):
        node.target = "add"


def _plan_units(model: nn.Module, graph: torch.fx.Graph, plan: _Planner) -> None:
    """ONNX Runtime: every conv a full node unit, every residual Add a QLinearAdd, shared scales where tied."""
    for node in list(graph.nodes):  # conv outputs first: one shared Q makes the conv a full node unit
        if not isinstance(module_of(model, node), QuantConv2d):
            continue
        tail = conv_tail(model, node)
        users = list(tail.users)
        if not users or any(u.op == "output" for u in users):
            continue  # logits stay float
        if len(users) > 1 or not _is_quantizing_consumer(model, users[0]):
            plan.insert(f"{node.target.replace('.', '_')}_out", tail, None, "conv_output", "(users)")
    for node in list(graph.nodes):
        if not is_add(node):
            continue
        _normalise_add(node)
        for i, a in enumerate([a for a in node.args if isinstance(a, torch.fx.Node)]):
            if isinstance(module_of(model, a), FakeQuantizer):
                continue
            src = _source_quantizer(model, a)
            if src is not None and src[1].signed == (not _nonneg(model, a, plan.memo)):
                plan.reuse(src[0].target, a, [node], node.name)  # same scale: no requantization
            else:
                plan.insert(f"{node.name}_in{i}", a, [node], "add_input", node.name)
        users = list(node.users)
        if len(users) == 1 and is_relu(model, users[0]):
            plan.insert(f"{node.name}_out", users[0], None, "add_output", "(users)")
        elif users and not all(_is_quantizing_consumer(model, u) for u in users):
            plan.insert(f"{node.name}_out", node, None, "add_output", "(users)")
    for node in list(graph.nodes):  # 8-bit layer inputs fed by a deploy quantizer share its scale
        layer = module_of(model, node)
        if not isinstance(layer, (QuantConv2d, QuantLinear)) or not node.args:
            continue
        src = _source_quantizer(model, node.args[0])
        q = layer.input_quantizer
        if src is not None and q.bits == 8 and q.signed == src[1].signed and q is not src[1]:
            layer.input_quantizer = src[1]
            plan.records.append({"name": f"{node.target}.input_quantizer", "role": "tied_input", "after": src[0].target,
                                 "shares": src[0].target, "bits": 8, "signed": q.signed})


def _plan_add_inputs(model: nn.Module, graph: torch.fx.Graph, plan: _Planner) -> None:
    """TensorRT (NVIDIA's QAT rule for ResNets): a signed 8-bit Q/DQ on each residual Add input except the one
    conv output that TensorRT fuses the Add into (its epilogue), so that the Add and the next conv run INT8."""
    for node in list(graph.nodes):
        if not is_add(node):
            continue
        _normalise_add(node)
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        fused = next((a for a in args if _conv_output(model, a)), None)
        for i, a in enumerate(args):
            m = module_of(model, a)
            if a is fused or (isinstance(m, FakeQuantizer) and m.signed):
                continue
            plan.insert(f"{node.name}_in{i}", a, [node], "add_input", node.name, signed=True)


def insert_deploy_quantizers(model: nn.Module, mode: str = "units") -> list[dict]:
    """Insert 8-bit deploy quantizers in place (mode "units": residual Adds and conv outputs for ONNX Runtime;
    "add_inputs": residual Add inputs for TensorRT); return their records.

    Returns [] and leaves the model unchanged when it has no place for them or is not fx-traceable.
    """
    if mode not in ("units", "add_inputs"):
        raise ValueError(f"unknown deploy quantizer mode {mode!r}")
    if hasattr(model, CONTAINER):
        raise ValueError(f"model already carries {CONTAINER}")
    graph = trace_graph(model)
    if graph is None:
        return []
    plan = _Planner(model, graph)
    (_plan_units if mode == "units" else _plan_add_inputs)(model, graph, plan)
    if not plan.records:
        if hasattr(model, CONTAINER):
            delattr(model, CONTAINER)
        return []
    graph.lint()
    install_forward(model, graph)
    return plan.records


def install_forward(model: nn.Module, graph: torch.fx.Graph) -> None:
    """Replace model.forward (on the instance) by the rewritten graph's code."""
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<{CONTAINER} forward of {type(model).__name__}>", "exec"), scope)
    model.forward = types.MethodType(scope["forward"], model)


def trace_model(model: nn.Module) -> torch.fx.Graph | None:
    """Return the fx graph of the forward a model runs: its installed one where deploy quantizers were inserted.

    torch.fx traces the class's forward, not an instance attribute, so the class is swapped for the time of it.
    """
    fwd = model.__dict__.get("forward")
    if not isinstance(fwd, types.MethodType):
        return trace_graph(model)
    cls = model.__class__
    model.__class__ = type(cls.__name__, (cls,), {"forward": fwd.__func__})
    try:
        return trace_graph(model)
    finally:
        model.__class__ = cls


def deploy_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Return the deploy quantizers of a model by module name (empty if none)."""
    c = getattr(model, CONTAINER, None)
    return {f"{CONTAINER}.{n}": m for n, m in c.named_children()} if c is not None else {}
