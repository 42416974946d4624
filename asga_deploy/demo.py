"""`asga demo`: the whole chain on a real dataset, each step reusing what an earlier run left.

float training -> ASGA search on a class-balanced proxy at a BitOPs budget -> QAT fine-tuning of the
searched policy, of the uniform policies of the same BitOPs and of W8A8 -> exact ONNX QDQ export with
parity -> ONNX Runtime latency of every model against fp32, alternated in one run -> report.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import data as D
from .budget import Budget
from .cost import layer_costs
from .errors import OptionError
from .export.onnx_qdq import export_float
from .export.ort import ParityConfig, default_threads
from .export.run import ExportConfig, run_export
from .finetune import FinetuneConfig, run_finetune
from .io import atomic_write_json, check_output_dir, machine_info, provenance, versions
from .lut.measure import TimingConfig, median_times
from .lut.units import Unit
from .models import create_model, model_info
from .naming import artifact_stem, uniform_stem
from .policy import Policy, model_cost_table, uniform_policy
from .progress import Callback, ProgressEvent, emit
from .report.demo import write_report
from .search.proxy import proxy_data
from .search.run import SearchConfig, run_search
from .targets import get_target
from .train import TrainConfig, run_train
from .validate import SEED_MAX, check_int, check_number


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo; recorded in demo.json."""

    model: str = "smallcnn"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    budget_bitops: float = 0.125  # W4A2 / W2A4 uniform: where uniform quantization visibly loses accuracy
    proxy_size: int = 1000
    train_epochs: int = 3
    search_epochs: int = 15
    search_init: str = "float"  # "float": the trained float model; "scratch"
    finetune_epochs: int = 1
    target: str = "ort"
    seed: int = 0
    parity_images: int = 1000
    latency_batches: tuple[int, ...] = (1, 32)
    latency_rounds: int = 20
    latency_iters: int = 20  # most runs of one model per round (each round gives it about 20 ms)
    out_dir: str = "export/demo"
    redo: bool = False


def _step(callback, name: str, message: str) -> float:
    emit(callback, ProgressEvent("info", "demo", message=f"[{name}] {message}"))
    return time.perf_counter()


def check_demo(cfg: DemoConfig) -> Path:
    """Validate every setting, the data and the output folder before anything is trained; return the folder."""
    for k in ("proxy_size", "train_epochs", "search_epochs", "finetune_epochs", "parity_images", "latency_rounds",
              "latency_iters"):
        check_int(k.replace("_", "-"), getattr(cfg, k), 1)
    check_int("--seed", cfg.seed, 0, SEED_MAX)
    check_number("--budget-bitops", cfg.budget_bitops, 0, 1, lo_open=True)
    if cfg.search_init not in ("float", "scratch"):
        raise OptionError(f"search_init {cfg.search_init!r} unknown; choose float or scratch")
    root = check_output_dir(cfg.out_dir)
    spec = D.dataset_spec(cfg.dataset, cfg.data_dir)  # fails early, naming where it looked
    model_info(cfg.model)
    target = get_target(cfg.target)
    budget = Budget.from_options(bitops=cfg.budget_bitops)
    table = model_cost_table(cfg.model, spec.num_classes, spec.in_chans, spec.input_size)
    budget.check_feasible(table, {n: [(w, a) for w in target.weight_bits
                                      for a in target.act_bits(table.layers[n].input_signed)] for n in table.counted})
    train = D.get_dataset(cfg.dataset, "train", cfg.data_dir)  # reads (and checks) the files now, not after training
    D.get_dataset(cfg.dataset, "test", cfg.data_dir)
    if cfg.proxy_size > len(train):
        raise OptionError(f"--proxy-size {cfg.proxy_size}: {cfg.dataset} holds only {len(train)} training images; "
                          "choose a smaller proxy")
    return root


