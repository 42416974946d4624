"""Budgets (method.md section 6): soft lambda or a hard target with a controller, the temperature
schedule, and the EXACT extraction of the deployed policy (a multiple-choice knapsack, no repair)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BudgetError
from .supernet import Supernet

MAX_BINS = 200_000  # exact DP when the cost grid (gcd of option costs) is at most this fine


def temperature(step: int, total: int, tau_start: float = 1.0, tau_end: float = 0.01) -> float:
    """Return tau at a step: geometric from tau_start (step 0) to tau_end (last step)."""
    frac = step / max(total - 1, 1)
    return tau_start * (tau_end / tau_start) ** min(max(frac, 0.0), 1.0)


@dataclass
class Controller:
    """lambda_t: fixed (soft budget, target None) or the hard-budget controller on e_t = C/T_t - 1."""

    target: float | None  # ratio of the W8A8 reference; None: soft budget
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


def layer_options(net: Supernet, metric: str) -> tuple[list[list[tuple[int, int]]], list[np.ndarray], list[np.ndarray]]:
    """Return per searched layer: the (w, a) options, their integer costs and their log-probabilities."""
    choices, costs, values = [], [], []
    for n, m in net.mixed_layers().items():
        with torch.no_grad():
            lw = torch.log_softmax(m.alpha_w.double() / m.tau, 0).tolist()
            la = torch.log_softmax(m.alpha_a.double() / m.tau, 0).tolist()
        c = net.costs[n]
        opts = [(w, a) for w in m.w_bits for a in m.a_bits]
        choices.append(opts)
        costs.append(np.array([c.macs * w * a if metric == "bitops" else c.params * w for w, a in opts],
                              dtype=np.int64))
        values.append(np.array([lw[i] + la[j] for i in range(len(m.w_bits)) for j in range(len(m.a_bits))]))
    return choices, costs, values


def reference(net: Supernet, metric: str) -> int:
    """Return the W8A8 reference of a metric in the integer units of layer_options."""
    return net.ref_bitops if metric == "bitops" else net.ref_weight_bits


def feasible_range(net: Supernet, metric: str) -> tuple[float, float]:
    """Return the (cheapest, most expensive) policy cost as ratios of the W8A8 reference."""
    _, costs, _ = layer_options(net, metric)
    ref = reference(net, metric)
    return sum(int(c.min()) for c in costs) / ref, sum(int(c.max()) for c in costs) / ref


def check_budget(net: Supernet, metric: str, ratio: float, tol: float, what: str) -> None:
    """Raise BudgetError when no policy of the candidates can land in [(1 - tol) T, T]."""
    lo, hi = feasible_range(net, metric)
    if ratio < lo or (1.0 - tol) * ratio > hi:
        side = "below the cheapest" if ratio < lo else "above the most expensive"
        raise BudgetError(f"budget {what} = {ratio:.4g} of W8A8 is {side} policy of these candidates; "
                          f"feasible range {lo:.4g}..{hi / (1.0 - tol):.4g} of W8A8 (tolerance {tol})")
    _, costs, _ = layer_options(net, metric)
    ref = reference(net, metric)
    w_lo, w_hi = math.ceil((1.0 - tol) * ratio * ref), math.floor(ratio * ref)
    if mck_solve(costs, [np.zeros(len(c)) for c in costs], w_lo, w_hi) is None:
        # discrete costs can step over the whole window: name the nearest policies on both sides
        below = mck_solve(costs, [c.astype(float) for c in costs], 0, w_lo - 1)
        above = mck_solve(costs, [-c.astype(float) for c in costs], w_hi + 1, sum(int(c.max()) for c in costs))
        near = [f"{x[1] / ref:.4g}" for x in (below, above) if x is not None]
        raise BudgetError(f"budget {what}: no policy of these candidates costs {(1 - tol) * ratio:.4g}..{ratio:.4g} "
                          f"of W8A8 (nearest: {' and '.join(near)}); change the budget or widen --tol")


def mck_solve(costs: list[np.ndarray], values: list[np.ndarray], lo: int, hi: int
              ) -> tuple[list[int], int, bool] | None:
    """Return (option per group, total cost, exact) maximising sum of values with lo <= cost <= hi, or None.

    Dynamic programming over the cost axis. Grid unit = gcd of all option costs when that gives at most
    MAX_BINS cells (then the optimum is exact); otherwise a coarser grid where each cell keeps its best
    state with its EXACT cost, so the answer is always exactly feasible (optimal up to the grid).
    """
    unit = int(np.gcd.reduce(np.concatenate(costs))) or 1
    exact = hi // unit <= MAX_BINS
    if not exact:
        unit = -(-hi // MAX_BINS)
    nb = hi // unit + 1
    best = np.full(nb, -np.inf)
    total = np.zeros(nb, dtype=np.int64)
    best[0] = 0.0
    back = []
    for c, v in zip(costs, values, strict=False):
        live = np.nonzero(best > -np.inf)[0]
        cc = (total[live][:, None] + c[None, :]).ravel()
        vv = (best[live][:, None] + v[None, :]).ravel()
        prev = np.repeat(live, len(c))
        opt = np.tile(np.arange(len(c)), len(live))
        ok = cc <= hi
        cc, vv, prev, opt = cc[ok], vv[ok], prev[ok], opt[ok]
        cell = cc // unit
        order = np.lexsort((-vv, cell))  # per cell, the best value first
        cell, first = np.unique(cell[order], return_index=True)
        pick = order[first]
        best = np.full(nb, -np.inf)
        total = np.zeros(nb, dtype=np.int64)
        best[cell], total[cell] = vv[pick], cc[pick]
        prev_of, opt_of = np.full(nb, -1), np.full(nb, -1)
        prev_of[cell], opt_of[cell] = prev[pick], opt[pick]
        back.append((prev_of, opt_of))
    ok = (best > -np.inf) & (total >= lo) & (total <= hi)
    if not ok.any():
        return None
    cell = int(np.argmax(np.where(ok, best, -np.inf)))
    cost = int(total[cell])
    picks = []
    for prev_of, opt_of in reversed(back):
        picks.append(int(opt_of[cell]))
        cell = int(prev_of[cell])
    return picks[::-1], cost, exact


def extract(net: Supernet, metric: str, ratio: float, tol: float = 0.03) -> tuple[dict[str, tuple[int, int]], dict]:
    """Return the choice maximising sum log p with (1 - tol) T <= cost <= T, and facts about the solve."""
    choices, costs, values = layer_options(net, metric)
    ref = reference(net, metric)
    hi = math.floor(ratio * ref)
    lo = math.ceil((1.0 - tol) * ratio * ref)
    sol = mck_solve(costs, values, lo, hi)
    if sol is None:
        flo, fhi = feasible_range(net, metric)
        raise BudgetError(f"no policy of these candidates costs {(1 - tol) * ratio:.4g}..{ratio:.4g} of W8A8 "
                          f"{metric} (feasible {flo:.4g}..{fhi:.4g}); widen --tol or change the budget")
    picks, cost, exact = sol
    names = list(net.mixed_layers())
    choice = {n: choices[i][k] for i, (n, k) in enumerate(zip(names, picks, strict=False))}
    logp = float(sum(values[i][k] for i, k in enumerate(picks)))
    return choice, {"cost_ratio": cost / ref, "log_prob": logp, "exact_dp": exact}


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
