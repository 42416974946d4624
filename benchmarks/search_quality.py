"""Search quality at one setting: do the searched policies follow the loss, and are they worth more? Resumable.

1. Does the policy matter here? The setting's oracle best/worst, 4 random feasible and uniform policies
   (benchmarks/headroom.py's, same cache) fine-tuned with the same paired seeds and recipe.
2. Searches: erm (EdMIPS), sam, sam-align, asga, and asga with each --perturb, several search seeds each,
   on a 1,000-image proxy drawn with proxy seed 0 and left out of the float model's training. Per
   search: the diagnostics (recorded, never raised: the table says which failed), seed agreement within
   a method, Spearman between the oracle's sensitivity per unit of cost and the bits the search gave,
   extraction moves, the step the argmax last changed, how far the policy moved from where it started.
3. asga's gamma / epsilon sweep (method.md section 4), judged by seed agreement and oracle Spearman.
4. The searched policies fine-tuned with the paired seeds; paired differences to the oracle's best and to
   the best uniform policy, with 95% intervals.

    python benchmarks/search_quality.py --dataset fashion-mnist --model resnet20-w0.5 --budget bops9.4 --threads 1
    python benchmarks/search_quality.py ... --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from chain import (
    CACHE,
    RESULTS,
    finetune,
    float_model,
    log,
    paired,
    search,
    spread,
    write_result,
)
from headroom import BUDGETS, PROXY, setting_policies

from asga_deploy.oracle import load_table, per_cost_sensitivity, rank_agreement
from asga_deploy.sensitivity import KINDS

METHODS = {  # label: (objective, overrides)
    "erm": ("erm", {}), "sam": ("sam", {}), "sam-align": ("sam-align", {}), "asga": ("asga", {}),
    "asga-quantized": ("asga", {"perturb": "quantized"}), "asga-asam": ("asga", {"perturb": "asam"}),
}
DEFAULT_SEARCH_EPOCHS = 20  # the cached runs of docs/results.md; another length is labelled -e<N>
SWEEP = [("gamma", 0.01), ("gamma", 0.05), ("gamma", 0.1), ("epsilon", 0.05), ("epsilon", 0.2)]


def search_budget(budget, table: dict) -> dict:
    """Return the SearchConfig budget fields of a headroom budget (BitOPs ratio, or a relative size limit as the
    searched layers' weight megabytes)."""
    lim = budget.limits[0]
    if lim.metric == "bitops" and lim.relative:
        return {}  # chain.search passes the BitOPs ratio itself
    if lim.metric == "size" and lim.relative and not lim.whole:
        from asga_deploy.sensitivity import cost_table

        return {"budget_bitops": None, "budget_weight_mb": lim.value * cost_table(table).reference("size") / 8e6}
    raise SystemExit(f"search_quality cannot search the budget {budget.describe()}")


def bits_of(policy: str | Path, layers: list[str]) -> dict[str, tuple[int, int]]:
    """Return {layer: (w, a)} of the searched layers of a policy file."""
    d = json.loads(Path(policy).read_text())["layers"]
    return {n: (d[n]["weight_bits"], d[n]["act_bits"]) for n in layers}


def agreement(bits: list[dict]) -> float | None:
    """Return the mean fraction of layers that two policies (every pair) give the same (w, a)."""
    pairs = [sum(a[n] == b[n] for n in a) / len(a) for a, b in itertools.combinations(bits, 2)]
    return statistics.fmean(pairs) if pairs else None


def describe_runs(runs: list[dict], table: dict, sens: dict[str, dict[str, float]]) -> dict:
    """Return the per-method search facts (agreement, oracle Spearman per oracle, diagnostics, moves, time)."""
    bits = [bits_of(r["policy"], table["layers"]) for r in runs]
    ms = [r["metrics"] for r in runs]
    return {"searches": len(runs), "seed_agreement": agreement(bits),
            "oracle_spearman": {k: [rank_agreement(s, b) for b in bits] for k, s in sens.items()},
            "diagnostics_failed": [r.get("diagnostics_failed", m.get("diagnostics_failed")) for r, m in zip(runs, ms, strict=True)],
            "extraction_moves": [m["extraction_vs_argmax_choices"] for m in ms],
            "argmax_last_change_step": [m["argmax_last_change_step"] for m in ms], "freeze_step": ms[0]["freeze_step"],
            "policy_vs_start": [m["policy_vs_start_choices"] for m in ms],
            "undecided": [m["alpha_undecided_fraction"] for m in ms],
            "flipped_codes": [m.get("flipped_codes_mean") for m in ms],
            "search_s": [r["wall_s"] for r in runs], "policies": [r["policy"] for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", default="bops9.4", choices=list(BUDGETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--search-epochs", type=int, default=DEFAULT_SEARCH_EPOCHS)
    ap.add_argument("--search-overrides", type=json.loads, default={},
                    help="JSON SearchConfig overrides applied to every search (the tuned controller settings)")
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--sweep", action="store_true", help="also asga's gamma / epsilon sweep")
    ap.add_argument("--shard", default=None, help="K/N: run only every N-th search from the K-th (0-based), nothing "
                    "else: N single-thread processes fill the cache in parallel; then run without --shard")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-seeds", type=int, default=3)
    ap.add_argument("--finetune-images", type=int, default=0)
    ap.add_argument("--kd", action="store_true")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = CACHE / "headroom" / f"{args.dataset}_{args.model}"
    name = f"{args.dataset}/{args.model}/{args.budget}"
    fl = float_model(base, args.model, args.dataset, args.float_epochs, exclude_proxy=PROXY, proxy_seed=0)
    float_ckpt = base / "float" / "float.pt"
    table = load_table(base / "sensitivity" / "sensitivity.json")
    budget = BUDGETS[args.budget]
    kinds = [k for k in KINDS if table.get(k) is not None]
    metric = budget.limits[0].metric
    sens = {k: per_cost_sensitivity(table, k, metric) for k in kinds}
    tag = f"e{args.finetune_epochs}{'-kd' if args.kd else ''}{'-n' + str(args.finetune_images) if args.finetune_images else ''}"
    ratio = budget.limits[0].value

    def tune(policy: Path) -> list[float] | None:
        accs = []
        for seed in range(args.finetune_seeds):
            run = base / "finetune" / f"{policy.stem}-{tag}-ft{seed}" / "finetune.json"
            if args.report_only or args.no_finetune:
                if not run.exists():
                    return None
                accs.append(json.loads(run.read_text())["top1"])
            else:
                accs.append(finetune(base, policy, args.dataset, seed, args.finetune_epochs, float_ckpt,
                                     args.finetune_images or None, args.kd, tag)["top1"])
        return accs

    shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else None
    count = itertools.count()
    # searches of another length are other runs: their own cache labels and their own results files
    suffix = "" if args.search_epochs == DEFAULT_SEARCH_EPOCHS else f"-e{args.search_epochs}"

    def run_searches(label: str, objective: str, overrides: dict) -> list[dict]:
        label += suffix
        runs = []
        for seed in range(args.seeds):
            if shard and next(count) % shard[1] != shard[0]:
                continue
            if args.report_only:
                metas = sorted((base / "policies").glob(f"{args.model}-{label}-*-s{seed}.meta.json"))
                metas = [m for m in metas if json.loads(m.read_text())["tag"] == label]
                if metas:
                    runs.append(json.loads(metas[0].read_text()))
                continue
            runs.append(search(base, args.model, args.dataset, objective, seed, ratio, PROXY, args.search_epochs,
                               float_ckpt, tag=label, allow_diagnostics=True, proxy_seed=0,
                               **(search_budget(budget, table) | args.search_overrides | overrides)))
        return runs

    if shard:  # only this shard's searches
        for label, (objective, overrides) in ({m: METHODS[m] for m in args.methods} | (
                {f"asga-{k}{v:g}": ("asga", {k: v}) for k, v in SWEEP} if args.sweep else {})).items():
            run_searches(label, objective, overrides)
        return 0
    # 1. does the policy matter here?
    reference = {label: tune(p) for label, p in setting_policies(base, name, table, budget, kinds).items()}
    reference = {k: v for k, v in reference.items() if v}
    # 2. the searches (and 3. the sweep)
    methods = {m: METHODS[m] for m in args.methods}
    if args.sweep:
        methods |= {f"asga-{k}{v:g}": ("asga", {k: v}) for k, v in SWEEP}
    rows = {}
    for label, (objective, overrides) in methods.items():
        runs = run_searches(label, objective, overrides)
        if not runs:
            continue
        rows[label] = describe_runs(runs, table, sens)
        if label in args.methods:  # 4. fine-tunes of the searched policies (the sweep is judged without)
            accs = [tune(Path(r["policy"])) for r in runs]
            if all(accs):
                rows[label]["finetuned_top1"] = accs
        log(f"{label}: agreement {rows[label]['seed_agreement']}, diagnostics {rows[label]['diagnostics_failed']}")
    results = {"setting": name, "float_top1": fl["top1"], "reference": reference, "methods": rows,
               "comparisons": compare(reference, rows, kinds)}
    write_result(f"search_quality{suffix}", "python benchmarks/search_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v not in (None, False, [])), vars(args) | {
        "budget_described": budget.describe(), "proxy": PROXY, "proxy_seed": 0, "proxy_excluded_from_float": True,
        "finetune_tag": tag, "allow_diagnostics": "on for every search: failures are recorded per run",
        "ratio_definition": "none"}, results)
    write_markdown(results, args, suffix)
    return 0


def compare(reference: dict, rows: dict, kinds: list[str]) -> dict:
    """Return the paired comparisons: oracle best - worst (does it matter), each method vs oracle best / uniform."""
    out: dict = {}
    uniforms = {k: v for k, v in reference.items() if k.startswith("uniform")}
    best_uniform = max(uniforms, key=lambda k: statistics.fmean(uniforms[k])) if uniforms else None
    for kind in kinds:
        if f"{kind}-best" in reference and f"{kind}-worst" in reference:
            diff = paired(reference[f"{kind}-best"], reference[f"{kind}-worst"])
            seed_spread = statistics.fmean(spread(v)["std"] for v in reference.values())
            out[f"{kind}: best - worst"] = {**diff, "ft_seed_std": seed_spread,
                                           "matters": diff["mean"] > 2 * seed_spread}
    best_oracle = max((k for k in reference if k.endswith("-best")), key=lambda k: statistics.fmean(reference[k]),
                      default=None)
    for label, r in rows.items():
        for i, accs in enumerate(r.get("finetuned_top1", [])):
            if best_oracle:
                out[f"{label} s{i} - {best_oracle}"] = paired(accs, reference[best_oracle])
            if best_uniform:
                out[f"{label} s{i} - {best_uniform}"] = paired(accs, reference[best_uniform])
    return out


def write_markdown(results: dict, args, suffix: str = "") -> None:
    """Write benchmarks/results/search_quality<suffix>.md."""
    ref, rows, cmp = results["reference"], results["methods"], results["comparisons"]
    lines = [f"# Search quality: {results['setting']} (float {100 * results['float_top1']:.2f}%), "
             f"{args.search_epochs}-epoch searches on a {PROXY}-image proxy, fine-tune: {args.finetune_epochs} epoch(s)"
             f"{' with distillation' if args.kd else ''}, {args.finetune_seeds} paired seeds", "",
             "## Does the policy matter here?", "", "| policy | top-1 % (mean ± std over fine-tune seeds) |", "|---|---|"]
    for k, v in ref.items():
        s = spread(v)
        lines.append(f"| {k} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} |")
    for k, v in cmp.items():
        if "best - worst" in k:
            ci = v["ci95"]
            lines.append(f"\n{k}: {100 * v['mean']:+.2f} points" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")
                         + f"; fine-tune seed std {100 * v['ft_seed_std']:.2f}: "
                         + ("matters (> 2x the seed spread)" if v["matters"] else "does NOT exceed 2x the seed spread"))
    lines += ["", "## Searches", "", "| method | top-1 % per search | seed agreement | oracle Spearman (ptq / hessian / "
              "finetune, per search) | extraction moves | argmax last change / freeze | policy vs start | "
              "search s | diagnostics failed |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        top = ", ".join(f"{100 * statistics.fmean(a):.2f}" for a in r.get("finetuned_top1", [])) or "-"
        sp = " / ".join(",".join("-" if x != x else f"{x:+.2f}" for x in r["oracle_spearman"][k])
                        for k in ("ptq", "hessian", "finetune") if k in r["oracle_spearman"])
        agree = "-" if r["seed_agreement"] is None else f"{r['seed_agreement']:.2f}"
        lines.append(f"| {label} | {top} | {agree} | {sp} | {r['extraction_moves']} | {r['argmax_last_change_step']} / "
                     f"{r['freeze_step']} | {r['policy_vs_start']} | {', '.join(f'{s:.0f}' for s in r['search_s'])} | "
                     f"{'; '.join(','.join(f) or '-' for f in r['diagnostics_failed'])} |")
    lines += ["", "## Paired differences (points, 95% interval)", ""]
    for k, v in cmp.items():
        if "best - worst" not in k and v.get("ci95"):
            lines.append(f"- {k}: {100 * v['mean']:+.2f} [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}]"
                         + (" (excludes 0)" if v["excludes_zero"] else ""))
    (RESULTS / f"search_quality{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
