"""Budgets: what a policy may cost (BitOPs, weight size), one limit or several at once, and the exact
solvers that pick the best per-layer choices within them (method.md sections 6 and 9).

A `Budget` is a set of `Limit`s and a tolerance. A policy meets it when every limit's cost is at most
its bound T and at least one limit is used to within the tolerance, (1 - tol) T <= cost: the window
`Budget.window` is the one place that defines it. A latency limit is an upper bound only (its window
starts at 0): being faster than asked is never a fault, and on backends where some cheap-looking choices
are SLOWER (sub-8-bit activations on ONNX Runtime) a "use the budget" rule would buy slower, less
accurate layers (measured: benchmarks/results/latency_front-b1-window-rule.md). A budget with a latency
limit is therefore met by every policy under all of its bounds: the accuracy decides below them. One limit
is solved by dynamic programming over the cost axis (a multiple-choice knapsack); several by an integer
program (scipy.optimize.milp).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .cost import FLOAT, CostTable, choice_key
from .errors import BudgetError
from .targets import Target

MAX_BINS = 200_000  # exact DP when the cost grid (gcd of option costs) is at most this fine
_UNITS = {"bitops": 1.0, "size": 8e6, "latency": 1e6}  # absolute limits: BitOPs, MB (in bits), ms (in ns)
_OF = {"w8a8": (8, 8), "float": FLOAT}


@dataclass(frozen=True)
class Limit:
    """One bound on a metric ("bitops" | "size" | "latency").

    relative: a ratio of the model at `of` (W8A8 or float; BitOPs and size ratios count the searched layers
    at W8A8, as EdMIPS); absolute: BitOPs, megabytes, milliseconds. `whole`: the bound is on the whole
    model (the fixed layers and, for latency, the rest of the graph included), as a deployment sees it.
    """

    metric: str
    value: float
    relative: bool = True
    flag: str = ""  # how the user wrote it, for messages
    of: str = "w8a8"
    whole: bool = False

    def target(self, table: CostTable) -> float:
        """Return T in the metric's integer unit, for what the limit covers (the whole model or the counted layers)."""
        if not self.relative:
            return self.value * _UNITS[self.metric]
        return self.value * (self.whole_reference(table) if self.whole else table.reference(self.metric))

    def whole_reference(self, table: CostTable) -> float:
        """Return the whole model's cost at `of` (W8A8 or float), the fixed layers and rest included."""
        return table.constant(self.metric) + table.total(self.metric, dict.fromkeys(table.counted, _OF[self.of]))

    def bound(self, table: CostTable) -> int:
        """Return the upper bound on the counted layers' cost, in the metric's integer unit."""
        return math.floor(self.target(table) - (table.constant(self.metric) if self.whole else 0) + 1e-9)

    def ratio(self, table: CostTable) -> float:
        """Return the counted layers' bound as a ratio of their W8A8 cost."""
        ref = table.reference(self.metric)
        return self.bound(table) / ref if ref else 0.0

    def show(self, counted: float, table: CostTable) -> str:
        """Return a cost of the counted layers as the user reads this limit: a ratio of their W8A8 cost, or for a
        whole-model limit the whole model's milliseconds / megabytes and its ratio to the reference model."""
        if not self.whole:
            return f"{counted / table.reference(self.metric):.4g} of W8A8"
        whole = counted + table.constant(self.metric)
        unit = "ms" if self.metric == "latency" else "MB"
        return f"{whole / _UNITS[self.metric]:.4g} {unit}" + (
            f" ({whole / self.whole_reference(table):.3g}x{self.of})" if self.relative else "")

    def tag(self) -> str:
        """Return the short name used in artifact names (r12.5 = 12.5% of W8A8 BitOPs)."""
        if self.metric == "bitops":
            return f"r{100 * self.value:g}" if self.relative else f"{self.value / 1e9:g}gbops"
        if self.metric == "latency":
            return f"{self.value:g}x{self.of}" if self.relative else f"{self.value:g}ms"
        return (f"{100 * self.value:g}pct-size" if self.relative else f"{self.value:g}mb") + ("-total" if self.whole
                                                                                             else "")

    @property
    def upper_only(self) -> bool:
        """Return whether the limit is an upper bound only (latency), with no window below it."""
        return self.metric == "latency"

    def describe(self) -> str:
        """Return the limit as the user gave it."""
        return self.flag or f"{self.metric} {'ratio ' if self.relative else ''}{self.value:g}"


