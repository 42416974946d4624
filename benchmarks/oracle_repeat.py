"""How repeatable is the sensitivity oracle, and what does it let a search score? Resumable.

The search-quality targets compare searched policies with one measurement of the oracle (seed 0, the headroom
table). This measures the same oracle again with other seeds (other held-out images, calibration and BatchNorm
samples, fine-tune order) and reports, per oracle:

- repeatability: Spearman between two seeds' per-layer sensitivity per unit of cost, and Pearson between their
  loss increases over every (layer, option);
- the ceiling of the search targets: how often two seeds' exact best policies give a layer the same (w, a)
  (the seed agreement of a search that followed each measurement of the loss exactly), and the Spearman of each
  seed's best policy with its own and with the other seeds' per-cost sensitivity (what a search that followed
  that oracle exactly would score), against random feasible policies (chance);
- each searched policy of benchmarks/search_quality.py against the oracle averaged over all seeds: Spearman and
  the fraction of the predicted-loss gap between random feasible policies and the averaged oracle's best that it
  closes (1: the oracle's best, 0: a random feasible policy).

    python benchmarks/oracle_repeat.py --seeds 1 2 --shard 0/2 --threads 1 &   # one oracle seed per process
    python benchmarks/oracle_repeat.py --seeds 1 2 --shard 1/2 --threads 1
    python benchmarks/oracle_repeat.py --seeds 1 2 --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from chain import CACHE, log, write_result
from headroom import BUDGETS, spearman
from search_quality import agreement as mean_agreement
from search_quality import bits_of

from asga_deploy.oracle import (
    load_table,
    loss_gap_closed,
    options_of,
    oracle_choice,
    per_cost_sensitivity,
    predicted,
    random_choices,
    rank_agreement,
    write_table,
)
from asga_deploy.sensitivity import SensitivityConfig, deltas, measure

RANDOM_POLICIES = 200  # random feasible policies: the chance level of agreement and Spearman


def measure_seed(base: Path, seed: int, ref: dict, kinds: list[str]) -> dict:
    """Measure (or reuse) the oracle table of one seed with the seed-0 table's settings; return it."""
    path = base / f"sensitivity-s{seed}" / "sensitivity.json"
    if path.exists():
        return load_table(path)
    c = {k: tuple(v) if isinstance(v, list) else v for k, v in ref["config"].items()
         if k in SensitivityConfig.__dataclass_fields__}
    cfg = SensitivityConfig(**c | {"seed": seed, "finetune_steps": c["finetune_steps"] if "finetune" in kinds else 0,
                                   "hessian_samples": c["hessian_samples"] if "hessian" in kinds else 0})
    log(f"oracle seed {seed}: {', '.join(kinds)}")
    t0 = time.perf_counter()
    table = measure(cfg)
    table["time_s"] = time.perf_counter() - t0
    write_table(table, path.parent)
    return table


def averaged(tables: list[dict], kind: str) -> dict:
    """Return a table whose `kind` oracle is the mean loss increase of the given tables (same layers/options)."""
    mean = {n: [statistics.fmean(v) for v in zip(*(deltas(t, kind)[n] for t in tables), strict=True)]
            for n in tables[0]["layers"]}
    part = {"table": mean} if kind == "finetune" else (
        {n: {"estimate": v} for n, v in mean.items()} if kind == "hessian" else mean)
    return tables[0] | {kind: part}


def pearson(x: list[float], y: list[float]) -> float | None:
    """Return Pearson's r (None without spread)."""
    from scipy.stats import pearsonr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(pearsonr(x, y).statistic)


def agreement(a: dict, b: dict) -> float:
    """Return the fraction of layers two choices give the same (w, a)."""
    return mean_agreement([a, b])


def unresolved_share(tables: list[dict], kind: str, choices: list[dict]) -> tuple[int, float | None]:
    """Return (how many layer choices two policies of the list differ on, summed over pairs; the share of those
    the oracle cannot tell apart: the seeds' mean loss difference between the two options within two standard
    errors of it)."""
    opts = options_of(tables[0])
    per_seed = [deltas(t, kind) for t in tables]
    total = unresolved = 0
    for a, b in itertools.combinations(choices, 2):
        for n in a:
            if tuple(a[n]) == tuple(b[n]):
                continue
            i, j = opts[n].index(tuple(a[n])), opts[n].index(tuple(b[n]))
            diffs = [d[n][i] - d[n][j] for d in per_seed]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            total += 1
            unresolved += abs(statistics.fmean(diffs)) <= 2 * se
    return total, (unresolved / total if total else None)


