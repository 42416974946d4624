"""Sensitivity of the ASGA search to epsilon (the largest radius) and gamma (the SAGM step), issue 6.

Searches only (no fine-tuning): for each setting, an asga search with the transfer benchmark's proxy, seed,
budget and float model, compared with the default search (epsilon 0.1, gamma 0.001) of the same seed:
which layers' bits change, the proxy loss, the gap, the radius. Run benchmarks/transfer.py first (it
trains the float model and the default searches). Resumable and shareable like transfer.py.

    python benchmarks/sensitivity.py [--threads 1] [--epsilons 0.03 0.3] [--gammas 0 0.01]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from chain import CACHE, RESULTS, budget_of, log, search, search_log, search_stem, write_result
from transfer import DEFAULT_BUDGET, claim
from transfer_analysis import agreement, per_epoch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    ap.add_argument("--search-epochs", type=int, default=10, help="as in the transfer run it is compared with")
    ap.add_argument("--proxy", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epsilons", type=float, nargs="*", default=[0.03, 0.3])
    ap.add_argument("--gammas", type=float, nargs="*", default=[0.0, 0.01])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from asga_deploy.policy import Policy

    tag_b = budget_of(args.budget).tag()
    root = CACHE / f"transfer-{args.model}" / tag_b
    float_ckpt = CACHE / f"transfer-{args.model}" / "float" / "float.pt"
    base_meta = root / "policies" / f"{search_stem(args.model, 'asga', args.budget, args.seed)}.meta.json"
    if not base_meta.exists():
        log(f"no default asga search at {base_meta}: run benchmarks/transfer.py first")
        return 1
    settings = [("epsilon", e) for e in args.epsilons] + [("gamma", g) for g in args.gammas]
    rows = {"default (epsilon 0.1, gamma 0.001)": json.loads(base_meta.read_text())}
    for key, val in settings:
        tag = f"asga-{key}{val:g}"
        meta_path = root / "policies" / f"{search_stem(args.model, tag, args.budget, args.seed)}.meta.json"
        if args.report_only or not claim(root, f"sensitivity-{tag}-s{args.seed}"):
            if meta_path.exists():
                rows[f"{key} {val:g}"] = json.loads(meta_path.read_text())
            continue
        rows[f"{key} {val:g}"] = search(root, args.model, args.dataset, "asga", args.seed, args.budget, args.proxy,
                                        args.search_epochs, float_ckpt, tag=tag, **{key: val})
    if not args.report_only:
        return 0
    base_bits = Policy.load(rows["default (epsilon 0.1, gamma 0.001)"]["policy"]).bits()
    table = {}
    for label, meta in rows.items():
        stem = Path(meta["policy"]).stem
        log_rows = search_log(root, stem)
        bits = Policy.load(meta["policy"]).bits()
        table[label] = {
            "policy": stem, "layers_same_as_default": agreement(bits, base_bits),
            "changed_layers": {n: [base_bits[n], b] for n, b in bits.items() if b != base_bits[n]},
            "proxy_loss_final": meta["metrics"]["proxy_train_loss_final"],
            "gap_mean": statistics.fmean(per_epoch(log_rows, "gap")),
            "rho_last_epoch": per_epoch(log_rows, "rho")[-1], "wall_s": meta["wall_s"],
            "argmax_last_change_epoch": meta["metrics"]["argmax_last_change_epoch"],
            "finetuned_top1": [json.loads(p.read_text())["top1"]
                               for p in sorted((root / "finetune").glob(f"{stem}-ft*/finetune.json"))],
        }
    out = write_result("sensitivity", "python benchmarks/sensitivity.py " + " ".join(sys.argv[1:]),
                       {k: v for k, v in vars(args).items() if k != "report_only"} | {"ratio_definition": "none"},
                       table)
    md = [f"| asga search (seed {args.seed}) | layers as default | proxy loss (end) | mean gap | rho (last epoch) | "
          "argmax last changed (epoch) | search s |", "|---|---|---|---|---|---|---|"]
    for label, r in table.items():
        md.append(f"| {label} | {100 * r['layers_same_as_default']:.0f}% | {r['proxy_loss_final']:.3f} | "
                  f"{r['gap_mean']:.4f} | {r['rho_last_epoch']:.3f} | {r['argmax_last_change_epoch']} | "
                  f"{r['wall_s']:.0f} |")
    (RESULTS / "sensitivity.md").write_text(
        f"# ASGA sensitivity to epsilon and gamma ({args.model}, budget {100 * args.budget:g}% of W8A8, search "
        f"only)\n\n" + "\n".join(md) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
