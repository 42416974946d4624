"""Cached steps shared by the transfer and front benchmarks: every result is a file, skipped when present.

Run the benchmarks in the background across sittings: an interrupted step resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from asga_deploy.budget import Budget
from asga_deploy.io import atomic_write_json, git_commit, machine_info, versions
from asga_deploy.naming import artifact_stem

CACHE = Path(__file__).resolve().parent / "cache"
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    """Print a timestamped progress line (benchmarks are scripts, not library code)."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def wait_for_quiet(max_load: float, patience_s: int, sleep_s: float = 20.0) -> float:
    """Wait until the 1-minute load average is below max_load (other jobs share the machine); return it. For
    timing benchmarks: raise SystemExit when it stays above for patience_s seconds (the timing would be noise)."""
    t0 = time.time()
    while (load := os.getloadavg()[0]) >= max_load:
        if time.time() - t0 > patience_s:
            raise SystemExit(f"load {load:.2f} stayed above {max_load} for {patience_s} s: timing would be noise")
        log(f"load {load:.2f} >= {max_load}: waiting")
        time.sleep(sleep_s)
    return load


def float_model(root: Path, model: str, dataset: str, epochs: int, seed: int = 0, exclude_proxy: int | None = None,
                proxy_seed: int = 0) -> dict:
    """Train (or reuse) the float model (without the search proxy's images when exclude_proxy); return train.json."""
    from asga_deploy.train import TrainConfig, run_train

    rep = root / "float" / "train.json"
    if rep.exists():
        return json.loads(rep.read_text())
    log(f"train float {model} {epochs} epochs" + (f", proxy of {exclude_proxy} left out" if exclude_proxy else ""))
    cfg = TrainConfig(model=model, dataset=dataset, epochs=epochs, seed=seed, out_dir=str(root), run="float",
                      exclude_proxy=exclude_proxy, proxy_seed=proxy_seed)
    return run_train(cfg, resume=(root / "float" / "float.pt").exists()).report


def budget_of(ratio: float) -> Budget:
    """Return the BitOPs budget (ratio of W8A8) the benchmarks use."""
    return Budget.from_options(bitops=ratio)


def search_stem(model: str, tag: str, budget: float, seed: int) -> str:
    """Return the stem of a benchmark's search: the package's naming rule with the seed."""
    return artifact_stem(model, tag, budget_of(budget).tag(), seed=seed)


def search(root: Path, model: str, dataset: str, objective: str, seed: int, budget: float, subset: int | None,
           epochs: int, float_ckpt: Path, tag: str | None = None, allow_diagnostics: bool = False,
           **overrides) -> dict:
    """Search (or reuse) a policy; return {"policy": path, "metrics", "wall_s", "steps"}."""
    from asga_deploy.search.proxy import proxy_data
    from asga_deploy.search.run import SearchConfig, run_search

    tag = tag or objective
    cfg = SearchConfig(**{"model": model, "dataset": dataset, "subset": subset, "objective": objective,
                          "epochs": epochs, "seed": seed, "target": "ort", "budget_bitops": budget,
                          "init": str(float_ckpt), "allow_diagnostics": allow_diagnostics} | overrides)
    name = artifact_stem(model, tag, cfg.budget().tag(), seed=seed)  # = search_stem() for a BitOPs ratio
    pol_path = root / "policies" / f"{name}.json"
    meta_path = root / "policies" / f"{name}.meta.json"
    if pol_path.exists() and meta_path.exists():
        return json.loads(meta_path.read_text())
    log(f"search {name} (subset {subset}, {epochs} epochs)")
    run_dir = root / "search" / name
    t0 = time.perf_counter()
    res = run_search(cfg, proxy_data(cfg), out_dir=root / "policies", run_dir=run_dir, name=name, force=True,
                     resume=(run_dir / "checkpoint.pt").exists(), command=f"benchmark {tag}")
    meta = {"policy": str(pol_path), "metrics": res.metrics, "wall_s": time.perf_counter() - t0,
            "objective": objective, "tag": tag, "seed": seed, "subset": subset, "epochs": epochs,
            "allow_diagnostics": allow_diagnostics, "diagnostics_failed": res.metrics.get("diagnostics_failed", []),
            "overrides": overrides}
    atomic_write_json(meta_path, meta)
    return meta


def search_log(root: Path, stem: str) -> list[dict]:
    """Return the per-step records of the cached search that wrote policy <stem>."""
    text = (root / "search" / stem / "log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def finetune(root: Path, policy: Path, dataset: str, seed: int, epochs: int, float_ckpt: Path,
             train_limit: int | None = None, kd: bool = False, tag: str = "") -> dict:
    """Fine-tune (or reuse) a policy with one seed (on a seeded class-balanced subset of train_limit images, if
    given; distilling from the float model with kd); return finetune.json. `tag` separates recipes in the cache."""
    from asga_deploy.finetune import FinetuneConfig, run_finetune

    run = f"{policy.stem}{'-' + tag if tag else ''}-ft{seed}"
    rep = root / "finetune" / run / "finetune.json"
    if rep.exists():
        return json.loads(rep.read_text())
    log(f"finetune {run} ({epochs} epochs, {train_limit or 'all'} training images{', kd' if kd else ''})")
    cfg = FinetuneConfig(policy=str(policy), float_checkpoint=str(float_ckpt), dataset=dataset, epochs=epochs,
                         seed=seed, out_dir=str(root / "finetune"), run=run, train_limit=train_limit, kd=kd)
    return run_finetune(cfg, resume=(root / "finetune" / run / "finetuned.pt").exists()).report


def spread(values: list[float]) -> dict:
    """Return mean, standard deviation (0 for one value), min, max and count."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def paired(a: list[float], b: list[float]) -> dict:
    """Return the paired difference a - b (same seeds): mean, its 95% t-interval and whether it excludes 0."""
    from scipy.stats import t

    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "ci95": None, "n": len(d), "excludes_zero": False}
    half = float(t.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / len(d) ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half], "half_width": half, "n": len(d),
            "excludes_zero": mean - half > 0 or mean + half < 0}


def write_result(name: str, command: str, settings: dict, results: dict, ratio: float | None = None) -> Path:
    """Write benchmarks/results/<name>.json in the format of benchmarks.md."""
    return atomic_write_json(RESULTS / f"{name}.json", {
        "benchmark": name, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(), "command": command, "machine": machine_info(), "versions": versions(),
        "settings": settings, "results": results, "ratio": ratio})
