"""One search iteration (method.md section 4) and the adaptive perturbation radius (section 5).

Written in the style of the SAM reference code: `first_step` perturbs W, `second_step` restores it;
`step` runs the algorithm's lines in order and names them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("erm", "sam", "sam-align", "asga")
RHO_RULES = ("rel", "literal", "fixed")
FIXED_RHO = ("sam", "sam-align")  # the ablation's baselines keep rho = epsilon; only asga adapts it


def rho_rule_for(objective: str, rule: str | None) -> str:
    """Return the radius rule an objective runs: `rule` (default "rel") for asga and erm, "fixed" for sam/sam-align."""
    return "fixed" if objective in FIXED_RHO else (rule or "rel")


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss inside a step (run.py turns it into TrainingDivergedError naming the step)."""


class Radius:
    """rho_t of section 5: 'rel' (default, scale-free), 'literal' (min(eps, ln(h + 1))) or 'fixed' (eps)."""

    def __init__(self, rule: str = "rel", epsilon: float = 0.1, rho_min: float = 0.01):
        if rule not in RHO_RULES:
            raise ValueError(f"rho rule {rule!r} not in {RHO_RULES}")
        self.rule, self.epsilon, self.rho_min = rule, epsilon, rho_min
        self.rho = epsilon  # rho_0 = epsilon
        self.s = 0.0  # s_t: gap per unit radius
        self.s_bar: float | None = None  # EMA, started at s_1
        self.s_max = 0.0  # max over past s_bar

    def current(self) -> float:
        """Return rho_t (computed from the statistics up to t - 1)."""
        return self.rho

    def update(self, h: float) -> None:
        """Take the surrogate gap h_t measured at rho_t; prepare rho_{t+1}."""
        if self.rule == "fixed":
            self.s = max(h, 0.0) / self.rho if self.rho > 0 else 0.0
            return
        if self.rule == "literal":
            # the paper's summary; a negative ln would turn ascent into descent, so it floors at 0
            self.s = max(h, 0.0) / self.rho if self.rho > 0 else 0.0
            self.rho = min(self.epsilon, max(0.0, math.log(max(h, 0.0) + 1.0)))
            return
        self.s = max(h, 0.0) / self.rho
        self.s_bar = self.s if self.s_bar is None else 0.9 * self.s_bar + 0.1 * self.s
        self.s_max = max(self.s_max, self.s_bar)
        ratio = self.s_bar / self.s_max if self.s_max > 0 else 1.0
        self.rho = min(max(self.epsilon * ratio, self.rho_min), self.epsilon)

    def state_dict(self) -> dict:
        """Return the resumable state."""
        return {"rho": self.rho, "s": self.s, "s_bar": self.s_bar, "s_max": self.s_max}

    def load_state_dict(self, d: dict) -> None:
        """Restore the state of state_dict()."""
        self.rho, self.s, self.s_bar, self.s_max = d["rho"], d["s"], d["s_bar"], d["s_max"]


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm (batch statistics) without touching running stats or num_batches_tracked."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:  # in train mode, track_running_stats=False normalises by the batch and updates nothing
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class ASGAStep:
    """The search step for one objective: erm, sam, sam-align or asga (method.md section 4)."""

    def __init__(self, net: nn.Module, w_params: list[nn.Parameter], a_params: list[nn.Parameter],
                 w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, objective: str = "asga",
                 gamma: float = 0.001, radius: Radius | None = None,
                 cost_fn: Callable[[], torch.Tensor] | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
        self.net, self.w_params, self.a_params = net, w_params, a_params
        self.w_opt, self.a_opt, self.objective = w_opt, a_opt, objective
        self.gamma = 0.0 if objective == "sam" else gamma  # SAM is SAGM with gamma = 0
        self.radius = radius or Radius()
        if self.radius.rule != rho_rule_for(objective, self.radius.rule):
            self.radius = Radius(rho_rule_for(objective, None), self.radius.epsilon, self.radius.rho_min)
        self.cost_fn = cost_fn
        self._saved: list[torch.Tensor] = []

    # ------------------------------------------------------------------ the algorithm's lines
    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list, list]:
        """Lines 1/4: return L and the gradients (g_W, g_alpha), taken out of .grad."""
        for p in (*self.w_params, *self.a_params):
            p.grad = None
        loss = F.cross_entropy(self.net(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()}")
        loss.backward()
        g_w = [p.grad for p in self.w_params]
        g_a = [p.grad for p in self.a_params]
        for p in (*self.w_params, *self.a_params):
            p.grad = None
        return loss.item(), g_w, g_a

    @torch.no_grad()
    def first_step(self, g_w: list, rho: float) -> float:
        """Lines 3-4: e = max(rho / ||g_W|| - gamma, 0) * g_W; keep W; W <- W + e. Return ||g_W||."""
        norm = torch.norm(torch.stack([g.norm(2) for g in g_w if g is not None]), 2).item()
        scale = max(rho / (norm + 1e-12) - self.gamma, 0.0)  # the clamp keeps it an ascent step
        self._saved = [p.detach().clone() for p in self.w_params]
        for p, g in zip(self.w_params, g_w, strict=False):
            if g is not None:
                p.add_(g, alpha=scale)
        return norm

    @torch.no_grad()
    def second_step(self) -> None:
        """Line 4 (end): W <- the copy, bit-exactly."""
        for p, w in zip(self.w_params, self._saved, strict=False):
            p.copy_(w)
        self._saved = []

    def perturbed_loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list, list]:
        """Line 4: L_adv and (g_W', g_alpha') at W + e, train mode, BN running stats untouched."""
        with bn_stats_frozen(self.net):
            return self.loss_and_grads(x, y)

    def cost_grad(self, lam: float) -> list[torch.Tensor | None]:
        """Return lambda * grad_alpha C(alpha) (None where lambda is 0 or there is no cost)."""
        if self.cost_fn is None or lam == 0.0:
            return [None] * len(self.a_params)
        grads = torch.autograd.grad(self.cost_fn(), self.a_params, allow_unused=True)
        return [None if g is None else lam * g for g in grads]

    def heldout_alpha_grads(self, x: torch.Tensor, y: torch.Tensor) -> list:
        """First-order bi-level switch: grad_alpha L on a held-out batch (W grads not formed)."""
        with bn_stats_frozen(self.net):
            loss = F.cross_entropy(self.net(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"held-out loss is {loss.item()}")
        return list(torch.autograd.grad(loss, self.a_params, allow_unused=True))

    # ------------------------------------------------------------------ one iteration
    def step(self, x: torch.Tensor, y: torch.Tensor, lam: float = 0.0,
             heldout: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Run one iteration, step both optimisers; return loss, loss_adv, gap, rho, sharpness, grad_norm."""
        g_held = self.heldout_alpha_grads(*heldout) if heldout is not None else None
        loss, g_w, g_a = self.loss_and_grads(x, y)                              # 1
        stats = {"loss": loss, "loss_adv": loss, "gap": 0.0, "rho": 0.0, "sharpness": 0.0, "grad_norm": 0.0}
        if self.objective == "erm":
            step_w, step_a = g_w, g_a
        else:
            rho = self.radius.current()                                         # 2
            stats["grad_norm"] = self.first_step(g_w, rho)                      # 3, 4: W <- W + e
            try:
                loss_adv, g_w2, g_a2 = self.perturbed_loss_and_grads(x, y)      # 4: pass 2
            finally:
                self.second_step()                                              # 4: restore W
            h = loss_adv - loss                                                 # 5
            self.radius.update(h)
            stats.update(loss_adv=loss_adv, gap=h, rho=rho, sharpness=self.radius.s)
            if self.objective == "sam":  # SAM: step with the perturbed gradients only
                step_w, step_a = g_w2, g_a2
            else:                                                               # 6, 7: aligned gradients
                step_w = [_avg(a, b) for a, b in zip(g_w, g_w2, strict=False)]
                step_a = [_avg(a, b) for a, b in zip(g_a, g_a2, strict=False)]
        if g_held is not None:  # bi-level switch: the logits learn from held-out data only
            step_a = g_held
        for p, g, gc in zip(self.a_params, step_a, self.cost_grad(lam), strict=False):        # 7: + lambda grad C
            p.grad = g if gc is None else (gc if g is None else g + gc)
        for p, g in zip(self.w_params, step_w, strict=False):
            p.grad = g
        self.w_opt.step()
        self.a_opt.step()
        return stats


def _avg(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Return 0.5 * (a + b), treating a missing gradient as zero."""
    if a is None or b is None:
        return None if a is None and b is None else 0.5 * (a if b is None else b)
    return a.add_(b).mul_(0.5)  # in place: a is a fresh gradient owned by this step