def parse_latency(text: str, flag: str = "--budget-latency") -> Limit:
    """Return the latency limit of "1.2" / "1.2ms" (milliseconds) or "0.8xw8a8" / "0.5xfloat" (a ratio of
    the whole model's latency at W8A8 or in float)."""
    t = str(text).strip().lower().replace(" ", "").replace("x-", "x")
    of = next((k for k in _OF if t.endswith("x" + k)), None)
    num = t[: -len("x" + of)] if of else t.removesuffix("ms")
    try:
        value = float(num)
    except ValueError:
        raise BudgetError(f"{flag} {text!r}: give milliseconds (1.5 or 1.5ms) or a ratio of the W8A8 or float "
                          "model (0.8xw8a8, 0.5xfloat)") from None
    _positive(value, flag)
    return Limit("latency", value, of is not None, f"{flag} {text}", of or "w8a8", whole=True)


def _positive(value: float, flag: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise BudgetError(f"{flag} {value}: must be a positive finite number")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """Limits a policy must meet, and the tolerance of the window below the binding one."""

    limits: tuple[Limit, ...]
    tol: float = 0.03

    def __post_init__(self) -> None:
        if not self.limits:
            raise BudgetError("a budget needs at least one limit")
        if not (math.isfinite(self.tol) and 0.0 < self.tol < 1.0):
            raise BudgetError(f"--tol {self.tol}: must be in (0, 1)")

    @classmethod
    def from_options(cls, bitops: float | None = None, gbitops: float | None = None,
                     weight_mb: float | None = None, tol: float = 0.03, size_mb: float | None = None,
                     latency: str | None = None) -> Budget | None:
        """Return the budget of the CLI options (None when no limit is given); check every value."""
        limits = []
        if bitops is not None:
            _positive(bitops, "--budget-bitops")
            if bitops > 1:
                raise BudgetError(f"--budget-bitops {bitops:g} is a ratio of W8A8 BitOPs in (0, 1]; for absolute "
                                  f"BitOPs write --budget-gbitops {bitops / 1e9:g}")
            limits.append(Limit("bitops", bitops, True, f"--budget-bitops {bitops:g}"))
        if gbitops is not None:
            limits.append(Limit("bitops", _positive(gbitops, "--budget-gbitops") * 1e9, False,
                                f"--budget-gbitops {gbitops:g}"))
        if weight_mb is not None:
            limits.append(Limit("size", _positive(weight_mb, "--budget-weight-mb"), False,
                                f"--budget-weight-mb {weight_mb:g}"))
        if size_mb is not None:  # the whole model's weights, as the file that ships holds them
            limits.append(Limit("size", _positive(size_mb, "--budget-size-mb"), False,
                                f"--budget-size-mb {size_mb:g}", whole=True))
        if latency is not None:
            limits.append(parse_latency(latency))
        return cls(tuple(limits), tol) if limits else None

    @property
    def metrics(self) -> tuple[str, ...]:
        """Return the metrics the budget limits (each once)."""
        return tuple(dict.fromkeys(lim.metric for lim in self.limits))

    @property
    def upper_only(self) -> bool:
        """Return whether every policy under all bounds meets the budget (it has an upper-bound-only limit)."""
        return any(lim.upper_only for lim in self.limits)

    def window(self, limit: Limit, table: CostTable) -> tuple[int, int]:
        """Return (lo, hi): the counted layers' integer costs that put the limit's cost inside [(1 - tol) T, T]
        (inside [0, T] for an upper-bound-only limit)."""
        if limit.upper_only:
            return 0, limit.bound(table)
        const = table.constant(limit.metric) if limit.whole else 0
        return math.ceil((1.0 - self.tol) * limit.target(table) - const - 1e-9), limit.bound(table)

    def costs(self, table: CostTable, bits: Mapping[str, tuple[int, int]]) -> list[int]:
        """Return the cost of a choice under each limit's metric."""
        return [table.total(lim.metric, bits) for lim in self.limits]

    def meets(self, table: CostTable, bits: Mapping[str, tuple[int, int]]) -> bool:
        """Return whether a choice is at most every bound and inside the window of at least one limit."""
        windows = [self.window(lim, table) for lim in self.limits]
        costs = self.costs(table, bits)
        return all(c <= hi for c, (_, hi) in zip(costs, windows, strict=True)) and any(
            lo <= c for c, (lo, _) in zip(costs, windows, strict=True))

    def tag(self) -> str:
        """Return the short name of the budget in artifact names."""
        return "-".join(lim.tag() for lim in self.limits)

    def describe(self) -> str:
        """Return the budget as the user gave it."""
        return ", ".join(lim.describe() for lim in self.limits) + (" (upper bounds)" if self.upper_only
                                                                   else f" (tolerance {self.tol:g})")

    def uniform_matches(self, table: CostTable, target: Target) -> list[tuple[int, int]]:
        """Return the uniform (w, a) choices of the target that meet the budget (signed inputs at their own bits)."""
        out = []
        for w in target.weight_bits:
            for a in target.act_bits(False):
                bits = {n: target.clamp_bits(w, a, table.layers[n].input_signed) for n in table.counted}
                if self.meets(table, bits):
                    out.append((w, a))
        return out

    def solve(self, table: CostTable, options: Mapping[str, Sequence[tuple[int, int]]],
              values: Mapping[str, Sequence[float]]) -> tuple[dict[str, tuple[int, int]], dict]:
        """Return the choice maximising the sum of `values` that meets the budget, and facts about the solve.

        `options[layer]` lists the (w, a) choices of each counted layer, `values[layer]` their values.
        Raise BudgetError (naming the nearest feasible costs) when no choice meets the budget.
        """
        names = list(options)
        costs = [[np.array([table.unit_cost(lim.metric, n, w, a) for w, a in options[n]], dtype=np.int64)
                  for n in names] for lim in self.limits]
        vals = [np.asarray(values[n], dtype=np.float64) for n in names]
        windows = [self.window(lim, table) for lim in self.limits]
        pairs = self._pair_terms(table, options)
        if pairs:  # neighbouring layers' choices priced together: the integer program with their products
            picks = milp_solve(costs, vals, windows, pairs)
            method = "milp"
        elif len(self.limits) == 1:
            sol = mck_solve(costs[0], vals, *windows[0])
            method = "dp" if sol is None or sol[2] else "dp-coarse"
            picks = None if sol is None else sol[0]
        else:
            picks = milp_solve(costs, vals, windows)
            method = "milp"
        if picks is None:
            raise BudgetError(self._infeasible(table, costs, windows, bool(pairs)))
        choice = {n: tuple(options[n][k]) for n, k in zip(names, picks, strict=True)}
        got = self.costs(table, choice)
        return choice, {"method": method, "exact": method != "dp-coarse",
                        "value": float(sum(v[k] for v, k in zip(vals, picks, strict=True))),
                        "cost_ratios": {lim.describe(): g / table.reference(lim.metric)
                                        for lim, g in zip(self.limits, got, strict=True)}}

    def _pair_terms(self, table: CostTable, options: Mapping[str, Sequence[tuple[int, int]]]) -> list[tuple]:
        """Return the table's pair terms that some options of two counted layers meet, as milp_solve takes them:
        (group a, its options' mask, group b, mask, [cost under each limit])."""
        if "latency" not in self.metrics:
            return []
        index = {n: g for g, n in enumerate(options)}
        out = []
        for p in table.counted_pairs():
            if p.first not in index or p.second not in index:
                continue
            ma = np.array([choice_key(*c) in p.first_choices for c in options[p.first]])
            mb = np.array([choice_key(*c) in p.second_choices for c in options[p.second]])
            if ma.any() and mb.any() and p.ns():
                out.append((index[p.first], ma, index[p.second], mb,
                            [p.ns() if lim.metric == "latency" else 0 for lim in self.limits]))
        return out

    def sample(self, table: CostTable, options: Mapping[str, Sequence[tuple[int, int]]], n: int, seed: int
               ) -> list[dict[str, tuple[int, int]]]:
        """Return n choices drawn uniformly at random from those that meet the budget (seeded).

        Exact for one limit on an exact cost grid (counting the completions of every partial cost by
        dynamic programming); on a finer grid the costs are rounded to at most MAX_BINS cells (nearly
        uniform); with several limits uniform by rejection from the first limit's sampler. Every draw is
        checked exactly against the whole budget.
        """
        rng = np.random.default_rng(seed)
        names = list(options)
        lim = self.limits[0]
        costs = [np.array([table.unit_cost(lim.metric, m, w, a) for w, a in options[m]], dtype=np.int64)
                 for m in names]
        lo, hi = self.window(lim, table)
        if len(self.limits) > 1:  # the "at least one inside its window" rule: sample below every bound
            lo = 0
        unit = int(np.gcd.reduce(np.concatenate(costs))) or 1
        if hi // unit > MAX_BINS:  # a fine grid (many layers, odd costs): cells of about hi / MAX_BINS
            unit = -(-hi // MAX_BINS)
        cells = hi // unit + 1
        steps = [np.rint(c / unit).astype(np.int64) for c in costs]
        ways = [np.zeros(cells) for _ in range(len(costs) + 1)]  # ways[g][s]: completions from group g at cost s
        ways[-1][lo // unit + (lo % unit > 0):] = 1.0
        for g in range(len(costs) - 1, -1, -1):
            for k in steps[g]:
                if k < cells:
                    ways[g][:cells - k] += ways[g + 1][k:]
        if ways[0][0] == 0:
            raise BudgetError(f"budget {self.describe()}: no choice of these options meets it")
        out: list[dict[str, tuple[int, int]]] = []
        for _ in range(1000 * n):
            s, choice = 0, {}
            for g, m in enumerate(names):
                w = np.array([ways[g + 1][s + k] if s + k < cells else 0.0 for k in steps[g]])
                k = int(rng.choice(len(w), p=w / w.sum()))
                choice[m] = tuple(options[m][k])
                s += int(steps[g][k])
            if self.meets(table, choice):
                out.append(choice)
                if len(out) == n:
                    return out
        raise BudgetError(f"budget {self.describe()}: {len(out)} of {n} random draws met it in {1000 * n} tries")

    def check_feasible(self, table: CostTable, options: Mapping[str, Sequence[tuple[int, int]]]) -> None:
        """Raise BudgetError, saying the feasible range, when no choice of the options meets the budget."""
        pair_terms = self._pair_terms(table, options)
        for i, lim in enumerate(self.limits):
            ref = table.reference(lim.metric)
            lo = sum(min(table.unit_cost(lim.metric, n, w, a) for w, a in opts) for n, opts in options.items())
            hi = sum(max(table.unit_cost(lim.metric, n, w, a) for w, a in opts) for n, opts in options.items())
            terms = [t[4][i] for t in pair_terms]
            lo, hi = lo + sum(min(v, 0) for v in terms), hi + sum(max(v, 0) for v in terms)  # bounds, with pairs
            t = lim.bound(table)
            top = hi if lim.upper_only else hi / (1 - self.tol)
            span = (f"feasible range {lim.show(lo, table)}..{lim.show(top, table)}" if lim.whole else
                    f"feasible range {lo / ref:.4g}..{top / ref:.4g} of W8A8") + (
                "" if lim.upper_only else f" (tolerance {self.tol:g})")
            if t < lo:
                raise BudgetError(f"budget {lim.describe()} = {lim.show(t, table)} is below the cheapest policy of "
                                  f"these candidates; {span}")
            if len(self.limits) == 1 and not lim.upper_only and (1.0 - self.tol) * t > hi:
                raise BudgetError(f"budget {lim.describe()} = {lim.show(t, table)} is above the most expensive "
                                  f"policy of these candidates; {span}")
        self.solve(table, options, {n: np.zeros(len(o)) for n, o in options.items()})

    def _infeasible(self, table: CostTable, costs: list, windows: list, pairs: bool = False) -> str:
        if len(self.limits) == 1 and not pairs:  # discrete costs can step over the whole window: name the nearest policies
            c, (lo, hi) = costs[0], windows[0]
            ref = table.reference(self.limits[0].metric)
            below = mck_solve(c, [x.astype(float) for x in c], 0, lo - 1) if lo > 0 else None
            above = mck_solve(c, [-x.astype(float) for x in c], hi + 1, sum(int(x.max()) for x in c))
            near = [f"{x[1] / ref:.4g}" for x in (below, above) if x is not None]
            return (f"budget {self.describe()}: no policy of these candidates costs {lo / ref:.4g}..{hi / ref:.4g} of "
                    f"W8A8 (nearest: {' and '.join(near) or 'none'}); change the budget or widen --tol")
        return f"budget {self.describe()}: no policy of these candidates meets all limits at once; loosen one"


def mck_solve(costs: list[np.ndarray], values: list[np.ndarray], lo: int, hi: int
              ) -> tuple[list[int], int, bool] | None:
    """Return (option per group, total cost, exact) maximising sum of values with lo <= cost <= hi, or None.

    Dynamic programming over the cost axis. Grid unit = gcd of all option costs when that gives at most
    MAX_BINS cells (then the optimum is exact); otherwise a coarser grid where each cell keeps its best
    state with its EXACT cost, so the answer is always exactly feasible (optimal up to the grid).
    """
    if hi < 0:
        return None
    unit = int(np.gcd.reduce(np.concatenate(costs))) or 1
    exact = hi // unit <= MAX_BINS
    if not exact:
        unit = -(-hi // MAX_BINS)
    nb = hi // unit + 1
    best = np.full(nb, -np.inf)
    total = np.zeros(nb, dtype=np.int64)
    best[0] = 0.0
    back = []
    for c, v in zip(costs, values, strict=True):
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


def milp_solve(costs: list[list[np.ndarray]], values: list[np.ndarray], windows: list[tuple[int, int]],
               pairs: Sequence[tuple] = ()) -> list[int] | None:
    """Return the option per group maximising the sum of values, every cost <= its hi and at least one >= its lo.

    `costs[i][g]` are the costs of group g's options under limit i. `pairs` are terms of two groups' choices:
    (group a, mask over its options, group b, mask, [cost under each limit]) costs that much when a's option is in
    its mask and b's in its: a variable z = x_a . x_b each (z <= x_a, z <= x_b, z >= x_a + x_b - 1). The "at least
    one" is solved exactly as one integer program per limit (that limit's window both ways, the others' upper
    bounds), keeping the best; None when none is feasible.
    """
    sizes = [len(v) for v in values]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    n = sum(sizes)
    nz = len(pairs)
    c = np.concatenate([-np.concatenate(values), np.zeros(nz)])  # milp minimises
    one_per_group = np.zeros((len(sizes), n + nz))
    for g, k in enumerate(sizes):
        one_per_group[g, starts[g]:starts[g] + k] = 1.0
    link = np.zeros((3 * nz, n + nz))
    for t, (ga, ma, gb, mb, _) in enumerate(pairs):
        xa = np.zeros(n)
        xa[starts[ga]:starts[ga] + sizes[ga]] = ma
        xb = np.zeros(n)
        xb[starts[gb]:starts[gb] + sizes[gb]] = mb
        link[3 * t, :n], link[3 * t, n + t] = xa, -1.0  # x_a - z >= 0
        link[3 * t + 1, :n], link[3 * t + 1, n + t] = xb, -1.0  # x_b - z >= 0
        link[3 * t + 2, :n], link[3 * t + 2, n + t] = xa + xb, -1.0  # x_a + x_b - z <= 1
    link_lo = np.tile([0.0, 0.0, -np.inf], nz)
    link_hi = np.tile([np.inf, np.inf, 1.0], nz)
    rows = [np.concatenate([np.concatenate(ci), [p[4][i] for p in pairs]]).astype(np.float64)
            for i, ci in enumerate(costs)]
    scale = [max(float(np.abs(r).max()), 1.0) for r in rows]  # keep the constraint matrix well conditioned
    best, best_val = None, -np.inf
    for i in range(len(rows)):
        cons = [LinearConstraint(one_per_group, 1.0, 1.0)]
        if nz:
            cons.append(LinearConstraint(link, link_lo, link_hi))
        for j, (r, (lo, hi)) in enumerate(zip(rows, windows, strict=True)):
            cons.append(LinearConstraint(r / scale[j], (lo if j == i else -np.inf) / scale[j], hi / scale[j]))
        res = milp(c, constraints=cons, integrality=np.ones(n + nz), bounds=Bounds(0, 1))
        if res.status != 0 or res.x is None:
            continue
        x = np.round(res.x[:n]).astype(int)
        picks = [int(np.argmax(x[s:s + k])) for s, k in zip(starts, sizes, strict=True)]
        exact_costs = [sum(int(ci[g][p]) for g, p in enumerate(picks))
                       + sum(t[4][li] for t in pairs if t[1][picks[t[0]]] and t[3][picks[t[2]]])
                       for li, ci in enumerate(costs)]
        if not all(cost <= hi for cost, (_, hi) in zip(exact_costs, windows, strict=True)) or \
                exact_costs[i] < windows[i][0]:
            continue  # scaled rounding put it outside: treat as infeasible for this binding limit
        val = float(sum(v[p] for v, p in zip(values, picks, strict=True)))
        if val > best_val:
            best, best_val = picks, val
    return best
