"""Headroom: does the choice of bit-width policy still matter after fine-tuning, and where? Resumable.

Per setting (dataset x model x budget): the float model; the sensitivity oracle (post-training with BatchNorm
re-estimation, Hessian traces, and optionally a short fine-tune); its best and worst feasible policies, 4
seeded random feasible ones and the uniform policies of the budget. Every policy gets its post-training
(PTQ) top-1 at once; the fine-tunes (paired seeds: every policy with the same seeds, data and recipe) run
only for the settings asked (`--finetune-settings`, or the ones with the largest PTQ headroom). Reported per
setting and fine-tune length: best - worst and best - best uniform as paired differences with 95%
intervals, the float accuracy, and how well each oracle ranks the fine-tuned accuracy (Spearman).

    python benchmarks/headroom.py --threads 2                       # PTQ stage for every setting
    python benchmarks/headroom.py --finetune-settings fashion-mnist/resnet20/bops9.4 --finetune-epochs 1 3
    python benchmarks/headroom.py --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from chain import CACHE, RESULTS, finetune, float_model, log, paired, write_result

from asga_deploy.budget import Budget, Limit
from asga_deploy.io import atomic_write_json
from asga_deploy.naming import uniform_stem
from asga_deploy.oracle import (
    load_table,
    options_of,
    oracle_choice,
    predicted,
    random_choices,
    to_policy,
    write_table,
)
from asga_deploy.policy import uniform_policy
from asga_deploy.ptq import evaluate_ptq
from asga_deploy.sensitivity import KINDS, SensitivityConfig, cost_table, measure
from asga_deploy.targets import get_target

BUDGETS = {  # name: (budget, what a uniform policy of it is)
    "bops9.4": Budget((Limit("bitops", 0.09375, True, "9.375% of W8A8 BitOPs"),)),
    "bops14": Budget((Limit("bitops", 0.140625, True, "14.06% of W8A8 BitOPs"),)),
    "size37.5": Budget((Limit("size", 0.375, True, "37.5% of W8 weight size"),)),
}
DATASETS = ("fashion-mnist", "fashion-mnist-m")
PROXY = 1000
MODELS = ("resnet20", "resnet20-w0.5", "mobilenetv2-cifar-w0.5")


def spearman(x: list[float], y: list[float]) -> float | None:
    """Return Spearman's rho (None below 3 points or without spread)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def setting_policies(root: Path, name: str, table: dict, budget: Budget, kinds: list[str]) -> dict[str, Path]:
    """Write (once) and return the setting's policies: oracle best/worst per oracle, 4 random, uniform matches."""
    folder = root / "policies" / name.replace("/", "_")
    out: dict[str, Path] = {}

    def keep(label: str, choice: dict, method: str) -> None:
        # the budget in the file name: fine-tune runs are cached by policy stem, and the oracle's "best" of two
        # budgets are different policies (the uniform ones below are the same policy whatever the budget)
        path = folder / f"{name.rsplit('/', 1)[-1]}-{label}.json"
        if not path.exists():
            to_policy(table, choice, method, budget=budget.describe()).save(path, force=True)
        out[label] = path

    for kind in kinds:
        for pick in ("best", "worst"):
            keep(f"{kind}-{pick}", oracle_choice(table, budget, kind, pick)[0], f"sensitivity-{pick}")
    for i, choice in enumerate(random_choices(table, budget, 4, seed=0)):
        keep(f"random{i}", choice, "random")
    target, opts = get_target(table["target"]), options_of(table)
    matches = [(w, a) for w, a in budget.uniform_matches(cost_table(table), target)
               if all((w, a) in opts[n] for n in table["layers"])]  # the oracle has a prediction for them
    # one uniform policy per weight width: the most precise activations that still fit (a size budget
    # leaves activations free)
    for w, a in sorted({w: max(a for v, a in matches if v == w) for w, _ in matches}.items()):
        path = folder / f"{uniform_stem(table['model'], w, a)}.json"
        if not path.exists():
            chans, size = table["input_shape"][0], table["input_shape"][-1]
            uniform_policy(table["model"], w, a, table["target"], table["num_classes"], chans, size).save(
                path, force=True)
        out[f"uniform-w{w}a{a}"] = path
    return out


