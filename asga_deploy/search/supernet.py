"""The mixed-precision supernet of method.md section 2 (EdMIPS/GMPQ style), built from any model by name.

Each searched Conv2d/Linear keeps ONE float weight and gains logits over candidate weight and input
bit-widths, one FakeQuantizer per candidate, and computes ONE convolution of the composite input
`x_mix` and the composite weight `W_mix` under softmax(alpha / tau).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cost import FLOAT, CostTable, LayerCost, choice_key
from ..errors import PolicyError, UnsupportedTargetError
from ..models import set_module
from ..policy import Policy, policy_from_choice
from ..targets import BITS_RANGE, get_target
from .mixed import DEFAULT_BITS, MixedConv2d, MixedLinear, calibration_sample  # noqa: F401


def check_bits(bits, what: str) -> tuple[int, ...]:
    """Return the sorted unique candidate bit-widths; raise PolicyError when empty or outside 2..8."""
    lo, hi = BITS_RANGE
    out = tuple(sorted(set(int(b) for b in bits)))
    bad = [b for b in out if not lo <= b <= hi]
    if not out or bad:
        raise PolicyError(f"candidate {what} bit-widths {list(bits)}: each must be in {lo}..{hi}"
                          + (f" (got {bad})" if bad else " (the set is empty)"))
    return out


def narrow(bits: tuple[int, ...], allowed: tuple[int, ...], replace: bool) -> tuple[int, ...]:
    """Return the candidates a target runs; with replace, an unsupported b becomes the largest allowed b' < b."""
    out = set()
    for b in bits:
        if b in allowed:
            out.add(b)
        elif replace and (lower := [a for a in allowed if a < b]):
            out.add(max(lower))  # e.g. TensorRT: unsigned A8 -> A7 (INT8 after a ReLU)
    return tuple(sorted(out))


@torch.no_grad()
def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the input each named layer sees on batch x (float model, eval mode)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: seen.__setitem__(n, inp[0].detach())) for n in names]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


