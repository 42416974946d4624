"""The mixed-precision supernet of method.md section 2 (EdMIPS/GMPQ style), built from any model by name.

Each searched Conv2d/Linear keeps ONE float weight and gains logits over candidate weight and input
bit-widths, one FakeQuantizer per candidate, and computes ONE convolution of the composite input
`x_mix` and the composite weight `W_mix` under softmax(alpha / tau).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import CostTable, LayerCost
from ..errors import PolicyError, UnsupportedTargetError
from ..models import set_module
from ..policy import Policy, policy_from_choice
from ..quant.modules import input_quantizer, shell_like, weight_quantizer
from ..targets import BITS_RANGE, get_target
from .mixquant import mixed_quantize

DEFAULT_BITS = (2, 3, 4, 6, 8)


class _MixedMixin:
    """Shared state and forward pieces of MixedConv2d / MixedLinear (parameters shared with the float layer)."""

    weight: nn.Parameter

    def _init_mixed(self, w_bits: tuple[int, ...], a_bits: tuple[int, ...], act_signed: bool,
                    calib_input: torch.Tensor, alpha_init: float) -> None:
        out_ch = self.weight.shape[0]
        dev = self.weight.device
        self.w_bits, self.a_bits, self.act_signed = tuple(w_bits), tuple(a_bits), act_signed
        self.alpha_w = nn.Parameter(torch.full((len(w_bits),), alpha_init, device=dev))
        self.alpha_a = nn.Parameter(torch.full((len(a_bits),), alpha_init, device=dev))
        self.wq = nn.ModuleList(weight_quantizer(b, out_ch).to(dev) for b in w_bits)
        self.aq = nn.ModuleList(input_quantizer(b, act_signed).to(dev) for b in a_bits)
        # per-candidate MSE init: LSQ's default would make the 6/8-bit grids span ~6x max|w| (method.md 2)
        for q in self.wq:
            q.init_mse(self.weight)
        sample = calibration_sample(calib_input)
        for q in self.aq:
            q.init_mse(sample)
        # a cost prior added to alpha / tau (search/controller.start_at_budget): it shapes the start and does
        # not grow as the temperature falls, so the learned logits, not the prior, decide the end policy
        self.register_buffer("prior_w", torch.zeros(len(w_bits), device=dev))
        self.register_buffer("prior_a", torch.zeros(len(a_bits), device=dev))
        self.register_buffer("w_bits_t", torch.tensor(w_bits, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("a_bits_t", torch.tensor(a_bits, dtype=torch.float32, device=dev), persistent=False)
        self.tau = 1.0
        # --perturb quantized: keep the gradient of W_mix in pass 1, add the perturbation to it in pass 2
        self.capture_mix_grad, self.mix_grad, self.mix_offset = False, None, None

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the decision variables (alpha_w / tau + prior_w, alpha_a / tau + prior_a)."""
        return self.alpha_w / self.tau + self.prior_w, self.alpha_a / self.tau + self.prior_a

    def probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (softmax(alpha_w / tau + prior_w), softmax(alpha_a / tau + prior_a))."""
        zw, za = self.scores()
        return F.softmax(zw, 0), F.softmax(za, 0)

    fused = True  # one autograd node per mixture (mixquant.py); False: the plain sum of FakeQuantizers

    def mixed_weight(self, pw: torch.Tensor) -> torch.Tensor:
        """Return W_mix = sum_i pw_i * Q_w^{b_i}(W)."""
        if self.fused:
            return mixed_quantize(self.weight, pw, self.wq)
        return sum(p * q(self.weight) for p, q in zip(pw, self.wq, strict=False))

    def search_weight(self, pw: torch.Tensor) -> torch.Tensor:
        """Return W_mix as the forward uses it: perturbed in pass 2 of --perturb quantized, its gradient kept in pass 1."""
        wm = self.mixed_weight(pw)
        if self.capture_mix_grad and wm.requires_grad:
            wm.register_hook(self._keep_mix_grad)
        return wm if self.mix_offset is None else wm + self.mix_offset

    def _keep_mix_grad(self, grad: torch.Tensor) -> None:
        self.mix_grad = grad.detach()

    def mixed_input(self, x: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """Return x_mix = sum_j pa_j * Q_a^{b_j}(x)."""
        if self.fused:
            return mixed_quantize(x, pa, self.aq)
        return sum(p * q(x) for p, q in zip(pa, self.aq, strict=False))

    def expected_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (E[b_w], E[b_a]) under the current softmaxes (differentiable in the logits)."""
        pw, pa = self.probs()
        return (pw * self.w_bits_t).sum(), (pa * self.a_bits_t).sum()


