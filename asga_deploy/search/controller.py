"""The search side of a budget (method.md section 6): the temperature schedule, the lambda controller,
the EXACT extraction of the deployed policy from the logits, and the diagnostics of the decisions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..budget import Budget
from ..cost import FLOAT
from .supernet import Supernet


def temperature(step: int, total: int, tau_start: float = 1.0, tau_end: float = 0.01) -> float:
    """Return tau at a step: geometric from tau_start (step 0) to tau_end (last step)."""
    frac = step / max(total - 1, 1)
    return tau_start * (tau_end / tau_start) ** min(max(frac, 0.0), 1.0)


@dataclass
class Controller:
    """lambda_t of the hard budget (method.md section 6, revision 3), on e_t = C(alpha) / T - 1.

    lambda_used = lambda + k_p e_t;  lambda <- clip(lambda + eta e_t, -lam_max, lam_max). No target ramp:
    the logits start at the budget (`start_at_budget`); the recipe freezes the LOGITS for the last steps.
    Inside the band [(1 - band) T, T] the error is 0: discrete policies cannot sit exactly on T, and a
    point target makes the controller flip marginal layers back and forth until the end (measured).
    An upper-bound-only budget (`upper_only`: latency, Budget.upper_only) is a plain constraint: the error
    is signed, lambda is projected onto [0, lam_max] and lambda_used is never below `floor` (>= 0): the cost is
    pushed down hard while it is over T, and below it only by the floor, a tie-breaker towards the cheaper
    choice where the loss is indifferent.
    A soft budget (target None) returns its fixed lambda.
    """

    target: float | None
    lam: float = 0.0
    k_p: float = 2.0
    eta: float = 0.1
    lam_max: float = 10.0
    band: float = 0.0
    error: float = 0.0
    upper_only: bool = False
    floor: float = 0.0  # upper-bound-only: the least lambda_used (a tie-breaker towards cheaper choices)

    def __call__(self, cost: float) -> float:
        """Return lambda_used for a step at expected cost `cost` and update the (clamped) integral."""
        if self.target is None:
            return self.lam
        r = cost / self.target
        lo = 1.0 - self.band
        if self.upper_only:
            self.error = r - 1.0
            used = max(self.lam + self.k_p * self.error, self.floor)
            self.lam = min(max(self.lam + self.eta * self.error, 0.0), self.lam_max)
            return used
        self.error = r - 1.0 if r > 1.0 else (r - lo if r < lo else 0.0)
        used = self.lam + self.k_p * self.error
        self.lam = min(max(self.lam + self.eta * self.error, -self.lam_max), self.lam_max)
        return used

    def state_dict(self) -> dict:
        """Return the resumable state."""
        return {"lam": self.lam, "error": self.error}

    def load_state_dict(self, d: dict) -> None:
        """Restore the state of state_dict()."""
        self.lam, self.error = d["lam"], d["error"]


def cost_shape(net: Supernet, metric: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Return per searched layer a prior's shape in COST space: (weight, input, float) offsets whose sum is each
    choice's cost under `metric`, normalised by the layer's dearest quantized choice.

    The bits prior (-bits / 8) assumes fewer bits are cheaper; on a latency table they are not (sub-8-bit
    activations requantize, weight bits below 8 change nothing, float may be the FASTEST choice), and a bits
    prior strong enough to start a latency search at its budget pinned every layer to 2 bits, slower than the
    start (measured: resnet20-w0.5, batch 32, 0.7xw8a8: the expected latency stayed 1.42x the budget for the
    whole search). The (w, a) cost grid S is split additively (row and column means; exact for latency, where
    the kernel depends on the activation bits only); float is its cost over the grid's mean.
    """
    out = {}
    with torch.no_grad():
        for n, m in net.mixed_layers().items():
            if metric == "latency":
                grid, fl = (v.double().cpu() for v in net.latency_grid(n, m))
            else:
                grid = torch.tensor([[float(net.table.unit_cost(metric, n, w, a)) for a in m.a_bits]
                                     for w in m.w_bits], dtype=torch.float64)
                fl = torch.tensor(float(net.table.unit_cost(metric, n, *FLOAT)) if m.float_choice else 0.0,
                                  dtype=torch.float64)
            scale = float(grid.max()) or 1.0
            grid, fl, mean = grid / scale, fl / scale, (grid / scale).mean()
            dev = m.prior_w.device
            out[n] = ((grid.mean(1) - mean).float().to(dev), (grid.mean(0) - mean).float().to(dev),
                      torch.tensor([0.0, float(fl - mean)], device=dev))
    return out


def _set_prior(net: Supernet, shapes: list[dict], betas: list[float]) -> None:
    """Set every layer's prior to -sum_k betas[k] * shapes[k] (cost_shape)."""
    for n, m in net.mixed_layers().items():
        m.prior_w.copy_(-sum(b * s[n][0] for b, s in zip(betas, shapes, strict=True)))
        m.prior_a.copy_(-sum(b * s[n][1] for b, s in zip(betas, shapes, strict=True)))
        if m.float_choice:
            m.prior_f.copy_(-sum(b * s[n][2] for b, s in zip(betas, shapes, strict=True)))


