"""What the transfer runs say beyond the table (issue 6): rho/gap curves, the logits' movement, how stable
each method's policy is across search seeds, and whether the proxy's numbers predict fine-tuned accuracy.

Reads only benchmarks/cache/transfer-<model>/b<budget>/ (run benchmarks/transfer.py first); writes
benchmarks/results/transfer_analysis.{json,md} and transfer_search_curves.png. Cheap: no training.

    python benchmarks/transfer_analysis.py [--model resnet20] [--budget 0.09375]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

from chain import CACHE, RESULTS, budget_of, log, search_log, spread, write_result


def per_epoch(log_rows: list[dict], key: str) -> list[float]:
    """Return the mean of `key` over the steps of each epoch."""
    by: dict[int, list[float]] = {}
    for r in log_rows:
        by.setdefault(r["epoch"], []).append(float(r[key]))
    return [statistics.fmean(by[e]) for e in sorted(by)]


def logits_summary(ckpt: Path, alpha_init: float) -> dict:
    """Return how far the bit-width logits moved from their constant start and how decided they are (tau = 1)."""
    import torch

    from asga_deploy.io import load_checkpoint

    sd = load_checkpoint(ckpt, "search")["model"]
    alphas = [v.float() for k, v in sd.items() if k.endswith((".alpha_w", ".alpha_a"))]
    moved = math.sqrt(sum(float(((a - alpha_init) ** 2).sum()) for a in alphas))
    top = [float(torch.softmax(a, 0).max()) for a in alphas]
    return {"logit_vectors": len(alphas), "l2_from_init": moved,
            "max_abs_logit": max(float(a.abs().max()) for a in alphas),
            "mean_top_prob_tau1": statistics.fmean(top), "min_top_prob_tau1": min(top)}


def agreement(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> float:
    """Return the fraction of layers given the same (weight, activation) bits by two policies."""
    return sum(a[n] == b.get(n) for n in a) / len(a)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Return Spearman's rank correlation (average ranks for ties); None below 3 points or without spread."""
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", type=float, default=0.09375)
    args = ap.parse_args(argv)
    from asga_deploy.policy import Policy
    from asga_deploy.report.plots import plot_panels

    tag_b = budget_of(args.budget).tag()
    root = CACHE / f"transfer-{args.model}" / tag_b
    runs = []
    for meta_path in sorted((root / "policies").glob(f"{args.model}-*-{tag_b}-s*.meta.json")):
        meta = json.loads(meta_path.read_text())
        pol_path = Path(meta["policy"])
        stem = pol_path.stem
        run_dir = root / "search" / stem
        rows = search_log(root, stem)
        pol = Policy.load(pol_path)
        tops = [json.loads(p.read_text())["top1"] for p in sorted((root / "finetune").glob(f"{stem}-ft*/finetune.json"))]
        cfg = pol.provenance.get("config", {})
        runs.append({"policy": stem, "method": meta["tag"], "seed": meta["seed"], "steps": len(rows),
                     "wall_s": meta["wall_s"], "bits": pol.bits(), "finetuned_top1": tops,
                     "bitops_vs_w8a8": pol.cost["bitops_vs_w8a8"],
                     "epoch_curves": {k: per_epoch(rows, k) for k in ("loss", "loss_adv", "gap", "rho", "sharpness",
                                                                      "grad_norm", "lambda", "expected_cost")},
                     "search_metrics": {k: meta["metrics"].get(k) for k in (
                         "proxy_train_loss_final", "argmax_last_change_epoch", "proxy_train_loss_at_last_change",
                         "alpha_undecided_fraction", "extraction_vs_argmax_choices", "argmax_cost_ratio",
                         "expected_cost_ratio", "final_lambda")},
                     "logits": logits_summary(run_dir / "checkpoint.pt", float(cfg.get("alpha_init", 0.01)))})
    if not runs:
        log(f"no searches cached under {root}: run benchmarks/transfer.py first")
        return 1
    methods = list(dict.fromkeys(r["method"] for r in runs))
    summary: dict[str, dict] = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        pairs = [agreement(a["bits"], b["bits"]) for a, b in itertools.combinations(rs, 2)]
        summary[m] = {
            "searches": len(rs),
            "seed_pair_layer_agreement": spread(pairs) if pairs else None,
            "gap_last_epoch": spread([r["epoch_curves"]["gap"][-1] for r in rs]),
            "rho_last_epoch": spread([r["epoch_curves"]["rho"][-1] for r in rs]),
            "proxy_loss_final": spread([r["search_metrics"]["proxy_train_loss_final"] for r in rs]),
            "logits_l2_from_init": spread([r["logits"]["l2_from_init"] for r in rs]),
            "mean_top_prob_tau1": spread([r["logits"]["mean_top_prob_tau1"] for r in rs]),
            "argmax_last_change_epoch": spread([r["search_metrics"]["argmax_last_change_epoch"] for r in rs]),
            "mean_weight_bits": spread([statistics.fmean(w for w, _ in r["bits"].values()) for r in rs]),
            "mean_act_bits": spread([statistics.fmean(a for _, a in r["bits"].values()) for r in rs]),
        }
    # does the method change the policy more than the seed does? same seed, different method
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r["bits"]
    cross = {}
    for a, b in itertools.combinations([m for m in methods if m != "erm-full"], 2):
        v = [agreement(d[a], d[b]) for d in by_seed.values() if a in d and b in d]
        if v:
            cross[f"{a} vs {b}"] = spread(v)
    scored = [r for r in runs if r["finetuned_top1"]]
    top = [statistics.fmean(r["finetuned_top1"]) for r in scored]
    predictors = {
        "proxy_train_loss_final": [r["search_metrics"]["proxy_train_loss_final"] for r in scored],
        "gap_last_epoch": [r["epoch_curves"]["gap"][-1] for r in scored],
        "mean_weight_bits": [statistics.fmean(w for w, _ in r["bits"].values()) for r in scored],
        "mean_act_bits": [statistics.fmean(a for _, a in r["bits"].values()) for r in scored],
    }
    corr = {k: spearman(v, top) for k, v in predictors.items()}

    # curves: mean over seeds per method, per epoch
    panels: dict[str, dict[str, list[float]]] = {"proxy loss": {}, "rho": {}, "gap h = L(W+e) - L(W)": {},
                                                 "expected BitOPs / W8A8": {}}
    n_ep = min(len(r["epoch_curves"]["loss"]) for r in runs if r["method"] != "erm-full")
    for m in methods:
        if m == "erm-full":
            continue  # one epoch on 60,000 images: not comparable per epoch
        rs = [r for r in runs if r["method"] == m]
        for panel, key in (("proxy loss", "loss"), ("rho", "rho"), ("gap h = L(W+e) - L(W)", "gap"),
                           ("expected BitOPs / W8A8", "expected_cost")):
            panels[panel][m] = [statistics.fmean(r["epoch_curves"][key][e] for r in rs) for e in range(n_ep)]
    plot_panels(list(range(1, n_ep + 1)), panels, RESULTS / "transfer_search_curves.png", xlabel="search epoch",
                title=f"{args.model}: search curves, mean over seeds")
    results = {"methods": summary, "cross_method_layer_agreement_same_seed": cross,
               "spearman_with_finetuned_top1": {"n_policies": len(scored), **corr}, "runs": runs}
    out = write_result("transfer_analysis", "python benchmarks/transfer_analysis.py " + " ".join(sys.argv[1:]),
                       vars(args) | {"ratio_definition": "none"}, results)

    def f(s: dict | None, scale: float = 1.0, nd: int = 3) -> str:
        return "" if s is None else f"{scale * s['mean']:.{nd}f} ± {scale * s['std']:.{nd}f}"

    lines = ["| method | searches | layer agreement between seeds | proxy loss (end) | gap (last epoch) | "
             "rho (last epoch) | logits moved (L2) | mean top prob (tau 1) | mean W bits | mean A bits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['searches']} | {f(s['seed_pair_layer_agreement'], 1, 2)} | "
                     f"{f(s['proxy_loss_final'])} | {f(s['gap_last_epoch'], 1, 4)} | {f(s['rho_last_epoch'])} | "
                     f"{f(s['logits_l2_from_init'], 1, 2)} | {f(s['mean_top_prob_tau1'])} | "
                     f"{f(s['mean_weight_bits'], 1, 2)} | {f(s['mean_act_bits'], 1, 2)} |")
    lines += ["", "Same seed, different method (fraction of layers with the same W/A bits):", ""]
    lines += [f"- {k}: {f(v, 1, 2)}" for k, v in cross.items()]
    lines += ["", f"Spearman rank correlation with the fine-tuned top-1 over {len(scored)} searched policies:", ""]
    lines += [f"- {k}: {'n/a' if v is None else f'{v:+.2f}'}" for k, v in corr.items()]
    (RESULTS / "transfer_analysis.md").write_text(
        f"# transfer analysis ({args.model}, budget {100 * args.budget:g}% of W8A8)\n\n" + "\n".join(lines) + "\n"
        "\n![search curves](transfer_search_curves.png)\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
