"""Tune the search's logit step and budget-controller gains (method.md sections 2 and 6, revision 3).

For each model: a float model trained without the proxy's images, then searches at one BitOPs budget over
a grid of (alpha_lr, k_p, eta), two search seeds each, the proxy fixed (proxy seed 0). Reported per
setting: which diagnostics fail, how far the argmax ends from the budget window, how many choices the
exact extraction moves, when the argmax last changed, and how many layers the two seeds agree on.
The objective is erm by default (the controller does not depend on it; one pass per step halves the
time). Every search runs with --allow-diagnostics so that failures are recorded, not raised: the
table says which failed. Resumable: every search is cached.

    python benchmarks/tune_controller.py --model smallcnn --threads 1
    python benchmarks/tune_controller.py --model resnet20 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from chain import CACHE, RESULTS, float_model, log, search, search_stem, write_result

GRID_ALPHA_LR = (0.02, 0.05, 0.1, 0.2)
GRID_GAINS = ((2.0, 0.1), (5.0, 0.3))


def agreement(a: dict, b: dict) -> float:
    """Return the fraction of layers with the same (w, a) in two policies' layers."""
    return sum(a[n] == b[n] for n in a) / len(a)


def bits_of(policy_path: str) -> dict[str, tuple[int, int]]:
    """Return {layer: (w, a)} of the searched (counted) layers of a policy file."""
    d = json.loads(Path(policy_path).read_text())
    excluded = set(d["cost"].get("excluded", []))
    return {n: (v["weight_bits"], v["act_bits"]) for n, v in d["layers"].items() if n not in excluded}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=float, default=0.09375)
    ap.add_argument("--objective", default="erm")
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
    root = CACHE / f"tune-{args.model}"
    epochs = args.float_epochs or (3 if args.model == "smallcnn" else 4)
    fl = float_model(root, args.model, args.dataset, epochs, exclude_proxy=args.proxy, proxy_seed=0)
    float_ckpt = root / "float" / "float.pt"
    rows = []
    for alr, (kp, eta) in itertools.product(GRID_ALPHA_LR, GRID_GAINS):
        tag = f"{args.objective}-alr{alr:g}-kp{kp:g}-eta{eta:g}"
        runs = []
        for seed in args.seeds:
            if args.report_only:
                meta_path = root / "policies" / f"{search_stem(args.model, tag, args.budget, seed)}.meta.json"
                if not meta_path.exists():
                    continue
                runs.append(json.loads(meta_path.read_text()))
                continue
            runs.append(search(root, args.model, args.dataset, args.objective, seed, args.budget, args.proxy,
                               args.epochs, float_ckpt, tag=tag, allow_diagnostics=True, alpha_lr=alr, k_p=kp,
                               eta=eta))
        if not runs:
            continue
        ms = [r["metrics"] for r in runs]
        bits = [bits_of(r["policy"]) for r in runs]
        pairs = [agreement(a, b) for a, b in itertools.combinations(bits, 2)]
        rows.append({
            "alpha_lr": alr, "k_p": kp, "eta": eta, "searches": len(runs),
            "diagnostics_failed": [m["diagnostics_failed"] for m in ms],
            "passed": sum(not m["diagnostics_failed"] for m in ms),
            "argmax_cost_vs_budget": [m["argmax_cost_ratio"] / args.budget for m in ms],
            "extraction_moves": [m["extraction_vs_argmax_choices"] for m in ms],
            "undecided": [m["alpha_undecided_fraction"] for m in ms],
            "still": [m["alpha_still_fraction"] for m in ms],
            "last_change_step": [m["argmax_last_change_step"] for m in ms], "freeze_step": ms[0]["freeze_step"],
            "policy_vs_start": [m["policy_vs_start_choices"] for m in ms],
            "seed_agreement": statistics.fmean(pairs) if pairs else None,
            "wall_s": [r["wall_s"] for r in runs]})
        log(f"{tag}: passed {rows[-1]['passed']}/{len(runs)}, agreement {rows[-1]['seed_agreement']}")
    settings = vars(args) | {"float_epochs": epochs, "float_top1": fl["top1"], "proxy_seed": 0,
                             "proxy_excluded_from_float": True, "allow_diagnostics": "on for every search (recorded)",
                             "ratio_definition": "none"}
    write_result(f"controller_tuning-{args.model}", "python benchmarks/tune_controller.py "
                 + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
                 settings, {"rows": rows})
    lines = [f"# Controller tuning: {args.model} on {args.dataset}, {100 * args.budget:g}% of W8A8 BitOPs, "
             f"{args.objective}, {args.epochs} epochs on a {args.proxy}-image proxy (float top-1 {100 * fl['top1']:.2f}%)",
             "", "| alpha_lr | k_p | eta | passed | seed agreement | argmax / budget | extraction moves | "
             "undecided | last change / freeze | failed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = "" if r["seed_agreement"] is None else f"{r['seed_agreement']:.2f}"
        lines.append(f"| {r['alpha_lr']:g} | {r['k_p']:g} | {r['eta']:g} | {r['passed']}/{r['searches']} | {agree} | "
                     f"{', '.join(f'{v:.3f}' for v in r['argmax_cost_vs_budget'])} | "
                     f"{', '.join(map(str, r['extraction_moves']))} | {', '.join(f'{v:.2f}' for v in r['undecided'])} | "
                     f"{', '.join(str(v) for v in r['last_change_step'])} / {r['freeze_step']} | "
                     f"{'; '.join(','.join(f) or '-' for f in r['diagnostics_failed'])} |")
    (RESULTS / f"controller_tuning-{args.model}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