class MixedConv2d(_MixedMixin, nn.Conv2d):
    """Conv2d computing conv(x_mix, W_mix) + b: one convolution whatever the number of candidates."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits, a_bits, act_signed: bool, calib_input: torch.Tensor,
                   alpha_init: float = 0.01) -> MixedConv2d:
        """Return a mixed copy of conv sharing its weight and bias."""
        m = shell_like(conv, cls)
        m._init_mixed(w_bits, a_bits, act_signed, calib_input, alpha_init)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw, pa = self.probs()
        return self._conv_forward(self.mixed_input(x, pa), self.search_weight(pw), self.bias)


class MixedLinear(_MixedMixin, nn.Linear):
    """Linear computing x_mix W_mix^T + b."""

    @classmethod
    def from_float(cls, lin: nn.Linear, w_bits, a_bits, act_signed: bool, calib_input: torch.Tensor,
                   alpha_init: float = 0.01) -> MixedLinear:
        """Return a mixed copy of lin sharing its weight and bias."""
        m = shell_like(lin, cls)
        m._init_mixed(w_bits, a_bits, act_signed, calib_input, alpha_init)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw, pa = self.probs()
        return F.linear(self.mixed_input(x, pa), self.search_weight(pw), self.bias)


CALIB_SAMPLES = 32768


def calibration_sample(x: torch.Tensor) -> torch.Tensor:
    """Return a fixed-seed subsample of x plus its extremes (the clip search scales with max|x|).

    A full batch of activations (~1M values) times 96 clip fractions times every candidate of every
    layer made the supernet build take minutes on 2 cores; 32k values give the same MSE optimum.
    """
    flat = x.detach().reshape(-1)
    if flat.numel() <= CALIB_SAMPLES:
        return flat
    idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:CALIB_SAMPLES]
    return torch.cat([flat[idx.to(flat.device)], flat.min().reshape(1), flat.max().reshape(1)])


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
                 edges: list[str], target: str, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.model_name, self.costs, self.searched, self.edges = model_name, costs, searched, edges
        self.target, self.num_classes, self.input_shape = target, num_classes, tuple(input_shape)
        self.table = CostTable(costs, tuple(searched))

    @classmethod
    def build(cls, model: nn.Module, model_name: str, costs: dict[str, LayerCost], calib_x: torch.Tensor,
              weight_bits=DEFAULT_BITS, act_bits=DEFAULT_BITS, target: str = "sim", edges: list[str] | None = None,
              replace_unsupported: bool = True, alpha_init: float = 0.01, num_classes: int = 10,
              input_shape: tuple[int, ...] = ()) -> Supernet:
        """Swap every non-edge Conv2d/Linear of model (by module name) for its mixed version."""
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
            set_module(model, n, cls_.from_float(m, w, a, signed, inputs[n], alpha_init))
        return cls(model, model_name, costs, searched, edges, target, num_classes, input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def mixed_layers(self) -> dict[str, MixedConv2d | MixedLinear]:
        """Return {name: mixed layer} in module order."""
        return {n: self.model.get_submodule(n) for n in self.searched}

    def arch_parameters(self) -> list[nn.Parameter]:
        """Return every logit vector (alpha_w, alpha_a per layer)."""
        return [p for m in self.mixed_layers().values() for p in (m.alpha_w, m.alpha_a)]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Return every parameter except the logits: weights, BN affine, quantizer step sizes."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def set_temperature(self, tau: float) -> None:
        """Set the softmax temperature of every mixed layer."""
        for m in self.mixed_layers().values():
            m.tau = float(tau)

    def options(self) -> dict[str, list[tuple[int, int]]]:
        """Return per searched layer its (w, a) options, weight-major (the order of extraction values)."""
        return {n: [(w, a) for w in m.w_bits for a in m.a_bits] for n, m in self.mixed_layers().items()}

    def expected_cost(self, metric: str = "bitops") -> torch.Tensor:
        """Return C(alpha) as a ratio of the W8A8 reference; cost is bilinear in (w, a), so E[cost] = cost(E[w], E[a])."""
        total = 0.0
        for n, m in self.mixed_layers().items():
            ew, ea = m.expected_bits()
            total = total + self.table.unit_cost(metric, n, ew, ea)
        return total / self.table.reference(metric)

    def argmax_choice(self) -> dict[str, tuple[int, int]]:
        """Return {layer: (w, a)} of the largest logits."""
        return {n: (m.w_bits[int(m.scores()[0].argmax())], m.a_bits[int(m.scores()[1].argmax())])
                for n, m in self.mixed_layers().items()}

    def cost_ratio(self, choice: dict[str, tuple[int, int]], metric: str = "bitops") -> float:
        """Return the exact cost of a discrete choice as a ratio of the W8A8 reference."""
        return self.table.ratio(metric, choice)

    def derive_policy(self, choice: dict[str, tuple[int, int]] | None = None, edge_bits: str = "8",
                      provenance: dict | None = None) -> Policy:
        """Return the Policy of a choice (default: argmax); edge layers 8-bit ('8') or float ('float')."""
        choice = choice if choice is not None else self.argmax_choice()
        return policy_from_choice(self.model_name, self.target, self.costs, choice, self.input_shape,
                                  self.num_classes, edge_bits, provenance)