def run_demo(cfg: DemoConfig, callback: Callback | None = None) -> dict:
    """Run the chain; return the summary (also written to <out>/demo.json and report.md)."""
    root = check_demo(cfg)
    spec = D.dataset_spec(cfg.dataset, cfg.data_dir)
    target = get_target(cfg.target)
    budget = Budget.from_options(bitops=cfg.budget_bitops)
    in_chans, size = spec.in_chans, spec.input_size
    table = model_cost_table(cfg.model, spec.num_classes, in_chans, size)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. float model
    t0 = _step(callback, "train", f"float {cfg.model} on {cfg.dataset}, {cfg.train_epochs} epochs")
    float_dir = root / "float"
    if (float_dir / "train.json").exists() and not cfg.redo:
        train_report = json.loads((float_dir / "train.json").read_text())
    else:
        tcfg = TrainConfig(model=cfg.model, dataset=cfg.dataset, data_dir=cfg.data_dir, epochs=cfg.train_epochs,
                           seed=cfg.seed, out_dir=str(root), run="float")
        resume = (float_dir / "float.pt").exists() and not cfg.redo
        train_report = run_train(tcfg, resume=resume, force=cfg.redo, callback=callback).report
    float_ckpt = float_dir / "float.pt"
    times["train_s"] = time.perf_counter() - t0

    # 2. ASGA search on the proxy
    stem = artifact_stem(cfg.model, "asga", budget.tag(), cfg.target)
    pol_dir = root / "policies"
    searched = pol_dir / f"{stem}.json"
    t0 = _step(callback, "search", f"ASGA on a {cfg.proxy_size}-image proxy, budget {100 * cfg.budget_bitops:g}% "
                                   f"of W8A8 BitOPs, target {cfg.target}")
    if not searched.exists() or cfg.redo:
        scfg = SearchConfig(model=cfg.model, dataset=cfg.dataset, subset=cfg.proxy_size, objective="asga",
                            epochs=cfg.search_epochs, seed=cfg.seed, target=cfg.target,
                            budget_bitops=cfg.budget_bitops,
                            init=str(float_ckpt) if cfg.search_init == "float" else "scratch",
                            allow_diagnostics=True)  # recorded in the policy's metrics and the report
        run_dir = root / "search"
        resume = (run_dir / "checkpoint.pt").exists() and not cfg.redo
        run_search(scfg, proxy_data(scfg, cfg.data_dir), out_dir=pol_dir, run_dir=run_dir, callback=callback,
                   resume=resume, force=cfg.redo or not resume, name=stem, command="asga demo")
    times["search_s"] = time.perf_counter() - t0

    # 3. the policies to compare: searched, uniform at the same BitOPs, W8A8
    policies = {"ASGA": searched}
    for w, a in budget.uniform_matches(table, target) + [target.highest(False)]:
        p = pol_dir / f"{uniform_stem(cfg.model, w, a, cfg.target)}.json"
        if not p.exists() or cfg.redo:
            uniform_policy(cfg.model, w, a, cfg.target, spec.num_classes, in_chans, size).save(p, force=True)
        policies[f"W{w}A{a}"] = p

    # 4. fine-tune and 5. export each
    rows = []
    for label, path in policies.items():
        pstem = path.stem
        t0 = _step(callback, "finetune", f"{label} ({pstem}), {cfg.finetune_epochs} epochs")
        ft_json = root / pstem / "finetune.json"
        if ft_json.exists() and not cfg.redo:
            ft = json.loads(ft_json.read_text())
        else:
            fcfg = FinetuneConfig(policy=str(path), float_checkpoint=str(float_ckpt), dataset=cfg.dataset,
                                  data_dir=cfg.data_dir, epochs=cfg.finetune_epochs, seed=cfg.seed, out_dir=str(root))
            resume = (root / pstem / "finetuned.pt").exists() and not cfg.redo
            ft = run_finetune(fcfg, resume=resume, force=cfg.redo, callback=callback).report
        times[f"finetune_{pstem}_s"] = time.perf_counter() - t0
        t0 = _step(callback, "export", f"{label}: ONNX QDQ for {cfg.target}, parity on {cfg.parity_images} images")
        rep_path = root / pstem / "report.json"
        if rep_path.exists() and not cfg.redo and json.loads(rep_path.read_text()).get("status") == "ok":
            rep = json.loads(rep_path.read_text())
        else:
            ecfg = ExportConfig(policy=str(path), checkpoint=str(root / pstem / "finetuned.pt"), target=cfg.target,
                                out_dir=str(root / pstem), data_dir=cfg.data_dir,
                                parity=ParityConfig(images=cfg.parity_images))
            rep = run_export(ecfg, force=True, callback=callback)
        times[f"export_{pstem}_s"] = time.perf_counter() - t0
        pol = Policy.load(path)
        rows.append({"label": label, "policy": str(path), "top1": ft["top1"], "float_top1": ft["float_top1"],
                     "bitops_vs_w8a8": pol.cost["bitops_vs_w8a8"], "weight_bytes": pol.cost["weight_bytes"],
                     "weight_bytes_total": pol.cost["weight_bytes_total"], "onnx": rep["onnx"],
                     "onnx_bytes": rep["sizes"].get("file_bytes"),
                     "parity_agreement": rep["parity"]["top1_agreement"],
                     "integer_layers": _integer_count(rep), "session_config": rep.get("ort_session_config") or {}})

    # 6. latency: fp32 ONNX of the float model vs every quantized ONNX, alternated in one run
    t0 = _step(callback, "latency", f"ONNX Runtime, batches {list(cfg.latency_batches)}, "
                                    f"{cfg.latency_rounds} alternating rounds")
    fp32 = float_dir / "model.fp32.onnx"
    if not fp32.exists() or cfg.redo:
        export_float(float_ckpt, fp32)
    lat = shared_pool_latency({"float": str(fp32), **{r["label"]: r["onnx"] for r in rows}}, cfg.latency_batches,
                              cfg.latency_rounds, cfg.latency_iters, (in_chans, size, size),
                              {k: v for r in rows for k, v in r["session_config"].items()})
    times["latency_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_all
    summary = {"config": asdict(cfg), "float": {"top1": train_report["top1"], "epochs": cfg.train_epochs,
                                                "weight_bytes_total": _float_bytes(cfg.model, spec.num_classes, in_chans, size)},
               "rows": rows, "latency": lat, "times": times, "machine": machine_info(), "versions": versions(),
               "provenance": provenance(command="asga demo")}
    atomic_write_json(root / "demo.json", summary)
    write_report(summary, root)
    return summary


def shared_pool_latency(models: dict[str, str], batches, rounds: int, max_runs: int, shape: tuple[int, int, int],
                        session_config: dict[str, str]) -> dict:
    """Return per-model, per-batch median latency (ms) over alternating rounds, and speed-ups over 'float'.

    Timed in a fresh process whose sessions share ONE intra-op thread pool (lut/worker.py): with a pool per
    session, the idle sessions' threads spin while another one runs and alternating timings come out bimodal.
    """
    threads = default_threads()
    units = {k: Unit(k, Path(p).read_bytes(), shape, "float32") for k, p in models.items()}
    tcfg = TimingConfig(rounds=rounds, target_ms=20.0, max_runs=max_runs, threads=threads,
                        session_config=tuple(sorted(session_config.items())))
    out: dict = {"threads": threads, "rounds": rounds, "iters_per_round": f"about 20 ms, at most {max_runs} runs",
                 "thread_pool": "one shared pool", "batches": {}}
    for b in batches:
        t = median_times(units, b, tcfg)
        med = {k: float(t[k]["median_ms"]) for k in models}
        out["batches"][str(b)] = {"median_ms": med, "vs_float": {k: v / med["float"] for k, v in med.items()}}
    return out


def _integer_count(rep: dict) -> str:
    k = rep.get("ort_integer_kernels") or {}
    layers = k.get("layers", {})
    return f"{sum(1 for v in layers.values() if v.get('integer'))}/{len(layers)}" if layers else "n/a"


def _float_bytes(model: str, num_classes: int, in_chans: int, size: int) -> float:
    costs = layer_costs(create_model(model, num_classes, in_chans), (in_chans, size, size))
    return float(sum(c.params for c in costs.values()) * 4)
