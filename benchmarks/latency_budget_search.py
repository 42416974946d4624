"""A search with a latency budget and a size budget together, end to end through the CLI: does the exported model
meet both when measured? Not resumable (a few minutes); run on a quiet machine.

    asga lut resnet20-w0.5 --target ort --batch-size 1 --input-size 28 --in-chans 1 --num-classes 10
    asga search ... --budget-latency 1.3xw8a8 --lut <table> --budget-size-mb 0.045 --float-choice
    asga finetune <policy> ... --epochs 1 --train-limit 20000 --kd
    asga export <policy> --checkpoint <finetuned.pt> --latency-seconds 20

The export times the model in the table's timing process beside the table's own W8A8 model, so the result says
whether the machine was in the state the table was measured in.

    python benchmarks/latency_budget_search.py [--out benchmarks/results/latency_budget_search-state]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chain import CACHE, log

from asga_deploy.export.ort import cpu_isa
from asga_deploy.io import atomic_write_json, git_commit, machine_info, versions

FLOAT = CACHE / "headroom" / "fashion-mnist_resnet20-w0.5" / "float" / "float.pt"


def run(args: list[str]) -> float:
    """Run one asga command (the package's CLI in this interpreter); return its wall seconds; stop on failure."""
    cmd = [sys.executable, "-m", "asga_deploy", *args]
    log(" ".join(args[:2]))
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return time.time() - t0


def result(wall: dict, table: dict, pol: dict, report: dict, size_mb: float) -> dict:
    """Return what the run measured: the table's key and checks, the policy, the export's latency and parity."""
    lb, size = report["latency_budget"], pol["cost"]["weight_bytes_total"] / 1e6
    return {"wall_s": wall,
            "lut": {"key": table["key"], "reference_ms": table["reference_ms"], "rest_check": table.get("rest_check"),
                    "timing": table.get("timing")},
            "policy": {"float_layers": pol.get("float_layers"), "cost": pol.get("cost"),
                       "layers": {n: [v["weight_bits"], v["act_bits"]] for n, v in pol["layers"].items()},
                       "latency": pol["provenance"]["metrics"].get("latency"),
                       "diagnostics_failed": pol["provenance"]["metrics"].get("diagnostics_failed")},
            "export": {"latency_budget": lb, "parity": {k: report["parity"].get(k) for k in (
                "top1_agreement", "max_abs_logit_diff", "max_output_steps", "bit_identical")},
                "torch_top1": report["parity"].get("torch_top1"), "onnx_top1": report["parity"].get("onnx_top1"),
                "ort_integer_kernels": report.get("ort_integer_kernels")},
            "size_mb_whole": size,
            "targets_met": {"latency_measured": lb.get("meets_budget"), "size": size <= size_mb,
                            "in_table_state": (lb.get("machine_state") or {}).get("same_state")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "latency_budget_search-state")
    ap.add_argument("--latency", default="1.3xw8a8")
    ap.add_argument("--size-mb", default="0.045")
    args = ap.parse_args()
    if not FLOAT.is_file():
        raise SystemExit(f"{FLOAT} missing: run benchmarks/headroom.py for fashion-mnist/resnet20-w0.5 first")
    work = Path(tempfile.mkdtemp(prefix="asga-latbudget-"))
    lut, name = work / "lut.json", "r20w05-lat"
    wall = {"lut": run(["lut", "resnet20-w0.5", "--target", "ort", "--batch-size", "1", "--input-size", "28",
                        "--in-chans", "1", "--num-classes", "10", "--out", str(lut)])}
    wall["search"] = run(["search", "--model", "resnet20-w0.5", "--dataset", "fashion-mnist", "--subset", "1000",
                          "--float", str(FLOAT), "--objective", "asga", "--target", "ort", "--budget-latency",
                          args.latency, "--lut", str(lut), "--budget-size-mb", args.size_mb, "--float-choice",
                          "--out", str(work), "--name", name, "--run-dir", str(work / "run")])
    policy = work / f"{name}.json"
    wall["finetune"] = run(["finetune", str(policy), "--float", str(FLOAT), "--dataset", "fashion-mnist", "--epochs",
                            "1", "--train-limit", "20000", "--kd", "--out", str(work)])
    wall["export"] = run(["export", str(policy), "--checkpoint", str(work / name / "finetuned.pt"), "--out",
                          str(work / "export"), "--latency-seconds", "20"])
    pol = json.loads(policy.read_text())
    report = json.loads((work / "export" / "report.json").read_text())
    table = json.loads(lut.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(policy, args.out / "policy.json")
    lb = report["latency_budget"]
    atomic_write_json(args.out / "result.json", {
        "benchmark": "latency_budget_search", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(), "command": "python " + " ".join(sys.argv), "machine": machine_info(),
        "versions": versions(),
        "settings": {"budgets": {"latency": args.latency, "size_mb": float(args.size_mb)}, "isa": cpu_isa(),
                     "float_checkpoint": str(FLOAT), "allow_diagnostics": False,
                     "ratio_definition": "measured / predicted latency of the exported policy"},
        "results": result(wall, table, pol, report, float(args.size_mb)),
        "ratio": lb["measured_ms"] / lb["predicted_ms"] if lb.get("status") == "measured" else None})
    print(json.dumps({"latency_budget": lb, "size_mb_whole": pol["cost"]["weight_bytes_total"] / 1e6}, indent=1))


if __name__ == "__main__":
    main()
