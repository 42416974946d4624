"""Tune the search's logit step and budget controller (method.md sections 2 and 6, revision 3). Resumable.

For one model: a float model trained without the proxy's images (or the headroom benchmark's, with
--from-headroom), then searches at one BitOPs budget over a grid of settings (`--grid`, a JSON list of
SearchConfig overrides), several search seeds each, the proxy fixed (proxy seed 0). Reported per setting:
which diagnostics fail, where the argmax ends against the budget, how many choices the exact extraction
moves, when the argmax last changed, how many searched layers two seeds agree on, and (with an oracle
table) Spearman between the oracle's sensitivity per unit of cost and the bits given. The objective is erm
by default (the controller does not depend on it; one pass per step halves the time). Every search runs
with --allow-diagnostics so that failures are recorded, not raised: the table says which failed.

    python benchmarks/tune_controller.py --model smallcnn --threads 1
    python benchmarks/tune_controller.py --model resnet20-w0.5 --from-headroom fashion-mnist --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from chain import CACHE, RESULTS, float_model, log, search, search_stem, write_result

from asga_deploy.oracle import load_table, per_cost_sensitivity, rank_agreement

DEFAULT_GRID = [{"alpha_lr": a, "alpha_lr_rule": r, "band": 0.1} for a in (0.01, 0.02, 0.05)
                for r in ("tau", "tau-cos")]


def tag_of(objective: str, overrides: dict) -> str:
    """Return a cache tag naming the objective and the overrides."""
    short = {"alpha_lr": "alr", "alpha_lr_rule": "rule", "band": "band", "k_p": "kp", "eta": "eta",
             "epochs": "ep", "lam_max": "lm", "alpha_data": "ad"}
    return objective + "".join(f"-{short.get(k, k)}{v}" for k, v in sorted(overrides.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--from-headroom", action="store_true",
                    help="use benchmarks/headroom.py's float model and oracle table of this dataset and model")
    ap.add_argument("--budget", type=float, default=0.09375)
    ap.add_argument("--objective", default="erm")
    ap.add_argument("--grid", type=json.loads, default=DEFAULT_GRID, help="JSON list of SearchConfig overrides")
    ap.add_argument("--float-epochs", type=int, default=None, help="default: 3 for smallcnn, 4 otherwise")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--proxy", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = CACHE / (f"headroom/{args.dataset}_{args.model}" if args.from_headroom else f"tune-{args.model}")
    epochs = args.float_epochs or (3 if args.model == "smallcnn" else 4)
    fl = float_model(root, args.model, args.dataset, epochs, exclude_proxy=args.proxy, proxy_seed=0)
    float_ckpt = root / "float" / "float.pt"
    tpath = root / "sensitivity" / "sensitivity.json"
    table = load_table(tpath) if tpath.exists() else None
    sens = {k: per_cost_sensitivity(table, k) for k in ("ptq", "hessian", "finetune")
            if table and table.get(k) is not None}
    rows = []
    for overrides in args.grid:
        overrides = dict(overrides)
        ep = overrides.pop("epochs", args.epochs)
        tag = tag_of(f"tune-{args.objective}", overrides | ({"epochs": ep} if ep != args.epochs else {}))
        runs = []
        for seed in args.seeds:
            if args.report_only:
                meta = root / "policies" / f"{search_stem(args.model, tag, args.budget, seed)}.meta.json"
                if meta.exists():
                    runs.append(json.loads(meta.read_text()))
                continue
            runs.append(search(root, args.model, args.dataset, args.objective, seed, args.budget, args.proxy, ep,
                               float_ckpt, tag=tag, allow_diagnostics=True, proxy_seed=0, **overrides))
        if not runs:
            continue
        ms = [r["metrics"] for r in runs]
        layers = table["layers"] if table else None
        bits = []
        for r in runs:
            d = json.loads(Path(r["policy"]).read_text())
            excluded = set(d["cost"]["excluded"])
            bits.append({n: (v["weight_bits"], v["act_bits"]) for n, v in d["layers"].items()
                         if (n in layers if layers else n not in excluded)})
        pairs = [sum(a[n] == b[n] for n in a) / len(a) for a, b in itertools.combinations(bits, 2)]
        rows.append({
            "setting": overrides | {"epochs": ep}, "tag": tag, "searches": len(runs),
            "diagnostics_failed": [m["diagnostics_failed"] for m in ms],
            "passed": sum(not m["diagnostics_failed"] for m in ms),
            "argmax_cost_vs_budget": [m["argmax_cost_ratio"] / args.budget for m in ms],
            "extraction_moves": [m["extraction_vs_argmax_choices"] for m in ms],
            "undecided": [m["alpha_undecided_fraction"] for m in ms], "still": [m["alpha_still_fraction"] for m in ms],
            "last_change_step": [m["argmax_last_change_step"] for m in ms], "freeze_step": ms[0]["freeze_step"],
            "policy_vs_start": [m["policy_vs_start_choices"] for m in ms],
            "seed_agreement": statistics.fmean(pairs) if pairs else None,
            "oracle_spearman": {k: [rank_agreement(s, b) for b in bits] for k, s in sens.items()},
            "wall_s": [r["wall_s"] for r in runs]})
        log(f"{tag}: passed {rows[-1]['passed']}/{len(runs)}, agreement {rows[-1]['seed_agreement']}, "
            f"spearman {rows[-1]['oracle_spearman']}")
    name = f"controller_tuning-{args.model}" + (f"-{args.dataset}" if args.from_headroom else "")
    settings = vars(args) | {"float_epochs": epochs, "float_top1": fl["top1"], "proxy_seed": 0, "root": str(root),
                             "proxy_excluded_from_float": True, "allow_diagnostics": "on for every search (recorded)",
                             "ratio_definition": "none"}
    write_result(name, "python benchmarks/tune_controller.py " + " ".join(
        f"--{k.replace('_', '-')} {json.dumps(v) if k == 'grid' else v}" for k, v in vars(args).items()
        if v not in (None, False)), settings, {"rows": rows})
    write_markdown(name, args, fl["top1"], rows)
    return 0


def write_markdown(name: str, args, float_top1: float, rows: list[dict]) -> None:
    """Write benchmarks/results/<name>.md, one row per setting."""
    lines = [f"# Controller tuning: {args.model} on {args.dataset}, {100 * args.budget:g}% of W8A8 BitOPs, "
             f"{args.objective}, {args.proxy}-image proxy left out of the float model (float top-1 {100 * float_top1:.2f}%), "
             f"seeds {args.seeds}; every search with --allow-diagnostics (failures listed)", "",
             "| setting | passed | seed agreement | oracle Spearman | argmax / budget | extraction moves | undecided | "
             "last change / freeze | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = "-" if r["seed_agreement"] is None else f"{r['seed_agreement']:.2f}"
        sp = "; ".join(f"{k} " + ",".join("-" if v != v else f"{v:+.2f}" for v in vals)
                       for k, vals in r["oracle_spearman"].items()) or "-"
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        lines.append(f"| {setting} | {r['passed']}/{r['searches']} | {agree} | {sp} | "
                     f"{', '.join(f'{v:.3f}' for v in r['argmax_cost_vs_budget'])} | "
                     f"{', '.join(map(str, r['extraction_moves']))} | {', '.join(f'{v:.2f}' for v in r['undecided'])} | "
                     f"{', '.join(str(v) for v in r['last_change_step'])} / {r['freeze_step']} | "
                     f"{'; '.join(','.join(f) or '-' for f in r['diagnostics_failed'])} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