def analyse(tables: dict[int, dict], kind: str, budget, searched: dict[str, list[dict]], setting: str = "") -> dict:
    """Return the repeatability and ceiling facts of one oracle over the seeds' tables."""
    seeds = sorted(tables)
    metric = budget.limits[0].metric
    layers = tables[seeds[0]]["layers"]
    sens = {s: per_cost_sensitivity(tables[s], kind, metric) for s in seeds}
    best = {s: oracle_choice(tables[s], budget, kind, "best")[0] for s in seeds}
    rnd = random_choices(tables[seeds[0]], budget, RANDOM_POLICIES, 123)
    pairs = list(itertools.combinations(seeds, 2))
    flat = {s: [v for n in layers for v in deltas(tables[s], kind)[n]] for s in seeds}
    mean_table = averaged([tables[s] for s in seeds], kind)
    mean_sens = per_cost_sensitivity(mean_table, kind, metric)
    mean_best = oracle_choice(mean_table, budget, kind, "best")[0]
    rnd_sp = [rank_agreement(sens[seeds[0]], c) for c in rnd]
    rnd_agree = [agreement(a, b) for a, b in zip(rnd[::2], rnd[1::2], strict=True)]
    out = {
        "sensitivity_spearman_between_seeds": {f"{a}-{b}": spearman([sens[a][n] for n in layers],
                                                                    [sens[b][n] for n in layers]) for a, b in pairs},
        "delta_pearson_between_seeds": {f"{a}-{b}": pearson(flat[a], flat[b]) for a, b in pairs},
        "best_policy_agreement_between_seeds": {f"{a}-{b}": agreement(best[a], best[b]) for a, b in pairs},
        "best_self_spearman": {str(s): rank_agreement(sens[s], best[s]) for s in seeds},
        "best_cross_spearman": {f"{a}-{b}": rank_agreement(sens[b], best[a]) for a in seeds for b in seeds if a != b},
        "best_gap_closed_under_other_seed": {f"{a}-{b}": loss_gap_closed(tables[b], kind, best[a], best[b], rnd)
                                             for a in seeds for b in seeds if a != b},
        "random_spearman": {"mean": statistics.fmean(rnd_sp), "p90": sorted(rnd_sp)[int(0.9 * len(rnd_sp))],
                            "max": max(rnd_sp)},
        "random_agreement_mean": statistics.fmean(rnd_agree),
        "mean_oracle_best_self_spearman": rank_agreement(mean_sens, mean_best),
        "mean_oracle_best_agreement_with_seed_best": {str(s): agreement(mean_best, best[s]) for s in seeds},
    }
    out["searched"] = {}
    for label, cs in searched.items():
        count, share = unresolved_share([tables[s] for s in seeds], kind, cs) if len(seeds) > 1 else (None, None)
        out["searched"][label] = {
            "seed_agreement": mean_agreement(cs),
            "disagreements": count, "disagreements_unresolved_share": share,
            "spearman_vs_mean_oracle": [rank_agreement(mean_sens, c) for c in cs],
            "gap_closed_vs_mean_oracle": [loss_gap_closed(mean_table, kind, c, mean_best, rnd) for c in cs],
            "agreement_with_mean_oracle_best": [agreement(c, mean_best) for c in cs]}
    out["ranks_finetuned_top1"] = finetuned_ranking(tables, kind, mean_table, setting)
    out["predicted_loss"] = {"mean_oracle_best": predicted(mean_table, mean_best, kind),
                             "random_mean": statistics.fmean(predicted(mean_table, c, kind) for c in rnd)}
    return out


def finetuned_ranking(tables: dict[int, dict], kind: str, mean_table: dict, setting: str) -> dict | None:
    """Return how well each seed's oracle and the averaged one rank the headroom policies' fine-tuned top-1 (Spearman
    of minus the predicted loss increase with the mean fine-tuned top-1), from benchmarks/results/headroom.json."""
    from chain import RESULTS

    path = RESULTS / "headroom.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text())["results"]["settings"].get(setting, {})
    tags = sorted(rec.get("finetune", {}))
    if not tags:
        return None
    top1 = rec["finetune"][tags[0]]["mean_top1"]
    layers = mean_table["layers"]
    choices = {label: bits_of(rec["policies"][label], layers) for label in top1}
    acc = [top1[k] for k in choices]

    def rank(t: dict) -> float | None:
        return spearman([-predicted(t, c, kind) for c in choices.values()], acc)

    return {"finetune_tag": tags[0], "policies": len(choices), "per_seed": {str(s): rank(t) for s, t in tables.items()},
            "averaged": rank(mean_table)}


