"""The search side of a budget (method.md section 6): the temperature schedule, the lambda controller,
the EXACT extraction of the deployed policy from the logits, and the diagnostics of the decisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import Budget
from .supernet import Supernet


def temperature(step: int, total: int, tau_start: float = 1.0, tau_end: float = 0.01) -> float:
    """Return tau at a step: geometric from tau_start (step 0) to tau_end (last step)."""
    frac = step / max(total - 1, 1)
    return tau_start * (tau_end / tau_start) ** min(max(frac, 0.0), 1.0)


@dataclass
class Controller:
    """lambda_t: fixed (soft budget, target None) or the hard-budget controller on e_t = C/T_t - 1."""

    target: float | None  # the normalised cost to reach (1.0: the tightest limit's bound); None: soft budget
    lam: float = 0.0
    k_p: float = 50.0
    eta: float = 0.5
    anneal_frac: float = 0.25
    freeze_frac: float = 0.15
    start: float | None = None  # C(alpha_0), where the target annealing starts
    error: float = 0.0
    target_t: float = 0.0

    def __call__(self, step: int, total: int, cost: float) -> float:
        """Return lambda_used for this step and update the integral term."""
        if self.target is None:
            return self.lam
        if self.start is None:
            self.start = cost
        frac = step / max(total, 1)
        # anneal the target from C(alpha_0) to T: a jump to T at once would slam the logits to 2 bits
        a = min(frac / self.anneal_frac, 1.0) if self.anneal_frac > 0 else 1.0
        self.target_t = self.start + (self.target - self.start) * a
        self.error = cost / self.target_t - 1.0
        if frac >= 1.0 - self.freeze_frac:  # frozen: at a low temperature the argmax would chatter
            return self.lam
        used = self.lam + self.k_p * self.error
        self.lam += self.eta * self.error
        return used

    def state_dict(self) -> dict:
        """Return the resumable state."""
        return {"lam": self.lam, "start": self.start, "error": self.error, "target_t": self.target_t}

    def load_state_dict(self, d: dict) -> None:
        """Restore the state of state_dict()."""
        self.lam, self.start, self.error, self.target_t = d["lam"], d["start"], d["error"], d["target_t"]


def log_probs(net: Supernet) -> dict[str, list[float]]:
    """Return per searched layer the log-probability of each of its options (net.options() order)."""
    out = {}
    for n, m in net.mixed_layers().items():
        with torch.no_grad():
            lw = torch.log_softmax(m.alpha_w.double() / m.tau, 0).tolist()
            la = torch.log_softmax(m.alpha_a.double() / m.tau, 0).tolist()
        out[n] = [lw[i] + la[j] for i in range(len(m.w_bits)) for j in range(len(m.a_bits))]
    return out


def extract(net: Supernet, budget: Budget) -> tuple[dict[str, tuple[int, int]], dict]:
    """Return the choice maximising sum log p that meets the budget exactly, and facts about the solve."""
    values = log_probs(net)
    choice, info = budget.solve(net.table, net.options(), values)
    return choice, {**info, "log_prob": info["value"]}


def max_prob_fraction(net: Supernet, threshold: float = 0.6) -> float:
    """Return the fraction of choices (2 per layer) whose largest softmax probability is under threshold."""
    low, n = 0, 0
    with torch.no_grad():
        for m in net.mixed_layers().values():
            for p in m.probs():
                low += int(p.max().item() < threshold)
                n += 1
    return low / max(n, 1)


def choice_distance(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> int:
    """Return how many single choices (weight or activation of a layer) differ between two choices."""
    return sum(int(a[n][0] != b[n][0]) + int(a[n][1] != b[n][1]) for n in a)
