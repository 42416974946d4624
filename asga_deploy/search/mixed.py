"""The mixed-precision layers of the supernet (method.md section 2): one float weight, logits over candidate
weight and input bit-widths (and, where the target allows it, a gate to the float layer), one convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.modules import input_quantizer, shell_like, weight_quantizer
from .mixquant import mixed_quantize

DEFAULT_BITS = (2, 3, 4, 6, 8)


class _MixedMixin:
    """Shared state and forward pieces of MixedConv2d / MixedLinear (parameters shared with the float layer)."""

    weight: nn.Parameter

    def _init_mixed(self, w_bits: tuple[int, ...], a_bits: tuple[int, ...], act_signed: bool,
                    calib_input: torch.Tensor, alpha_init: float, float_choice: bool = False) -> None:
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
        # a cost prior (search/controller.start_at_budget), on the raw logits ("logit": it grows as 1 / tau
        # with them, so no crossover between prior and logits moves the argmax while tau falls) or on
        # alpha / tau ("score": it fades against the learned logits as tau falls)
        self.prior_space = "logit"
        self.register_buffer("prior_w", torch.zeros(len(w_bits), device=dev))
        self.register_buffer("prior_a", torch.zeros(len(a_bits), device=dev))
        self.register_buffer("w_bits_t", torch.tensor(w_bits, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("a_bits_t", torch.tensor(a_bits, dtype=torch.float32, device=dev), persistent=False)
        self.tau = 1.0
        # --perturb quantized: keep the gradient of W_mix in pass 1, add the perturbation to it in pass 2
        self.capture_mix_grad, self.mix_grad, self.mix_offset = False, None, None
        # the float choice: a gate over (quantized, float); the layer computes (1 - p_f) q(x) + p_f f(x)
        self.float_choice = float_choice
        if float_choice:
            self.alpha_f = nn.Parameter(torch.full((2,), alpha_init, device=dev))
            self.register_buffer("prior_f", torch.zeros(2, device=dev))

    def _z(self, alpha: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return (alpha + prior) / self.tau if self.prior_space == "logit" else alpha / self.tau + prior

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the decision variables of the weight and input choices ((alpha + prior) / tau, or
        alpha / tau + prior)."""
        return self._z(self.alpha_w, self.prior_w), self._z(self.alpha_a, self.prior_a)

    def probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the softmaxes of the weight and input decision variables."""
        zw, za = self.scores()
        return F.softmax(zw, 0), F.softmax(za, 0)

    def float_score(self) -> torch.Tensor | None:
        """Return the gate's decision variables (quantized, float), or None without the float choice."""
        return self._z(self.alpha_f, self.prior_f) if self.float_choice else None

    def prob_float(self) -> torch.Tensor:
        """Return the probability of the float choice (0 without it)."""
        z = self.float_score()
        return F.softmax(z, 0)[1] if z is not None else torch.zeros((), device=self.weight.device)

    def arch_parameters(self) -> list[nn.Parameter]:
        """Return this layer's logits."""
        return [self.alpha_w, self.alpha_a] + ([self.alpha_f] if self.float_choice else [])

    def gated(self, y_quant: torch.Tensor, float_forward) -> torch.Tensor:
        """Return y_quant, or (1 - p_f) y_quant + p_f float_forward() with the float choice."""
        if not self.float_choice:
            return y_quant
        pf = self.prob_float()
        return (1 - pf) * y_quant + pf * float_forward()

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
                   alpha_init: float = 0.01, float_choice: bool = False) -> MixedConv2d:
        """Return a mixed copy of conv sharing its weight and bias."""
        m = shell_like(conv, cls)
        m._init_mixed(w_bits, a_bits, act_signed, calib_input, alpha_init, float_choice)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw, pa = self.probs()
        y = self._conv_forward(self.mixed_input(x, pa), self.search_weight(pw), self.bias)
        return self.gated(y, lambda: self._conv_forward(x, self.weight, self.bias))


class MixedLinear(_MixedMixin, nn.Linear):
    """Linear computing x_mix W_mix^T + b."""

    @classmethod
    def from_float(cls, lin: nn.Linear, w_bits, a_bits, act_signed: bool, calib_input: torch.Tensor,
                   alpha_init: float = 0.01, float_choice: bool = False) -> MixedLinear:
        """Return a mixed copy of lin sharing its weight and bias."""
        m = shell_like(lin, cls)
        m._init_mixed(w_bits, a_bits, act_signed, calib_input, alpha_init, float_choice)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw, pa = self.probs()
        y = F.linear(self.mixed_input(x, pa), self.search_weight(pw), self.bias)
        return self.gated(y, lambda: F.linear(x, self.weight, self.bias))


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


