"""Policies from a sensitivity table (method.md section 9): the oracle's best and worst feasible policies,
seeded random feasible ones, and how well a policy follows the oracle (Spearman)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from .budget import Budget
from .cost import CostTable
from .errors import AsgaError
from .io import atomic_write_json, check_name, check_writable, not_a_file, provenance
from .naming import artifact_stem
from .policy import Policy, policy_from_choice
from .report.plots import plot_heatmaps
from .search.setup import read_lut
from .sensitivity import KINDS, SCHEMA, cost_table, deltas
from .validate import SEED_MAX, check_int

PICKS = ("best", "worst", "random")


def load_table(path: str | Path) -> dict:
    """Read a sensitivity table written by `asga sensitivity`; raise AsgaError when it is not one."""
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise AsgaError(f"sensitivity table {path} {problem} (write one with `asga sensitivity`)")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AsgaError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        raise AsgaError(f"{path} is not a sensitivity table (schema {SCHEMA!r} expected)")
    missing = [k for k in ("model", "target", "layers", "options", "costs", "ptq", "input_shape") if k not in table]
    if missing:
        raise AsgaError(f"{path}: sensitivity table lacks {', '.join(missing)}")
    problems = _table_problems(table)
    if problems:
        raise AsgaError(f"{path} is a damaged sensitivity table: {'; '.join(problems[:4])}; measure it again "
                        "with `asga sensitivity`")
    return table


def _table_problems(t: dict) -> list[str]:
    """Return what is malformed in a sensitivity table (types, layers without options, costs or deltas)."""
    layers = t["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        return ["'layers' must be a non-empty list of layer names"]
    out = []
    for key in ("options", "costs", "ptq"):
        if not isinstance(t[key], dict):
            out.append(f"'{key}' must be an object")
    if not isinstance(t.get("num_classes"), int) or not isinstance(t.get("reference_choice"), dict):
        out.append("'num_classes' or 'reference_choice' missing")
    if out:
        return out
    for n in layers:
        opts, delta, cost = t["options"].get(n), t["ptq"].get(n), t["costs"].get(n)
        if not (isinstance(opts, list) and opts and all(isinstance(o, list) and len(o) == 2 and all(
                isinstance(b, int) for b in o) for o in opts)):
            out.append(f"layer {n}: options missing or not [w, a] pairs")
        elif not (isinstance(delta, list) and len(delta) == len(opts) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in delta)):
            out.append(f"layer {n}: ptq deltas missing or not one number per option")
        if not (isinstance(cost, dict) and all(isinstance(cost.get(k), (int, bool)) for k in
                                               ("macs", "params", "input_signed")) and "kind" in cost):
            out.append(f"layer {n}: costs missing or malformed")
    return out


def options_of(table: dict) -> dict[str, list[tuple[int, int]]]:
    """Return {layer: [(w, a), ...]} of a sensitivity table."""
    return {n: [tuple(o) for o in table["options"][n]] for n in table["layers"]}


def oracle_choice(table: dict, budget: Budget, kind: str = "ptq", pick: str = "best", costs: CostTable | None = None
                  ) -> tuple[dict[str, tuple[int, int]], dict]:
    """Return the feasible choice with the least (best) or most (worst) summed loss increase, and the solve facts.

    `costs`: the CostTable to price the budget with (default: the table's own, without latency).
    """
    if pick not in ("best", "worst"):
        raise AsgaError(f"pick {pick!r}: best or worst")
    d = deltas(table, kind)
    sign = -1.0 if pick == "best" else 1.0
    values = {n: [sign * v for v in d[n]] for n in table["layers"]}
    choice, info = budget.solve(costs or cost_table(table), options_of(table), values)
    return choice, {**info, "predicted_loss_increase": sign * info["value"], "oracle": kind, "pick": pick}


def random_choices(table: dict, budget: Budget, n: int, seed: int, costs: CostTable | None = None
                   ) -> list[dict[str, tuple[int, int]]]:
    """Return n feasible choices drawn uniformly at random (seeded)."""
    return budget.sample(costs or cost_table(table), options_of(table), n, seed)


def predicted(table: dict, choice: dict[str, tuple[int, int]], kind: str = "ptq") -> float:
    """Return the oracle's summed loss increase of a choice (additive over layers)."""
    d, opts = deltas(table, kind), options_of(table)
    return float(sum(d[n][opts[n].index(tuple(choice[n]))] for n in table["layers"]))


def to_policy(table: dict, choice: dict[str, tuple[int, int]], method: str, **extra) -> Policy:
    """Return the Policy of a choice on the table's model and target (edges at the target's highest bits)."""
    costs = cost_table(table).layers
    return policy_from_choice(table["model"], table["target"], dict(costs), choice, table["input_shape"],
                              int(table["num_classes"]), "8", provenance(
                                  method=method, dataset=table.get("dataset"),
                                  dataset_fingerprint=table.get("dataset_fingerprint"), **extra))


def loss_gap_closed(table: dict, kind: str, choice: dict[str, tuple[int, int]], best: dict[str, tuple[int, int]],
                    references: list[dict[str, tuple[int, int]]]) -> float:
    """Return the fraction of the oracle's predicted-loss gap between the reference choices (their mean; e.g.
    random feasible policies) and `best` that `choice` closes: 1 at `best`, 0 at the references' mean, < 0 worse."""
    ref = sum(predicted(table, c, kind) for c in references) / len(references)
    gap = ref - predicted(table, best, kind)
    if not gap > 0:
        raise AsgaError(f"the {kind} oracle predicts the best choice no better than the references: no gap to close")
    return (ref - predicted(table, choice, kind)) / gap


def per_cost_sensitivity(table: dict, kind: str = "ptq", metric: str = "bitops") -> dict[str, float]:
    """Return per layer the loss change per unit of cost around the reference (share of the W8A8 total).

    The slope to the next cheaper option of the weight and of the activation (and to the next dearer
    one): how much loss one unit of cost buys in that layer. A search that follows the loss gives more
    bits where this is large.
    """
    d, opts, ct = deltas(table, kind), options_of(table), cost_table(table)
    ref_total = ct.reference(metric)
    out = {}
    for n in table["layers"]:
        wr, ar = table["reference_choice"][n]
        c_ref = ct.unit_cost(metric, n, wr, ar)
        slopes = []
        for k, (w, a) in enumerate(opts[n]):
            one_step = (a == ar and w != wr and _adjacent([o[0] for o in opts[n]], w, wr)) or (
                w == wr and a != ar and _adjacent([o[1] for o in opts[n]], a, ar))
            dc = (ct.unit_cost(metric, n, w, a) - c_ref) / ref_total
            if one_step and dc != 0:
                slopes.append(-d[n][k] / dc)  # loss saved per unit of cost added (both directions)
        out[n] = float(np.mean(slopes)) if slopes else 0.0
    return out


def _adjacent(values: list[int], b: int, ref: int) -> bool:
    """Whether b is the candidate right below or right above ref."""
    s = sorted(set(values))
    i = s.index(ref)
    return b in s[max(i - 1, 0):i + 2]


def rank_agreement(sensitivity: dict[str, float], choice: dict[str, tuple[int, int]]) -> float:
    """Return Spearman's rho between the layers' sensitivity per cost and the bits (w x a) a policy gave them."""
    names = [n for n in sensitivity if n in choice]
    bits = [choice[n][0] * choice[n][1] for n in names]
    if len(set(bits)) < 2 or len({sensitivity[n] for n in names}) < 2:
        return float("nan")  # a uniform policy (or a flat oracle) has no ranking to agree with
    return float(spearmanr([sensitivity[n] for n in names], bits).statistic)


def write_table(table: dict, out_dir: str | Path, force: bool = False) -> Path:
    """Write sensitivity.json and heatmap.png (one panel per measured oracle) into out_dir; return the JSON path."""
    out_dir = Path(out_dir)
    path = check_writable(out_dir / "sensitivity.json", force)
    cols = [f"W{w}A{a}" for w, a in table["options"][table["layers"][0]]]
    panels = {}
    for kind in KINDS:
        if table.get(kind) is not None:
            d = deltas(table, kind)
            panels[f"{kind}: loss increase over the reference W{table['reference'][0]}A{table['reference'][1]}"] = [
                d[n] if len(d[n]) == len(cols) else [float("nan")] * len(cols) for n in table["layers"]]
    plot_heatmaps(table["layers"], cols, panels, out_dir / "heatmap.png", f"{table['model']} on {table['dataset']}")
    return atomic_write_json(path, table)


def oracle_policy_file(table_path: str | Path, budget: Budget, kind: str = "ptq", pick: str = "best", seed: int = 0,
                       out_dir: str | Path = "policies", name: str | None = None, force: bool = False,
                       lut: str | Path | None = None) -> tuple[Path, Policy, dict]:
    """Write the oracle's best / worst / a random feasible policy for the budget; return (path, policy, facts)."""
    if pick not in PICKS:
        raise AsgaError(f"--pick {pick!r} unknown; choose one of {', '.join(PICKS)}")
    check_name(name, "--name")
    check_int("--seed", seed, 0, SEED_MAX)
    table = load_table(table_path)
    method = "sensitivity" if pick == "best" else f"sensitivity-{pick}"
    stem = name or artifact_stem(table["model"], method, budget.tag(), table["target"],
                                 seed if pick == "random" else None)
    path = check_writable(Path(out_dir) / f"{stem}.json", force)
    if "latency" in budget.metrics and lut is None:
        raise AsgaError("--budget-latency needs --lut TABLE (measure it with `asga lut`)")
    priced = cost_table(table, *read_lut(str(lut), cost_table(table).layers, table.get("target"))) if lut else cost_table(table)
    if pick == "random":
        choice = random_choices(table, budget, 1, seed, priced)[0]
        info = {"pick": "random", "seed": seed}
    else:
        choice, info = oracle_choice(table, budget, kind, pick, priced)
    if lut:
        info["latency"] = {"predicted_ms": (priced.constant("latency") + priced.total("latency", choice)) / 1e6,
                           "lut": str(lut)}
    info = {**info, "predicted": {k: predicted(table, choice, k) for k in KINDS if table.get(k) is not None}}
    pol = to_policy(table, choice, method, sensitivity_table=str(table_path), budget=budget.describe(),
                    metrics=info, oracle=kind)
    return pol.save(path, force=force), pol, info