class Supernet(nn.Module):
    """A model whose searched layers are mixed-precision; expected cost and policy derivation."""

    def __init__(self, model: nn.Module, model_name: str, costs: dict[str, LayerCost], searched: list[str],
                 edges: list[str], target: str, num_classes: int, input_shape: tuple[int, ...],
                 edge_bits: str = "8", lut: dict | None = None, rest_ms: float = 0.0, pairs: tuple = ()):
        super().__init__()
        self.model = model
        self.model_name, self.costs, self.searched, self.edges = model_name, costs, searched, edges
        self.target, self.num_classes, self.input_shape = target, num_classes, tuple(input_shape)
        tgt = get_target(target)
        fixed = {n: FLOAT if edge_bits == "float" else tgt.highest(costs[n].input_signed) for n in edges}
        self.table = CostTable(costs, tuple(searched), fixed, lut, rest_ms, tuple(pairs))
        self._lat: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple[str, frozenset[str]], torch.Tensor] = {}  # prob_of's choice masks

    @classmethod
    def build(cls, model: nn.Module, model_name: str, costs: dict[str, LayerCost], calib_x: torch.Tensor,
              weight_bits=DEFAULT_BITS, act_bits=DEFAULT_BITS, target: str = "sim", edges: list[str] | None = None,
              replace_unsupported: bool = True, alpha_init: float = 0.01, num_classes: int = 10,
              input_shape: tuple[int, ...] = (), float_choice: bool = False, edge_bits: str = "8",
              lut: dict | None = None, rest_ms: float = 0.0, pairs: tuple = ()) -> Supernet:
        """Swap every non-edge Conv2d/Linear of model (by module name) for its mixed version (with a gate to
        the float layer when float_choice)."""
        wb, ab = check_bits(weight_bits, "weight"), check_bits(act_bits, "activation")
        tgt = get_target(target)
        edges = list(edges or [])
        searched = [n for n in costs if n not in edges]
        inputs = _layer_inputs(model, searched, calib_x)
        plan = {}
        for n in searched:  # narrow every layer first: report an impossible target before touching the model
            signed = costs[n].input_signed
            w = narrow(wb, tgt.weight_bits, replace_unsupported)
            a = narrow(ab, tgt.act_bits(signed), replace_unsupported)
            if not w or not a:
                kind = "weight" if not w else f"{'signed' if signed else 'unsigned'} activation"
                raise UnsupportedTargetError(
                    f"layer {n}: no candidate {kind} bit-width left on target {target} (candidates "
                    f"{list(wb if not w else ab)}, target allows {list(tgt.weight_bits if not w else tgt.act_bits(signed))})")
            plan[n] = (w, a, signed)
        for n, (w, a, signed) in plan.items():
            m = model.get_submodule(n)
            cls_ = MixedConv2d if isinstance(m, nn.Conv2d) else MixedLinear
            set_module(model, n, cls_.from_float(m, w, a, signed, inputs[n], alpha_init, float_choice))
        return cls(model, model_name, costs, searched, edges, target, num_classes, input_shape, edge_bits, lut,
                   rest_ms, pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def mixed_layers(self) -> dict[str, MixedConv2d | MixedLinear]:
        """Return {name: mixed layer} in module order."""
        return {n: self.model.get_submodule(n) for n in self.searched}

    def arch_parameters(self) -> list[nn.Parameter]:
        """Return every logit vector (alpha_w, alpha_a, and the float gate's alpha_f, per layer)."""
        return [p for m in self.mixed_layers().values() for p in m.arch_parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Return every parameter except the logits: weights, BN affine, quantizer step sizes."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def set_temperature(self, tau: float) -> None:
        """Set the softmax temperature of every mixed layer."""
        for m in self.mixed_layers().values():
            m.tau = float(tau)

    def options(self) -> dict[str, list[tuple[int, int]]]:
        """Return per searched layer its (w, a) options, weight-major, then FLOAT where the layer may stay float
        (the order of the extraction values)."""
        return {n: [(w, a) for w in m.w_bits for a in m.a_bits] + ([FLOAT] if m.float_choice else [])
                for n, m in self.mixed_layers().items()}

    def latency_grid(self, n: str, m) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the layer's latency matrix over (w, a) candidates and its float latency, in ns (cached)."""
        if n not in self._lat:
            t = self.table
            grid = [[float(t.unit_cost("latency", n, w, a)) for a in m.a_bits] for w in m.w_bits]
            fl = float(t.unit_cost("latency", n, *FLOAT)) if m.float_choice else 0.0
            self._lat[n] = (torch.tensor(grid, device=m.weight.device), torch.tensor(fl, device=m.weight.device))
        return self._lat[n]

    def expected_cost(self, metric: str = "bitops") -> torch.Tensor:
        """Return C(alpha) as a ratio of the counted layers' W8A8 cost (differentiable in the logits).

        BitOPs and size are bilinear in (w, a), so E[cost] = cost(E[w], E[a]); latency comes from the
        measured table, E = pw^T M pa; with the float gate, (1 - p_f) E[quantized] + p_f cost(float); a latency
        table's pair terms (two neighbouring float layers) add P(first's choice) x P(second's choice) x their cost.
        """
        total = 0.0
        probs = {}
        for n, m in self.mixed_layers().items():
            pf = m.prob_float()
            if metric == "latency":
                grid, fl = self.latency_grid(n, m)
                pw, pa = m.probs()
                probs[n] = (pw, pa, pf)
                q = pw @ grid @ pa
            else:
                q = self.table.unit_cost(metric, n, *m.expected_bits())
                fl = self.table.unit_cost(metric, n, *FLOAT) if m.float_choice else 0.0
            total = total + (1 - pf) * q + pf * fl
        if metric == "latency":
            for p in self.table.counted_pairs():
                total = total + self.prob_of(p.first, p.first_choices, *probs[p.first]) \
                    * self.prob_of(p.second, p.second_choices, *probs[p.second]) * float(p.ns())
        return total / self.table.reference(metric)

    def prob_of(self, n: str, keys: frozenset[str], pw: torch.Tensor, pa: torch.Tensor, pf: torch.Tensor
                ) -> torch.Tensor:
        """Return the probability that layer n's choice is one of `keys` (choice keys: "float", "w4a8"), from its
        weight, input and float probabilities."""
        if (n, keys) not in self._masks:
            m = self.mixed_layers()[n]
            self._masks[n, keys] = torch.tensor([[float(choice_key(w, a) in keys) for a in m.a_bits]
                                                 for w in m.w_bits], dtype=pw.dtype, device=pw.device)
        return (1 - pf) * (pw @ self._masks[n, keys] @ pa) + (pf if "float" in keys else 0.0)

    def argmax_choice(self) -> dict[str, tuple[int, int]]:
        """Return {layer: (w, a) or FLOAT} of the largest decision variables."""
        out = {}
        for n, m in self.mixed_layers().items():
            zf = m.float_score()
            if zf is not None and int(zf.argmax()) == 1:
                out[n] = FLOAT
            else:
                out[n] = (m.w_bits[int(m.scores()[0].argmax())], m.a_bits[int(m.scores()[1].argmax())])
        return out

    def cost_ratio(self, choice: dict[str, tuple[int, int]], metric: str = "bitops") -> float:
        """Return the exact cost of a discrete choice as a ratio of the W8A8 reference."""
        return self.table.ratio(metric, choice)

    def derive_policy(self, choice: dict[str, tuple[int, int]] | None = None, edge_bits: str = "8",
                      provenance: dict | None = None) -> Policy:
        """Return the Policy of a choice (default: argmax); edge layers 8-bit ('8') or float ('float')."""
        choice = choice if choice is not None else self.argmax_choice()
        return policy_from_choice(self.model_name, self.target, self.costs, choice, self.input_shape,
                                  self.num_classes, edge_bits, provenance)
