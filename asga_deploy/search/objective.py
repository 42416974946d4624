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

from .perturb import Perturbation

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
                 cost_fn: Callable[[], torch.Tensor] | None = None, perturb: str = "latent"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
        self.net, self.w_params, self.a_params = net, w_params, a_params
        self.w_opt, self.a_opt, self.objective = w_opt, a_opt, objective
        self.gamma = 0.0 if objective == "sam" else gamma  # SAM is SAGM with gamma = 0
        self.radius = radius or Radius()
        if self.radius.rule != rho_rule_for(objective, self.radius.rule):
            self.radius = Radius(rho_rule_for(objective, None), self.radius.epsilon, self.radius.rho_min)
        self.cost_fn = cost_fn
        mixed = net.mixed_layers() if hasattr(net, "mixed_layers") else {}
        self.perturb = Perturbation(perturb, w_params, mixed, self.gamma)

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

    def first_step(self, g_w: list, rho: float) -> dict[str, float]:
        """Lines 3-4: e = max(rho / ||g|| - gamma, 0) * g on what --perturb names; keep W; W <- W + e."""
        return self.perturb.apply(g_w, rho)

    def second_step(self) -> None:
        """Line 4 (end): W <- the copy, bit-exactly."""
        self.perturb.restore()

    def perturbed_loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list, list]:
        """Line 4: L_adv and (g_W', g_alpha') at W + e, train mode, BN running stats untouched."""
        with bn_stats_frozen(self.net):
            return self.loss_and_grads(x, y)

    def cost_grad(self, lam: float, loss_grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Return lambda * grad_alpha C(alpha), scaled to the norm of the loss's logit gradient (None where
        lambda is 0 or there is no cost).

        The scaling makes lambda scale-free: lambda = 1 weighs the budget as much as the loss, on any model
        and at any temperature, so one set of controller gains serves every search (measured: an unscaled
        cost gradient needed lambda in the hundreds on some models and below 1 on others).
        """
        if self.cost_fn is None or lam == 0.0:
            return [None] * len(self.a_params)
        grads = torch.autograd.grad(self.cost_fn(), self.a_params, allow_unused=True)
        return scaled_like(loss_grads, grads, lam)

    def heldout_alpha_grads(self, x: torch.Tensor, y: torch.Tensor) -> list:
        """grad_alpha L on a held-out batch at the current (possibly perturbed) W; BN statistics untouched."""
        with bn_stats_frozen(self.net):
            loss = F.cross_entropy(self.net(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"held-out loss is {loss.item()}")
        return list(torch.autograd.grad(loss, self.a_params, allow_unused=True))

    # ------------------------------------------------------------------ one iteration
    def step(self, x: torch.Tensor, y: torch.Tensor, lam: float = 0.0,
             heldout: tuple[torch.Tensor, torch.Tensor] | None = None, update_alpha: bool = True
             ) -> dict[str, float]:
        """Run one iteration, step W (and alpha unless frozen); return loss, loss_adv, gap, rho, sharpness,
        grad_norm and the fraction of weight codes the perturbation flipped.

        With a held-out batch the logits take the same objective's gradient measured on it: at W (erm),
        at W + e (sam), or the mean of both (sam-align, asga): the sharpness term reaches the decisions.
        """
        self.perturb.capture(True)
        loss, g_w, g_a = self.loss_and_grads(x, y)                              # 1
        self.perturb.capture(False)
        if heldout is not None:
            g_a = self.heldout_alpha_grads(*heldout)
        stats = {"loss": loss, "loss_adv": loss, "gap": 0.0, "rho": 0.0, "sharpness": 0.0, "grad_norm": 0.0,
                 "flipped_codes": 0.0}
        if self.objective == "erm":
            step_w, step_a = g_w, g_a
        else:
            rho = self.radius.current()                                         # 2
            stats.update(self.first_step(g_w, rho))                             # 3, 4: W <- W + e
            try:
                loss_adv, g_w2, g_a2 = self.perturbed_loss_and_grads(x, y)      # 4: pass 2
                if heldout is not None:
                    g_a2 = self.heldout_alpha_grads(*heldout)
            finally:
                self.second_step()                                              # 4: restore W
            h = loss_adv - loss                                                 # 5
            self.radius.update(h)
            stats.update(loss_adv=loss_adv, gap=h, rho=rho, sharpness=self.radius.s)
            if self.objective == "sam":  # SAM: step with the perturbed gradients only
                step_w, step_a = g_w2, g_a2
            else:                                                               # 6, 7: aligned gradients
                step_w = [_avg(a, b) for a, b in zip(g_w, g_w2, strict=True)]
                step_a = [_avg(a, b) for a, b in zip(g_a, g_a2, strict=True)]
        for p, g in zip(self.w_params, step_w, strict=True):
            p.grad = g
        self.w_opt.step()
        if update_alpha:
            for p, g, gc in zip(self.a_params, step_a, self.cost_grad(lam, step_a), strict=True):  # 7: + lambda grad C
                p.grad = g if gc is None else (gc if g is None else g + gc)
            self.a_opt.step()
        for p in self.a_params:
            p.grad = None
        return stats


def _norm(gs: list[torch.Tensor | None]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None) or torch.zeros(())))


def scaled_like(ref: list[torch.Tensor | None], grads: list[torch.Tensor | None], lam: float
                ) -> list[torch.Tensor | None]:
    """Return lam * grads rescaled to the global norm of ref (unscaled when either norm is 0)."""
    n_ref, n = _norm(ref), _norm(grads)
    scale = lam * (n_ref / n if n_ref > 0 and n > 0 else 1.0)
    return [None if g is None else g * scale for g in grads]


def _avg(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Return 0.5 * (a + b), treating a missing gradient as zero."""
    if a is None or b is None:
        return None if a is None and b is None else 0.5 * (a if b is None else b)
    return a.add_(b).mul_(0.5)  # in place: a is a fresh gradient owned by this step
