"""Every shipped `ort` policy exported as `asga export` does: integer kernels and bit identity on real test images.

For each policies/*.json whose target is `ort`: the model's float checkpoint (trained a few epochs on
Fashion-MNIST, from benchmarks/cache), the policy applied and calibrated on 4 batches of 64 training images
(post-training: exactness does not depend on fine-tuning), written as a fine-tuned checkpoint, then `run_export`
with parity on the first --images Fashion-MNIST test images, default session options. Recorded per policy: the
quantized Conv/Gemm layers on integer kernels, the residual Adds, the requantizations written as QLinearAdd
(export/requant.py), ORT vs the integer reference (logit steps, bit identity, top-1 agreement), ORT vs the
fake-quant model, ORT's optimized graph vs its unoptimized one.

    python benchmarks/shipped_ort.py [--images 1000]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asga_deploy.checkpoint import load_model  # noqa: E402
from asga_deploy.data import get_dataset  # noqa: E402
from asga_deploy.export.ort import ParityConfig, cpu_isa  # noqa: E402
from asga_deploy.export.run import ExportConfig, run_export  # noqa: E402
from asga_deploy.io import (  # noqa: E402
    atomic_torch_save,
    atomic_write_json,
    git_commit,
    machine_info,
    provenance,
    versions,
)
from asga_deploy.policy import Policy  # noqa: E402
from asga_deploy.quant import apply_policy, calibrate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "results" / "shipped_ort"
FLOAT = {"smallcnn": "benchmarks/cache/tune-smallcnn/float/float.pt",
         "resnet20": "benchmarks/cache/tune-resnet20/float/float.pt"}


def calibrated_checkpoint(policy_path: Path, float_path: Path, out: Path) -> Path:
    """Write a fine-tuned-kind checkpoint: the float model with the policy applied, calibrated on 4 x 64 images."""
    pol = Policy.load(policy_path)
    model, ckpt = load_model(float_path, "float")
    trained = copy.deepcopy(pol)
    apply_policy(model, trained)
    data = get_dataset(ckpt["dataset"], "train", in_chans=ckpt["in_chans"], input_size=ckpt["input_size"])
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data), generator=g)[:256]
    images = torch.stack([data[int(i)][0] for i in idx])
    calibrate(model.eval(), list(images.split(64)), 4)
    saved = {"kind": "finetuned", "model": model.state_dict(), "policy": trained.to_dict(),
             "model_name": pol.model, "num_classes": ckpt["num_classes"], "in_chans": ckpt["in_chans"],
             "input_size": ckpt["input_size"], "dataset": ckpt["dataset"], "config": {"calibration": "4 x 64 train"},
             "metrics": {}, "provenance": json.loads(json.dumps(provenance(command="shipped_ort"), default=str))}
    return atomic_torch_save(saved, out / "finetuned.pt")


def summary(rep: dict) -> dict:
    """The numbers the results table shows for one export report."""
    k, p = rep["ort_integer_kernels"], rep["parity"]
    c = p["comparisons"]
    return {"status": rep["status"], "layers_integer": k["integer"], "layers": k["total"],
            "adds": sorted({v["kernel"] for v in k["ops"].values() if v["op"] == "Add"}),
            "n_adds": sum(v["op"] == "Add" for v in k["ops"].values()),
            "pooling": sorted({v["kernel"] for v in k["ops"].values() if v["op"] == "GlobalAveragePool"}),
            "requants_qladd": sum(v["integer"] for v in k["requants"].values()), "requants": len(k["requants"]),
            "optimized_ops": k["optimized_ops"], "images": p["images"], "bit_identical": p["bit_identical"],
            "max_output_steps": p["max_output_steps"], "top1_agreement_integer_reference": p["top1_agreement"],
            "top1_agreement_fake_quant": c["ort_vs_fake_quant"]["top1_agreement"],
            "unoptimized_vs_ort": c["ort_vs_unoptimized"], "session_config": p.get("session_config", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted((ROOT / "policies").glob("*.json")):
            pol = Policy.load(path)
            if pol.target != "ort":
                continue
            t0 = time.time()
            work = Path(tmp) / path.stem
            ckpt = calibrated_checkpoint(path, ROOT / FLOAT[pol.model], work)
            rep = run_export(ExportConfig(str(path), str(ckpt), out_dir=str(work / "export"),
                                          parity=ParityConfig(images=args.images)))
            results[path.stem] = {**summary(rep), "seconds": round(time.time() - t0, 1)}
            r = results[path.stem]
            print(f"{path.stem}: {r['layers_integer']}/{r['layers']} integer, requants {r['requants_qladd']}/"
                  f"{r['requants']} QLinearAdd, bit identical {r['bit_identical']}, steps {r['max_output_steps']}, "
                  f"top-1 {r['top1_agreement_integer_reference']:.4f} / {r['top1_agreement_fake_quant']:.4f}",
                  flush=True)
    report = {"benchmark": "shipped_ort", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "git_commit": git_commit(), "command": "python " + " ".join(sys.argv),
              "machine": {**machine_info(), "isa": cpu_isa()}, "versions": versions(),
              "settings": {"policies": "every policies/*.json with target ort",
                           "weights": {m: p for m, p in FLOAT.items()},
                           "calibration": "4 batches of 64 Fashion-MNIST training images (seed 0), no fine-tuning",
                           "parity_images": args.images, "session_options": "defaults (as exported)",
                           "ratio_definition": "fraction of policies with every quantized Conv/Gemm on an integer "
                                               "kernel and logits bit identical to the integer reference"},
              "results": results,
              "ratio": sum(r["layers_integer"] == r["layers"] and r["bit_identical"] for r in results.values())
              / max(len(results), 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), report)
    rows = ["| policy | Conv/Gemm on integer kernels | residual Adds | requantizations as QLinearAdd | ORT vs integer "
            "reference | top-1 agreement (integer ref. / fake-quant) | ORT-unoptimized vs ORT, max logit steps |",
            "|---|---|---|---|---|---|---|"]
    for stem, r in results.items():
        adds = f"{r['n_adds']} {'+'.join(r['adds'])}" if r["n_adds"] else "-"
        exact = "bit identical" if r["bit_identical"] else f"{r['max_output_steps']} steps"
        rows.append(f"| {stem} | {r['layers_integer']}/{r['layers']} | {adds} | {r['requants_qladd']}/{r['requants']} "
                    f"| {exact} | {100 * r['top1_agreement_integer_reference']:.1f}% / "
                    f"{100 * r['top1_agreement_fake_quant']:.1f}% | "
                    f"{r['unoptimized_vs_ort'].get('max_steps', 'n/a')} |")
    args.out.with_suffix(".md").write_text(
        f"# Shipped `ort` policies exported ({report['created_utc']}, {report['machine']['isa']['kind']}, "
        f"{args.images} test images)\n\n" + "\n".join(rows) + "\n")
    print("written", args.out.with_suffix(".json"))


if __name__ == "__main__":
    main()