def searched_policies(base: Path, layers: list[str], budget_tag: str) -> dict[str, list[dict]]:
    """Return {label: [choice per seed]} of the cached search_quality searches at this budget."""
    out: dict[str, list[dict]] = {}
    for meta in sorted((base / "policies").glob(f"*-{budget_tag}-s[0-9].meta.json")):
        m = json.loads(meta.read_text())
        out.setdefault(m["tag"], []).append(bits_of(m["policy"], layers))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="resnet20-w0.5")
    ap.add_argument("--budget", default="bops9.4", choices=list(BUDGETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="oracle seeds measured besides seed 0")
    ap.add_argument("--kinds", nargs="+", default=["ptq", "finetune"], choices=["ptq", "finetune", "hessian"])
    ap.add_argument("--shard", default=None, help="K/N: measure only every N-th seed from the K-th, nothing else")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = CACHE / "headroom" / f"{args.dataset}_{args.model}"
    ref = load_table(base / "sensitivity" / "sensitivity.json")
    missing = [k for k in args.kinds if ref.get(k) is None]
    if missing:
        raise SystemExit(f"the seed-0 table has no {', '.join(missing)} oracle: run benchmarks/headroom.py first")
    tables = {0: ref}
    k, n = (int(v) for v in args.shard.split("/")) if args.shard else (0, 1)
    for i, seed in enumerate(args.seeds):
        if i % n != k:
            continue
        path = base / f"sensitivity-s{seed}" / "sensitivity.json"
        if args.report_only and not path.exists():
            continue
        tables[seed] = measure_seed(base, seed, ref, args.kinds)
    if args.shard:
        return 0
    budget = BUDGETS[args.budget]
    tag = f"r{budget.limits[0].value * 100:g}" if budget.limits[0].metric == "bitops" else args.budget
    searched = searched_policies(base, ref["layers"], tag)
    setting = f"{args.dataset}/{args.model}/{args.budget}"
    results = {"setting": setting, "seeds": sorted(tables),
               "time_s": {str(s): t.get("time_s") for s, t in tables.items()},
               "oracles": {k: analyse(tables, k, budget, searched, setting) for k in args.kinds}}
    write_result("oracle_repeat", "python benchmarks/oracle_repeat.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v not in (None, False, [])), vars(args) | {
        "random_policies": RANDOM_POLICIES, "random_seed": 123}, results)
    write_markdown(results)
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:+.2f}"


def _span(d: dict) -> str:
    vals = [v for v in d.values() if v is not None and v == v]
    return "n/a" if not vals else f"{min(vals):+.2f} to {max(vals):+.2f} (mean {statistics.fmean(vals):+.2f})"


def write_markdown(results: dict) -> None:
    """Write benchmarks/results/oracle_repeat.md."""
    from chain import RESULTS

    o = results["oracles"]
    lines = [f"# Oracle repeatability: {results['setting']}, oracle seeds {results['seeds']}", "",
             "Seed 0 is the headroom table; the others measure the same oracles with other held-out images, "
             "calibration and BatchNorm samples and fine-tune order. Ranges over seed pairs.", "",
             "| oracle | per-cost sensitivity, Spearman between seeds | loss increases, Pearson between seeds "
             "| exact best policies, agreement between seeds | best policy's Spearman with its own sensitivity "
             "| with another seed's | random feasible: Spearman mean / p90, agreement |",
             "|---|---|---|---|---|---|---|"]
    for k, v in o.items():
        r = v["random_spearman"]
        lines.append(f"| {k} | {_span(v['sensitivity_spearman_between_seeds'])} | "
                     f"{_span(v['delta_pearson_between_seeds'])} | {_span(v['best_policy_agreement_between_seeds'])} "
                     f"| {_span(v['best_self_spearman'])} | {_span(v['best_cross_spearman'])} | "
                     f"{r['mean']:+.2f} / {r['p90']:+.2f}, {v['random_agreement_mean']:.2f} |")
    lines += ["", "Searched policies (benchmarks/search_quality.py's cache) against each oracle averaged over the seeds "
              "(per search seed): Spearman of the bits with the averaged per-cost sensitivity, and the fraction of "
              "the averaged oracle's predicted-loss gap from a random feasible policy (0) to its best policy (1) "
              "that the policy closes.", ""]
    kinds = list(o)
    lines.append("| search | seed agreement | " + " | ".join(
        f"{k}: Spearman | {k}: gap closed | {k}: disagreements it cannot resolve" for k in kinds) + " |")
    lines.append("|---|---|" + "---|---|---|" * len(kinds))
    labels = sorted(o[kinds[0]]["searched"])
    for label in labels:
        agree = o[kinds[0]]["searched"][label]["seed_agreement"]
        cells = ["n/a" if agree is None else f"{agree:.2f}"]
        for k in kinds:
            d = o[k]["searched"][label]
            share = d["disagreements_unresolved_share"]
            cells += [", ".join(_fmt(x) for x in d["spearman_vs_mean_oracle"]),
                      ", ".join(_fmt(x) for x in d["gap_closed_vs_mean_oracle"]),
                      "n/a" if share is None else f"{100 * share:.0f}% of {d['disagreements']}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in kinds:
        r = o[k].get("ranks_finetuned_top1")
        if r:
            lines.append(f"- {k}: Spearman of minus its predicted loss with the fine-tuned top-1 of the {r['policies']} "
                         f"headroom policies ({r['finetune_tag']}): per seed " + ", ".join(
                             f"{s} {_fmt(v)}" for s, v in r["per_seed"].items()) + f", averaged {_fmt(r['averaged'])}")
    lines += ["", "Averaged oracle's own best policy: Spearman " + ", ".join(
        f"{k} {_fmt(o[k]['mean_oracle_best_self_spearman'])}" for k in kinds) + "."]
    (RESULTS / "oracle_repeat.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
