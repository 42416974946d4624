"""The paper's transfer claim at small scale (issue 6, method.md section 8), resumable.

ResNet-20 (20 searched convs, first conv and classifier at 8 bits) on Fashion-MNIST. Search on a
1,000-image class-balanced proxy with asga, sam, sam-align and erm (EdMIPS); erm also on the full
training set; uniform policies of the same BitOPs. Every policy is fine-tuned with the same recipe with
each fine-tune seed (by default one epoch on a seeded class-balanced half of the training set: the table
then fits in about 2 hours on 2 cores). A method wins only by more than the spread over fine-tune
seeds. Cache: benchmarks/cache/transfer-<model>/{float,b<budget>}.

    python benchmarks/transfer.py                 # run / continue (every step cached)
    python benchmarks/transfer.py --threads 1 &   # or: one single-thread worker per core, sharing the
    python benchmarks/transfer.py --threads 1 &   #     units of work through claim files
    python benchmarks/transfer.py --report-only   # rebuild the table from what is cached
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from chain import (
    CACHE,
    RESULTS,
    budget_of,
    finetune,
    float_model,
    log,
    search,
    search_log,
    search_stem,
    spread,
    write_result,
)

METHODS = ("asga", "sam-align", "sam", "erm")
DEFAULT_BUDGET = 0.09375  # W2A3 / W3A2: at 0.125 uniform W2A4 lost only 0.37 points to float (one seed)


def uniform_policies(root: Path, model: str, budget: float, in_chans: int, size: int) -> list[Path]:
    """Write (once) and return the uniform policies whose BitOPs meet the budget."""
    from asga_deploy.naming import uniform_stem
    from asga_deploy.policy import model_cost_table, uniform_policy
    from asga_deploy.targets import get_target

    out = []
    table = model_cost_table(model, 10, in_chans, size)
    for w, a in budget_of(budget).uniform_matches(table, get_target("ort")):
        p = root / "policies" / f"{uniform_stem(model, w, a)}.json"
        if not p.exists():  # deterministic: two workers writing it at once write the same file
            uniform_policy(model, w, a, "ort", 10, in_chans, size).save(p, force=True)
        out.append(p)
    return out


def claim(root: Path, unit: str) -> bool:
    """Claim a unit of work for this process (a file created exclusively); a dead claimant's unit is free again."""
    path = root / "claims" / f"{unit}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (OSError, ValueError):
                return False
            if pid == os.getpid():
                return True
            try:
                os.kill(pid, 0)
                return False  # a live worker has it
            except ProcessLookupError:
                path.unlink(missing_ok=True)  # its worker died: take it over (its steps resume from checkpoints)
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help="ratio of W8A8 BitOPs; at 0.125 uniform W2A4 loses only 0.4 points on resnet20 (README)")
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--search-epochs", type=int, default=10)
    ap.add_argument("--full-search-epochs", type=int, default=1, help="erm on the full training set")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-images", type=int, default=30000,
                    help="fine-tune on a seeded class-balanced subset of this many training images (0: all)")
    ap.add_argument("--search-seeds", type=int, default=3)
    ap.add_argument("--finetune-seeds", type=int, default=2)
    ap.add_argument("--proxy", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of this process (0: torch's default); run one worker per core with 1")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tag_b = budget_of(args.budget).tag()
    base = CACHE / f"transfer-{args.model}"  # the float model, shared by every budget
    root = base / tag_b
    in_chans, size = 1, 28
    runs: dict[str, list[dict]] = {}
    float_ckpt = base / "float" / "float.pt"
    if not args.report_only:
        # workers started together: one trains the float model, the others wait for it
        while not (base / "float" / "train.json").exists() and not claim(base, "float"):
            time.sleep(10)
        fl = float_model(base, args.model, args.dataset, args.float_epochs)
        log(f"float top-1 {fl['top1']:.4f}")

    def collect(label: str, policy: Path, search_meta: dict | None) -> None:
        for fs in range(args.finetune_seeds):
            rep_path = root / "finetune" / f"{policy.stem}-ft{fs}" / "finetune.json"
            if args.report_only and not rep_path.exists():
                continue
            ft = finetune(root, policy, args.dataset, fs, args.finetune_epochs, float_ckpt,
                          args.finetune_images or None)
            runs.setdefault(label, []).append({"policy": policy.stem, "finetune_seed": fs, "top1": ft["top1"],
                                               "finetune_s": ft["time_s"], "search": search_meta})

    # units of work (a search and its fine-tunes), in the order that makes a partial table most useful:
    # uniform first, then search seeds outer so every method has a seed before any has two
    units: list[tuple[str, object]] = []
    for p in uniform_policies(root, args.model, args.budget, in_chans, size):
        units.append((p.stem, lambda p=p: collect(f"uniform {p.stem.split('-')[-1].upper()}", p, None)))

    def searched(method: str, seed: int, subset: int | None, epochs: int, tag: str, label: str) -> None:
        if args.report_only and not (root / "policies" / f"{search_stem(args.model, tag, args.budget, seed)}.meta.json").exists():
            return
        meta = search(root, args.model, args.dataset, method, seed, args.budget, subset, epochs, float_ckpt, tag=tag)
        collect(label, Path(meta["policy"]), meta)

    for seed in range(args.search_seeds):
        for method in METHODS:
            units.append((f"{method}-s{seed}",
                          lambda m=method, s=seed: searched(m, s, args.proxy, args.search_epochs, m, m)))
        if seed == min(1, args.search_seeds - 1):
            units.append(("erm-full-s0", lambda: searched("erm", 0, None, args.full_search_epochs, "erm-full",
                                                          "erm (full train set)")))
    for name, run in units:
        if args.report_only or claim(root, name):
            run()
    if not args.report_only:
        log("this worker found no unclaimed unit left; run --report-only once every worker has finished")
    return report(root, float_ckpt.parent / "train.json", args, runs) if args.report_only else 0


def search_steps(root: Path, meta: dict) -> int:
    """Return the number of search steps a cached search logged."""
    return len(search_log(root, Path(meta["policy"]).stem))


def report(root: Path, float_report: Path, args, runs: dict[str, list[dict]]) -> int:
    """Aggregate the cached runs into benchmarks/results/transfer.{json,md,png}."""
    import json

    from asga_deploy.policy import Policy
    from asga_deploy.report.plots import plot_scatter

    float_top1 = json.loads(float_report.read_text())["top1"]
    table = {}
    for label, rs in runs.items():
        pols = {r["policy"]: Policy.load(root / "policies" / f"{r['policy']}.json") for r in rs}
        # the spread that decides a win: over fine-tune seeds of the same policy
        by_policy: dict[str, list[float]] = {}
        for r in rs:
            by_policy.setdefault(r["policy"], []).append(r["top1"])
        ft_spread = max((spread(v)["std"] for v in by_policy.values() if len(v) > 1), default=0.0)
        searches = [r["search"] for r in rs if r["search"]]
        uniform = [p for p in pols.values() if len({(b.weight_bits, b.act_bits) for n, b in p.layers.items()
                                                     if n not in p.cost["excluded"]}) == 1]
        table[label] = {"top1": spread([r["top1"] for r in rs]), "finetune_seed_std": ft_spread,
                        "bitops_vs_w8a8": spread([p.cost["bitops_vs_w8a8"] for p in pols.values()]),
                        "weight_bytes": spread([p.cost["weight_bytes"] for p in pols.values()]),
                        "policies": len(pols), "uniform_returned": len(uniform),
                        "search_wall_s": spread([s["wall_s"] for s in searches]) if searches else None,
                        "search_steps": spread([search_steps(root, s) for s in searches]) if searches else None,
                        "runs": rs}
    uni = {k: v for k, v in table.items() if k.startswith("uniform")}
    best = max(uni, key=lambda k: uni[k]["top1"]["mean"]) if uni else None
    base = uni[best]["top1"]["mean"] if best else None
    for k, v in table.items():
        if base is not None and not k.startswith("uniform"):
            d = v["top1"]["mean"] - base
            v["vs_best_uniform_points"] = 100 * d
            # beyond the fine-tune-seed spread of both sides, not only the method's own
            v["win"] = d > max(v["finetune_seed_std"], uni[best]["finetune_seed_std"])
    settings = {k: v for k, v in vars(args).items() if k != "report_only"}
    settings["ratio_definition"] = "mean top-1 of asga minus mean top-1 of the best uniform policy (points)"
    asga = table.get("asga", {}).get("vs_best_uniform_points")
    name = "transfer" if args.budget == DEFAULT_BUDGET else f"transfer-{root.name}"
    out = write_result(name, "python benchmarks/transfer.py " + " ".join(sys.argv[1:]), settings,
                       {"float_top1": float_top1, "methods": table}, asga)
    lines = ["| method | top-1 % (mean ± std) | n | ft-seed std | vs float (pts) | BitOPs % | weight KB | "
             "uniform returned | search s | search steps | vs best uniform (pts) | win |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in table.items():
        s, st = v["search_wall_s"], v["search_steps"]
        search_s = "" if s is None else f"{s['mean']:.0f}"
        steps = "" if st is None else f"{st['mean']:.0f}"
        vs = "" if "vs_best_uniform_points" not in v else f"{v['vs_best_uniform_points']:+.2f}"
        win = "" if "win" not in v else ("yes" if v["win"] else "no")
        lines.append(f"| {k} | {100 * v['top1']['mean']:.2f} ± {100 * v['top1']['std']:.2f} | {v['top1']['n']} | "
                     f"{100 * v['finetune_seed_std']:.2f} | {100 * (v['top1']['mean'] - float_top1):+.2f} | "
                     f"{100 * v['bitops_vs_w8a8']['mean']:.2f} | {v['weight_bytes']['mean'] / 1e3:.1f} | "
                     f"{v['uniform_returned']}/{v['policies']} | {search_s} | {steps} | {vs} | {win} |")
    md = RESULTS / f"{name}.md"
    ft_data = f"{args.finetune_images} seeded class-balanced" if args.finetune_images else "all 60,000"
    searched_any = any(v["search_wall_s"] for v in table.values())
    search_note = (f"Searches: {args.proxy}-image proxy, {args.search_epochs} epochs (erm on the full set: "
                   f"{args.full_search_epochs})" if searched_any else "No search was run at this budget")
    md.write_text(f"# transfer ({args.model}, {args.dataset}, budget {100 * args.budget:g}% of W8A8)\n\n"
                  f"float top-1 {100 * float_top1:.2f}% ({args.float_epochs} epochs). {search_note}; fine-tune: "
                  f"{args.finetune_epochs} QAT epoch(s) on {ft_data} training images, seeds "
                  f"0..{args.finetune_seeds - 1}; test on all 10,000. A win needs a mean above the best uniform "
                  f"policy by more than the larger fine-tune-seed std of the two.\n\n"
                  + "\n".join(lines) + "\n")
    pts = {k: (v["search_wall_s"]["mean"], 100 * v["top1"]["mean"]) for k, v in table.items() if v["search_wall_s"]}
    if pts:
        plot_scatter(pts, RESULTS / f"{name}_acc_vs_search_time.png", "search wall time (s, one core)",
                     "top-1 after QAT (%), mean over seeds", hline=("best uniform", 100 * base) if base else None,
                     title=f"{args.model}: accuracy vs search time")
    log(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