@torch.no_grad()
def start_under_limits(net: Supernet, uses: Callable[[], torch.Tensor], shapes: list[dict], iters: int = 400,
                       step: float = 2.0, beta_max: float = 40.0) -> list[float]:
    """Start an upper-bound-only budget (latency, alone or with other limits) under all of its limits: the prior
    is -sum_k beta_k x (limit k's cost_shape), the betas found by projected dual ascent on the expected costs,
    beta_k <- clip(beta_k + step x (use_k - 1), 0, beta_max), from 0 (a start already under every limit is left
    alone). One bisected beta cannot serve two metrics that pull apart (a float layer is fast and large).
    Return the betas; where no betas reach every bound, those of the smallest largest use seen.
    """
    betas = [0.0] * len(shapes)
    best, best_use = list(betas), float("inf")
    for _ in range(iters):
        _set_prior(net, shapes, betas)
        u = [float(x) for x in uses()]
        if max(u) < best_use:
            best, best_use = list(betas), max(u)
        if max(u) <= 1.0:
            return betas
        betas = [min(max(b + step * (x - 1.0), 0.0), beta_max) for b, x in zip(betas, u, strict=True)]
    _set_prior(net, shapes, best)
    return best


@torch.no_grad()
def start_at_budget(net: Supernet, use: Callable[[], torch.Tensor], lo: float = -40.0, hi: float = 40.0,
                    iters: int = 60) -> float:
    """Set every layer's cost prior to -beta * bits / 8, with beta found by bisection so that use() = 1 (the
    expected cost of the tightest limit at its bound) at the current temperature; return beta. (Upper-bound-only
    budgets start with start_under_limits.)

    The prior is added to alpha / tau, not to alpha: as a bias on the raw logits it would grow 100-fold as
    the temperature falls and pin every layer to its cheapest bits (measured on resnet20: the argmax ended
    at 0.77 of the budget and the extraction moved 8-9 choices).
    """
    def value(beta: float) -> float:
        for m in net.mixed_layers().values():
            m.prior_w.copy_(-beta * m.w_bits_t / 8)
            m.prior_a.copy_(-beta * m.a_bits_t / 8)
            if m.float_choice:  # float counts as 32 bits
                m.prior_f.copy_(torch.tensor([0.0, -beta * 32 / 8]))
        return float(use()) - 1.0

    if value(lo) <= 0:  # the budget is above even the dearest expectation: push up as far as allowed
        return lo
    if value(hi) >= 0:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if value(mid) > 0:
            lo = mid
        else:
            hi = mid
    value(hi)  # leave the prior at the side that meets the budget
    return hi


def log_probs(net: Supernet) -> dict[str, list[float]]:
    """Return per searched layer the log-probability of each of its options (net.options() order)."""
    out = {}
    for n, m in net.mixed_layers().items():
        with torch.no_grad():
            zw, za = m.scores()
            lw = torch.log_softmax(zw.double(), 0).tolist()
            la = torch.log_softmax(za.double(), 0).tolist()
            zf = m.float_score()
            lq, lf = torch.log_softmax(zf.double(), 0).tolist() if zf is not None else (0.0, None)
        out[n] = [lq + lw[i] + la[j] for i in range(len(m.w_bits)) for j in range(len(m.a_bits))]
        if lf is not None:
            out[n].append(lf)
    return out


def extract(net: Supernet, budget: Budget) -> tuple[dict[str, tuple[int, int]], dict]:
    """Return the choice maximising sum log p that meets the budget exactly, and facts about the solve."""
    values = log_probs(net)
    choice, info = budget.solve(net.table, net.options(), values)
    return choice, {**info, "log_prob": info["value"]}


def logit_gaps(net: Supernet) -> list[float]:
    """Return, for every choice (weights and input of each layer), the gap between its two largest decision
    variables (alpha / tau + prior, at the layers' current temperature)."""
    gaps = []
    with torch.no_grad():
        for m in net.mixed_layers().values():
            for z in [*m.scores(), *([m.float_score()] if m.float_choice else [])]:
                top = torch.topk(z, 2).values if z.numel() > 1 else torch.tensor([1e9, 0.0])
                gaps.append(float(top[0] - top[1]))
    return gaps


def logit_moves(net: Supernet, start: dict[str, list[list[float]]]) -> list[float]:
    """Return, for every choice, the largest change of its logits since `start` ({layer: [alpha_w, alpha_a]})."""
    moves = []
    with torch.no_grad():
        for n, m in net.mixed_layers().items():
            for alpha, s0 in zip(m.arch_parameters(), start[n], strict=True):
                moves.append(float((alpha - torch.tensor(s0, dtype=alpha.dtype)).abs().max()))
    return moves


def choice_distance(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> int:
    """Return how many single choices (weight or activation of a layer) differ between two choices."""
    return sum(int(a[n][0] != b[n][0]) + int(a[n][1] != b[n][1]) for n in a)