def oracle_table(base: Path, dataset: str, args, finetune_steps: int) -> dict:
    """Measure (or reuse) the setting's sensitivity table; add the short-fine-tune oracle when asked."""
    tpath = base / "sensitivity" / "sensitivity.json"
    old = load_table(tpath) if tpath.exists() else None
    if old is not None and (not finetune_steps or old.get("finetune") is not None):
        return old
    log(f"sensitivity {base.name}" + (f" (short fine-tune oracle, {finetune_steps} steps)" if finetune_steps else ""))
    t0 = time.perf_counter()
    table = measure(SensitivityConfig(str(base / "float" / "float.pt"), dataset, target="ort",
                                      weight_bits=tuple(args.weight_bits), act_bits=tuple(args.act_bits),
                                      reference=(3, 3), images=args.oracle_images, finetune_steps=finetune_steps),
                    reuse=old)
    table["time_s"] = (old or {}).get("time_s") or time.perf_counter() - t0
    if finetune_steps:
        table["finetune"]["time_s"] = time.perf_counter() - t0
    write_table(table, tpath.parent, force=True)
    return table


def prepare_setting(base: Path, dataset: str, model: str, bname: str, table: dict, float_top1: float) -> dict:
    """Write the setting's policies, measure their post-training top-1 (cached); return the setting record."""
    name, budget = f"{dataset}/{model}/{bname}", BUDGETS[bname]
    kinds = [k for k in KINDS if table.get(k) is not None]
    pols = setting_policies(base, name, table, budget, kinds)
    ptq_path = base / f"ptq-{bname}.json"
    ptq = json.loads(ptq_path.read_text()) if ptq_path.exists() else {}
    for label, p in pols.items():
        if label not in ptq:
            ptq[label] = evaluate_ptq(p, base / "float" / "float.pt", dataset)["top1"]
            atomic_write_json(ptq_path, ptq)
    choices = {label: {n: (v["weight_bits"], v["act_bits"]) for n, v in json.loads(p.read_text())["layers"].items()
                       if n in table["layers"]} for label, p in pols.items()}
    return {"float_top1": float_top1, "policies": {k: str(v) for k, v in pols.items()}, "ptq_top1": ptq,
            "predicted": {k: {kind: predicted(table, c, kind) for kind in kinds} for k, c in choices.items()},
            "oracle_time_s": table.get("time_s"), "base": str(base), "finetune": {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--proxy", type=int, default=PROXY, help="proxy images left out of the float models' training")
    ap.add_argument("--weight-bits", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--act-bits", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    ap.add_argument("--oracle-images", type=int, default=1000)
    ap.add_argument("--oracle-finetune-steps", type=int, default=0, help="> 0: the short-fine-tune oracle too")
    ap.add_argument("--finetune-settings", nargs="*", default=None,
                    help="dataset/model/budget names to fine-tune (default: the --auto-finetune best PTQ headroom)")
    ap.add_argument("--auto-finetune", type=int, default=0, help="fine-tune the N settings with the most PTQ headroom")
    ap.add_argument("--finetune-epochs", type=int, nargs="*", default=[1])
    ap.add_argument("--finetune-seeds", type=int, default=3)
    ap.add_argument("--finetune-images", type=int, default=0, help="class-balanced training subset (0: all)")
    ap.add_argument("--kd", action="store_true", help="distil from the float model while fine-tuning")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = CACHE / "headroom"
    settings: dict[str, dict] = {}
    for dataset, model in itertools.product(args.datasets, args.models):  # pass 1: post-training, everywhere
        base = root / f"{dataset}_{model}"
        if args.report_only and not (base / "sensitivity" / "sensitivity.json").exists():
            continue
        # the search-quality benchmark searches on a 1,000-image proxy (seed 0) from this float model: leave it out
        fl = float_model(base, model, dataset, args.float_epochs, exclude_proxy=args.proxy, proxy_seed=0)
        table = oracle_table(base, dataset, args, finetune_steps=0)
        for bname in args.budgets:
            settings[f"{dataset}/{model}/{bname}"] = prepare_setting(base, dataset, model, bname, table, fl["top1"])
    ptq_headroom = {n: max(s["ptq_top1"].values()) - min(s["ptq_top1"].values()) for n, s in settings.items()}
    chosen = args.finetune_settings if args.finetune_settings is not None else sorted(
        ptq_headroom, key=ptq_headroom.get, reverse=True)[:args.auto_finetune]
    for name in chosen:  # pass 2: the short-fine-tune oracle where the fine-tunes run
        if args.oracle_finetune_steps and not args.report_only and name in settings:
            dataset, model, bname = name.split("/")
            base = Path(settings[name]["base"])
            table = oracle_table(base, dataset, args, finetune_steps=args.oracle_finetune_steps)
            settings[name] = prepare_setting(base, dataset, model, bname, table, settings[name]["float_top1"])
    for name, s in settings.items():
        dataset = name.split("/")[0]
        base = Path(s["base"])
        for epochs in args.finetune_epochs:
            tag = f"e{epochs}{'-kd' if args.kd else ''}{'-n' + str(args.finetune_images) if args.finetune_images else ''}"
            acc: dict[str, dict[int, float]] = {}  # policy -> seed -> top-1
            for label, p in s["policies"].items():
                for seed in range(args.finetune_seeds):
                    run = base / "finetune" / f"{Path(p).stem}-{tag}-ft{seed}" / "finetune.json"
                    if args.report_only or name not in chosen:
                        if run.exists():
                            acc.setdefault(label, {})[seed] = json.loads(run.read_text())["top1"]
                        continue
                    rep = finetune(base, Path(p), dataset, seed, epochs, base / "float" / "float.pt",
                                   args.finetune_images or None, args.kd, tag)
                    acc.setdefault(label, {})[seed] = rep["top1"]
            # paired by seed: the seeds every policy of the setting has (settings may have different numbers)
            common = sorted(set.intersection(*(set(v) for v in acc.values()))) if acc else []
            if len(acc) == len(s["policies"]) and len(common) >= 2:
                s["finetune"][tag] = summarise({k: [v[sd] for sd in common] for k, v in acc.items()}, s["predicted"])
                s["finetune"][tag]["seed_ids"] = common
    write_result("headroom", "python benchmarks/headroom.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v not in (None, False, [])), vars(args) | {
        "budgets": {k: v.describe() for k, v in BUDGETS.items()}, "target": "ort", "reference_policy": "W3A3",
        "ratio_definition": "none"}, {"settings": settings, "ptq_headroom": ptq_headroom, "finetuned": chosen})
    write_markdown(settings)
    return 0


def summarise(acc: dict[str, list[float]], predicted_: dict[str, dict[str, float]]) -> dict:
    """Return the setting's fine-tuned comparison: means, paired best-worst / best-uniform, oracle rank agreement."""
    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    uniforms = [k for k in acc if k.startswith("uniform")]
    best_uniform = max(uniforms, key=mean.get) if uniforms else None
    out: dict = {"mean_top1": mean, "seeds": len(next(iter(acc.values()))), "pairs": {}}
    kinds = list(next(iter(predicted_.values())))
    for kind in kinds:
        if f"{kind}-best" in acc:
            out["pairs"][f"{kind}: best - worst"] = paired(acc[f"{kind}-best"], acc[f"{kind}-worst"])
            if best_uniform:
                out["pairs"][f"{kind}: best - {best_uniform}"] = paired(acc[f"{kind}-best"], acc[best_uniform])
        labels = list(acc)
        out.setdefault("oracle_spearman", {})[kind] = spearman([-predicted_[k][kind] for k in labels],
                                                               [mean[k] for k in labels])
    return out


def write_markdown(settings: dict) -> None:
    """Write benchmarks/results/headroom.md: one row per setting, oracle and fine-tune length."""
    lines = ["# Headroom: does the policy matter? (top-1 %, paired differences in points with 95% intervals)", "",
             "| setting | float | fine-tune | oracle best | oracle worst | best uniform | random (mean) | "
             "best - worst | best - best uniform | oracle Spearman |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in settings.items():
        rows = [("none (PTQ)", s["ptq_top1"], None)] + [(f"{tag}, {f['seeds']} seeds", f["mean_top1"], f)
                                                        for tag, f in s["finetune"].items()]
        for tag, acc, f in rows:
            uni = {k: v for k, v in acc.items() if k.startswith("uniform")}
            bu = max(uni, key=uni.get) if uni else None
            uniform = f"{bu.removeprefix('uniform-')} {100 * uni[bu]:.2f}" if bu else "-"
            rnd = [v for k, v in acc.items() if k.startswith("random")]
            for kind in ("ptq", "finetune", "hessian"):
                best, worst = acc.get(f"{kind}-best"), acc.get(f"{kind}-worst")
                if best is None:
                    continue
                if f:
                    bw = _fmt_pair(f["pairs"].get(f"{kind}: best - worst"))
                    bb = _fmt_pair(f["pairs"].get(f"{kind}: best - {bu}")) if bu else "-"
                    rho = _fmt(f.get("oracle_spearman", {}).get(kind))
                else:
                    bw = f"{100 * (best - worst):+.2f}"
                    bb = f"{100 * (best - uni[bu]):+.2f}" if bu else "-"
                    rho = ""
                lines.append(f"| {name} ({kind} oracle) | {100 * s['float_top1']:.2f} | {tag} | {100 * best:.2f} | "
                             f"{100 * worst:.2f} | {uniform} | {100 * statistics.fmean(rnd):.2f} | {bw} | {bb} | {rho} |")
    (RESULTS / "headroom.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _fmt_pair(p: dict | None) -> str:
    if not p:
        return "-"
    ci = p["ci95"]
    return f"{100 * p['mean']:+.2f}" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")


if __name__ == "__main__":
    raise SystemExit(main())
