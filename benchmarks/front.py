"""Accuracy-vs-BitOPs front (issue 6): `asga search` at several budgets plus the uniform policies, each
fine-tuned with the same recipe, in one figure. Resumable: every step is cached.

    python benchmarks/front.py [--model smallcnn] [--budgets 0.0625 0.09 0.125 0.18 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chain import CACHE, RESULTS, finetune, float_model, log, search, spread, write_result

UNIFORM = ((8, 8), (4, 4), (3, 3), (4, 2), (2, 4), (2, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.0625, 0.09, 0.125, 0.18, 0.25])
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--search-epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--proxy", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from asga_deploy.data import dataset_spec
    from asga_deploy.naming import uniform_stem
    from asga_deploy.policy import Policy, uniform_policy
    from asga_deploy.report.plots import plot_front

    spec = dataset_spec(args.dataset)
    root = CACHE / f"front-{args.model}"
    fl = float_model(root, args.model, args.dataset, args.float_epochs)
    float_ckpt = root / "float" / "float.pt"
    points: dict[str, list[dict]] = {"asga": [], "uniform": []}
    for b in args.budgets:
        meta = search(root, args.model, args.dataset, "asga", args.seed, b, args.proxy, args.search_epochs, float_ckpt)
        p = Path(meta["policy"])
        ft = finetune(root, p, args.dataset, args.seed, args.finetune_epochs, float_ckpt)
        pol = Policy.load(p)
        points["asga"].append({"budget": b, "policy": p.stem, "bitops_vs_w8a8": pol.cost["bitops_vs_w8a8"],
                               "weight_bytes": pol.cost["weight_bytes"], "top1": ft["top1"],
                               "search_s": meta["wall_s"]})
        log(f"asga budget {b}: top-1 {ft['top1']:.4f}")
    for w, a in UNIFORM:
        p = root / "policies" / f"{uniform_stem(args.model, w, a)}.json"
        if not p.exists():
            uniform_policy(args.model, w, a, "ort", spec.num_classes, spec.in_chans, spec.input_size).save(p)
        ft = finetune(root, p, args.dataset, args.seed, args.finetune_epochs, float_ckpt)
        pol = Policy.load(p)
        points["uniform"].append({"label": f"W{w}A{a}", "policy": p.stem, "bitops_vs_w8a8": pol.cost["bitops_vs_w8a8"],
                                  "weight_bytes": pol.cost["weight_bytes"], "top1": ft["top1"]})
        log(f"uniform W{w}A{a}: top-1 {ft['top1']:.4f}")
    series = {k: [(100 * r["bitops_vs_w8a8"], 100 * r["top1"]) for r in v] for k, v in points.items()}
    plot_front(series, RESULTS / "front.png", "BitOPs (% of W8A8)", "test top-1 after QAT (%)",
               hline=("float", 100 * fl["top1"]), title=f"{args.model} on {args.dataset}: accuracy vs BitOPs")
    settings = vars(args) | {"ratio_definition": "none"}
    write_result("front", "python benchmarks/front.py " + " ".join(sys.argv[1:]), settings,
                 {"float_top1": fl["top1"], "points": points,
                  "asga_top1": spread([r["top1"] for r in points["asga"]])})
    lines = ["| policy | BitOPs % W8A8 | weight KB | top-1 % |", "|---|---|---|---|"]
    for v in points.values():
        for r in sorted(v, key=lambda r: r["bitops_vs_w8a8"]):
            lines.append(f"| {r.get('label', r['policy'])} | {100 * r['bitops_vs_w8a8']:.2f} | "
                         f"{r['weight_bytes'] / 1e3:.1f} | {100 * r['top1']:.2f} |")
    (RESULTS / "front.md").write_text(f"# accuracy vs BitOPs ({args.model}, {args.dataset})\n\n"
                                      f"float top-1 {100 * fl['top1']:.2f}%\n\n" + "\n".join(lines) + "\n")
    log(json.dumps(series))
    return 0


if __name__ == "__main__":
    sys.exit(main())
