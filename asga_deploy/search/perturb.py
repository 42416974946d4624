"""What the sharpness step perturbs (method.md section 4, `--perturb`), and how many quantized codes it flips.

  latent    e = max(rho / ||g|| - gamma, 0) g on the float weights behind the straight-through estimator
            (SAGM as written; a 2-bit step dwarfs it, so few codes flip: SAQ's "perturbation diminishment");
  quantized the same e on the searched layers' quantized (mixed) weights Q(W), after the quantizer (SAQ);
            every other parameter is perturbed as in latent;
  asam      scale-invariant (ASAM): e = max(rho / ||T g|| - gamma, 0) T^2 g with T = |w| + 0.01.
The fraction of weight codes the perturbation changes is measured on each searched layer's most likely
weight grid (its argmax candidate), weighted by the layer's size.
"""

from __future__ import annotations

import torch
from torch import nn

PERTURBS = ("latent", "quantized", "asam")
ASAM_ETA = 0.01  # ASAM's offset: zero weights still get a (small) perturbation


class Perturbation:
    """Perturb the weights of a supernet for the second pass of a step, then restore them bit-exactly."""

    def __init__(self, mode: str, w_params: list[nn.Parameter], mixed: dict[str, nn.Module], gamma: float):
        if mode not in PERTURBS:
            raise ValueError(f"perturb {mode!r} not in {PERTURBS}")
        self.mode, self.w_params, self.mixed, self.gamma = mode, w_params, mixed, gamma
        mixed_weights = {id(m.weight) for m in mixed.values()}
        # in quantized mode the searched layers' latent weights are not perturbed: their Q(W) is
        self.latent = [p for p in w_params if mode != "quantized" or id(p) not in mixed_weights]
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    def capture(self, on: bool) -> None:
        """Quantized mode: make the mixed layers keep the gradient of their quantized weight (pass 1)."""
        if self.mode == "quantized":
            for m in self.mixed.values():
                m.capture_mix_grad = on
                m.mix_grad = None

    @torch.no_grad()
    def apply(self, g_w: list[torch.Tensor | None], rho: float) -> dict[str, float]:
        """Perturb (pass 2 runs next); return ||g|| (the norm the radius divides by) and the flipped-code fraction."""
        grads = {id(p): g for p, g in zip(self.w_params, g_w, strict=True)}
        lat = [(p, grads[id(p)]) for p in self.latent if grads[id(p)] is not None]
        mix = [(m, m.mix_grad) for m in self.mixed.values() if self.mode == "quantized" and m.mix_grad is not None]
        scaled = [g * (p.abs() + ASAM_ETA) if self.mode == "asam" else g for p, g in lat] + [g for _, g in mix]
        norm = torch.norm(torch.stack([g.norm(2) for g in scaled]), 2).item() if scaled else 0.0
        scale = max(rho / (norm + 1e-12) - self.gamma, 0.0)  # the clamp keeps it an ascent step
        before = {n: m.weight.detach().clone() for n, m in self.mixed.items()}
        self._saved = [(p, p.detach().clone()) for p, _ in lat]
        for p, g in lat:
            p.add_(g * (p.abs() + ASAM_ETA) ** 2 if self.mode == "asam" else g, alpha=scale)
        for m, g in mix:
            m.mix_offset = g * scale
        return {"grad_norm": norm, "flipped_codes": self._flipped(before)}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back bit-exactly and drop the quantized-weight offsets."""
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []
        for m in self.mixed.values():
            m.mix_offset = None

    @torch.no_grad()
    def _flipped(self, before: dict[str, torch.Tensor]) -> float:
        changed, total = 0, 0
        for n, m in self.mixed.items():
            q = m.wq[int(m.alpha_w.argmax())]
            s = q._shaped(q.step(), m.weight)
            codes = torch.clamp(torch.round(before[n] / s), q.qmin, q.qmax)
            if self.mode == "quantized":
                off = m.mix_offset if m.mix_offset is not None else torch.zeros_like(codes)
                moved = torch.clamp(torch.round(codes + off / s), q.qmin, q.qmax)
            else:
                moved = torch.clamp(torch.round(m.weight / s), q.qmin, q.qmax)
            changed += int((moved != codes).sum())
            total += codes.numel()
        return changed / max(total, 1)
