"""Per-layer MACs and parameter counts from a real forward pass; BitOPs and weight bytes of a policy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerCost:
    """Cost facts of one Conv2d/Linear at an input shape; `input_signed` is False after a ReLU."""

    name: str
    kind: str  # "conv" | "linear"
    macs: int
    params: int  # weight elements (bias excluded: it stays 32-bit in every backend)
    input_signed: bool

    def bitops(self, weight_bits: int, act_bits: int) -> int:
        """Return MACs * b_w * b_a."""
        return self.macs * weight_bits * act_bits

    def weight_bytes(self, weight_bits: int) -> float:
        """Return the weight storage at weight_bits bits per element."""
        return self.params * weight_bits / 8


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    per_output = (m.in_channels // m.groups) * kh * kw  # grouped / depthwise: only in_c/groups inputs
    return int(out.shape[1] * out.shape[2] * out.shape[3] * per_output)


@torch.no_grad()
def layer_costs(model: nn.Module, input_shape: Iterable[int], example: torch.Tensor | None = None
                ) -> dict[str, LayerCost]:
    """Return {layer name: LayerCost} for every Conv2d/Linear, by hooks on one forward at input_shape.

    `input_shape` is (C, H, W) without the batch. Whether a layer's input is signed is read from the
    forward: with `example` (real data) if given, else from a seeded random normal input.
    """
    shape = tuple(int(s) for s in input_shape)
    x = example if example is not None else torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    costs: dict[str, LayerCost] = {}
    hooks = []

    def hook(name):
        def fn(m, inp, out):
            signed = bool((inp[0] < 0).any())
            if isinstance(m, nn.Conv2d):
                costs[name] = LayerCost(name, "conv", _conv_macs(m, out), m.weight.numel(), signed)
            else:
                tokens = out[0].numel() // m.out_features  # Linear on (N, ..., F)
                costs[name] = LayerCost(name, "linear", int(tokens * m.in_features * m.out_features),
                                        m.weight.numel(), signed)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    # module order (a forward may visit layers in another order)
    order = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {n: costs[n] for n in order if n in costs}


def bitops(bits: Mapping[str, tuple[int, int]], costs: Mapping[str, LayerCost]) -> int:
    """Return sum of MACs * b_w * b_a over the layers in bits ({name: (weight_bits, act_bits)})."""
    return sum(costs[n].bitops(w, a) for n, (w, a) in bits.items())


def weight_bytes(bits: Mapping[str, tuple[int, int]], costs: Mapping[str, LayerCost]) -> float:
    """Return the weight storage in bytes of the layers in bits."""
    return sum(costs[n].weight_bytes(w) for n, (w, _) in bits.items())


def w8a8_bitops(names: Iterable[str], costs: Mapping[str, LayerCost]) -> int:
    """Return the BitOPs of the given layers at W8A8: the reference of every BitOPs ratio."""
    return sum(costs[n].bitops(8, 8) for n in names)


METRICS = ("bitops", "size", "latency")  # size in weight bits, latency in ns: costs stay integers
FLOAT = (32, 32)  # the choice "no quantizer": FP32 on ONNX Runtime, FP16 on TensorRT (counted as 32 bits)


def choice_key(weight_bits: int, act_bits: int) -> str:
    """Return the name of a choice in latency tables: "float", or "w<W>a<A>"."""
    return "float" if (weight_bits, act_bits) == FLOAT else f"w{weight_bits}a{act_bits}"


@dataclass(frozen=True)
class PairTerm:
    """A latency term of two neighbouring layers (lut.model.search_terms): `ms` when `first`'s choice is one of
    `first_choices` and `second`'s one of `second_choices` (two float neighbours share the layout changes and Q/DQ
    between them)."""

    first: str
    second: str
    first_choices: frozenset[str]
    second_choices: frozenset[str]
    ms: float

    @classmethod
    def from_dict(cls, d: Mapping) -> PairTerm:
        return cls(str(d["first"]), str(d["second"]), frozenset(d["first_choices"]), frozenset(d["second_choices"]),
                   float(d["ms"]))

    def ns(self) -> int:
        return round(self.ms * 1e6)

    def applies(self, first: tuple[int, int], second: tuple[int, int]) -> bool:
        """Return whether the term applies to these two (w, a) choices."""
        return choice_key(*first) in self.first_choices and choice_key(*second) in self.second_choices


@dataclass(frozen=True)
class CostTable:
    """What each counted layer costs for each choice under each metric, the W8A8 references, and the
    constant part of the model (its other layers at their fixed choices, and for latency the rest of the graph).
    Latency may have `pairs` (PairTerm): terms of two neighbouring layers' choices. A pair with a fixed layer is
    part of the other layer's unit cost (or of the constant, both fixed); `counted_pairs` are the ones between two
    counted layers, which `total` adds and the extraction prices exactly.

    `counted` are the layers a budget counts (the searched ones; the first conv and the classifier are
    excluded by the EdMIPS convention, and held at `fixed`). Costs are integers: BitOPs, weight bits for
    size, nanoseconds for latency (from a measured per-layer table, `lut`: layer -> choice key -> ms).
    """

    layers: Mapping[str, LayerCost]
    counted: tuple[str, ...]
    fixed: Mapping[str, tuple[int, int]] | None = None
    lut: Mapping[str, Mapping[str, float]] | None = None
    rest_ms: float = 0.0
    pairs: tuple[PairTerm, ...] = ()

    def counted_pairs(self) -> list[PairTerm]:
        """Return the pair terms between two counted layers."""
        counted = set(self.counted)
        return [p for p in self.pairs if p.first in counted and p.second in counted]

    def _fixed_pairs(self, name: str, bits: tuple[int, int]) -> int:
        """Return the pair terms (ns) of a counted layer's choice with the fixed layers next to it."""
        fixed = self.fixed or {}
        return sum(p.ns() for p in self.pairs if (p.first == name and p.second in fixed and p.applies(bits, fixed[p.second]))
                   or (p.second == name and p.first in fixed and p.applies(fixed[p.first], bits)))

    def unit_cost(self, metric: str, name: str, weight_bits, act_bits) -> int:
        """Return one layer's cost of a (w, a) choice in the metric's integer unit (FLOAT: 32 x 32 bits)."""
        c = self.layers[name]
        if metric == "bitops":
            return c.bitops(weight_bits, act_bits)
        if metric == "size":
            return c.params * weight_bits
        if metric == "latency":
            if self.lut is None:
                raise ValueError("a latency cost needs a measured latency table (asga lut)")
            own = round(self.lut[name][choice_key(weight_bits, act_bits)] * 1e6)
            return own + self._fixed_pairs(name, (weight_bits, act_bits)) if self.pairs and name in self.counted \
                else own
        raise ValueError(f"unknown cost metric {metric!r}; known: {', '.join(METRICS)}")

    def total(self, metric: str, bits: Mapping[str, tuple[int, int]]) -> int:
        """Return the cost of the counted layers of a {layer: (w, a)} choice (for latency with the pair terms
        between them)."""
        own = sum(self.unit_cost(metric, n, *bits[n]) for n in self.counted if n in bits)
        if metric != "latency" or not self.pairs:
            return own
        return own + sum(p.ns() for p in self.counted_pairs() if p.first in bits and p.second in bits
                         and p.applies(bits[p.first], bits[p.second]))

    def constant(self, metric: str) -> int:
        """Return the cost of what no choice changes: the fixed layers, and for latency the rest of the graph."""
        fixed = sum(self.unit_cost(metric, n, *b) for n, b in (self.fixed or {}).items())
        if metric != "latency":
            return fixed
        both = self.fixed or {}
        return fixed + round(self.rest_ms * 1e6) + sum(p.ns() for p in self.pairs if p.first in both and p.second in both
                                                       and p.applies(both[p.first], both[p.second]))

    def reference(self, metric: str) -> int:
        """Return the cost of W8A8 on every counted layer: the reference of every ratio."""
        return self.total(metric, dict.fromkeys(self.counted, (8, 8)))

    def ratio(self, metric: str, bits: Mapping[str, tuple[int, int]]) -> float:
        """Return total / reference (0 when nothing is counted)."""
        ref = self.reference(metric)
        return self.total(metric, bits) / ref if ref else 0.0
