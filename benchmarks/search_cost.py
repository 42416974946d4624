"""Search cost: per-step time of `asga` vs `erm` (alternating, same batches), and a default search's wall time.

Run: .venv/bin/python benchmarks/search_cost.py [--steps 40] [--dataset fashion-mnist] [--skip-search]
Writes benchmarks/results/search_cost.json (format: shared/docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from asga_deploy.io import atomic_write_json, git_commit, machine_info, versions
from asga_deploy.search.proxy import proxy_data
from asga_deploy.search.recipe import SearchRecipe
from asga_deploy.search.run import SearchConfig, run_search


def time_steps(cfg: SearchConfig, data, steps: int, tmp: Path, warmup: int = 3) -> dict:
    """Alternate one asga and one erm search step (SearchRecipe.step) on the same batch, order swapped each
    round; return medians."""
    runs = {o: SearchRecipe(replace(cfg, objective=o), data, tmp / o) for o in ("erm", "asga")}
    batches = [b for _, b in zip(range(steps + warmup), _cycle(data), strict=False)]
    times = {o: [] for o in runs}
    for t, (x, y) in enumerate(batches):
        order = ("erm", "asga") if t % 2 == 0 else ("asga", "erm")
        for o in order:
            t0 = time.perf_counter()
            runs[o].step(0, t, x, y, None)
            if t >= warmup:
                times[o].append(time.perf_counter() - t0)
    med = {o: statistics.median(v) for o, v in times.items()}
    q = {o: statistics.quantiles(v, n=4) for o, v in times.items()}
    paired = [a / e for a, e in zip(times["asga"], times["erm"], strict=True)]  # same round: same load
    return {"median_s": med, "quartiles_s": q, "count": {o: len(v) for o, v in times.items()},
            "ratio": med["asga"] / med["erm"], "paired_ratio_median": statistics.median(paired), "all_s": times}


def _cycle(data):
    epoch = 0
    while True:
        yield from data.train(epoch)
        epoch += 1


def main() -> None:
    """Run both measurements and write the result file."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/search_cost.json")
    ap.add_argument("--keep-search", action="store_true",
                    help="with --skip-search: keep the default-search result and earlier step timings of --out")
    args = ap.parse_args()
    earlier = json.loads(Path(args.out).read_text()) if args.keep_search and Path(args.out).is_file() else None
    torch.set_num_threads(2)
    cfg = SearchConfig(model=args.model, dataset=args.dataset, subset=args.subset, epochs=args.epochs,
                       batch_size=args.batch_size, budget_bitops=args.budget, allow_diagnostics=True)
    data = proxy_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        step = time_steps(cfg, data, args.steps, Path(tmp))
    results = {"step_time": {k: v for k, v in step.items() if k != "all_s"}, "step_times_s": step["all_s"]}
    if earlier is not None:
        results["default_search"] = earlier["results"].get("default_search")
        results["step_time_earlier_runs"] = earlier["results"].get("step_time_earlier_runs", []) + [
            {**earlier["results"]["step_time"], "created_utc": earlier["created_utc"],
             "step_times_s": earlier["results"]["step_times_s"]}]
    write(args, cfg, data, results, step["ratio"])  # the step timing survives a search cut short
    if not args.skip_search:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = run_search(cfg, data, Path(tmp) / "policies", Path(tmp) / "run", command="benchmark", force=True)
            wall = time.perf_counter() - t0
            log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]

        per_epoch = {}
        for r in log:
            per_epoch.setdefault(r["epoch"], []).append(r["loss"])
        results["default_search"] = {
            "wall_s": wall, "steps": len(log), "steps_per_epoch": data.steps_per_epoch,
            "median_step_s": statistics.median(r["images_per_s"] and args.batch_size / r["images_per_s"] for r in log),
            "epoch_mean_train_loss": {e: sum(v) / len(v) for e, v in per_epoch.items()},
            "policy_cost": res.policy.cost, "metrics": res.metrics,
            "layers": {n: f"W{b.weight_bits}A{b.act_bits}" for n, b in res.policy.layers.items()}}
    write(args, cfg, data, results, step["ratio"])
    print(json.dumps({"ratio": step["ratio"], "median_s": step["median_s"],
                      "wall_s": results.get("default_search", {}).get("wall_s")}))


def write(args, cfg: SearchConfig, data, results: dict, ratio: float) -> None:
    """Write the result file (benchmarks.md format)."""
    out = {"benchmark": "search_cost",
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
           "command": "python " + " ".join(sys.argv), "machine": machine_info(), "versions": versions(),
           "settings": {"model": args.model, "dataset": args.dataset, "proxy_images": args.subset,
                        "proxy_fingerprint": data.fingerprint, "batch_size": args.batch_size,
                        "timed_steps_each": args.steps, "warmup_steps_each": 3, "epochs": args.epochs,
                        "budget_bitops": args.budget, "search_config": asdict(cfg),
                        "ratio_definition": "median asga step time / median erm step time, same batches, "
                                            "alternating (order swapped every round), one process",
                        "note": "2 shared CPU cores (other engineers' jobs running): absolute times are noisy"},
           "results": {**results, "default_search": results.get("default_search", "not run (yet)")},
           "ratio": ratio}
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
