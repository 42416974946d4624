"""torch.fx tracing with quantized layers and quantizers kept as single (leaf) nodes."""

from __future__ import annotations

import torch
from torch import nn

from .modules import QuantConv2d, QuantLinear
from .quantizers import FakeQuantizer


class LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps quantized layers and quantizers as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantConv2d, QuantLinear, FakeQuantizer)) or super().is_leaf_module(m, qualname)


def trace_graph(model: nn.Module) -> torch.fx.Graph | None:
    """Return the fx graph of model with quantized layers as leaves, or None if it is not traceable."""
    try:
        return LeafTracer().trace(model)
    except Exception:  # data-dependent control flow, unsupported ops: callers fall back
        return None


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """Return an fx GraphModule of model with quantized layers as leaves, or None if untraceable."""
    graph = trace_graph(model)
    return None if graph is None else torch.fx.GraphModule(model, graph)
