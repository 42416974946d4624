"""Shared builders for the export tests: tiny fine-tuned checkpoints and policies on disk."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from asga_deploy.io import atomic_torch_save, provenance
from asga_deploy.models import create_model
from asga_deploy.policy import LayerBits, Policy, uniform_policy
from asga_deploy.quant import apply_policy, calibrate

FAKE = "fake:classes=10,size=28,chans=1,train=32,test=64,seed=0"


def make_checkpoint(tmp: Path, model_name: str = "tinynet", w: int = 8, a: int = 8, target: str = "ort",
                    policy: Policy | None = None, seed: int = 0, dataset: str = FAKE) -> tuple[Path, Path, Policy]:
    """Write <tmp>/<stem>.json and a finetuned.pt (random weights, calibrated on random data)."""
    torch.manual_seed(seed)
    pol = policy or uniform_policy(model_name, w, a, target)
    stem = f"{pol.model}-w{w}a{a}-{pol.target}"
    ppath = pol.save(tmp / f"{stem}.json", force=True)
    chans, size = pol.cost["input_shape"][0], pol.cost["input_shape"][-1]
    model = create_model(pol.model, num_classes=10, in_chans=chans)
    trained = copy.deepcopy(Policy.load(ppath))
    apply_policy(model, trained)
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    calibrate(model, [torch.randn(32, chans, size, size)])
    ckpt = {"kind": "finetuned", "model": model.state_dict(), "policy": trained.to_dict(),
            "model_name": pol.model, "num_classes": 10, "in_chans": chans, "input_size": size,
            "dataset": dataset, "config": {}, "metrics": {},
            "provenance": json.loads(json.dumps(provenance(command="test"), default=str))}
    cpath = atomic_torch_save(ckpt, tmp / stem / "finetuned.pt")
    return ppath, cpath, pol


MIXED = ((4, 2), (3, 3), (5, 4), (2, 5), (6, 6), (4, 6))  # (w, a) cycled over the searched layers


def mixed_policy(model_name: str, target: str = "ort") -> Policy:
    """Return a mixed policy: the searched layers cycle through W2..6 and A2..6, the edges at the target's best."""
    pol = uniform_policy(model_name, 8, 8, target)
    for i, n in enumerate(n for n in list(pol.layers) if n not in pol.cost["excluded"]):
        w, a = MIXED[i % len(MIXED)]
        pol.layers[n] = LayerBits(w, a, pol.layers[n].act_signed)
    return pol


def random_loader(shape, n: int = 64, batch: int = 32, seed: int = 0):
    """Return a list of (images, labels) batches of random data."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *shape), generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n // batch)]


def test_an_accuracy_only_parity_failure_of_a_float_prefixed_graph_says_why_and_how_on():
    """A float layer ahead of quantized ones rounds differently in ORT's optimized graph, its literal one and torch:
    a few images flip at quantizer ties (a searched ResNet-20: 2 of 1,000). When only the accuracy criterion fails
    there, the error says so and names the options; otherwise it adds nothing."""
    from asga_deploy.export.ort import ParityConfig
    from asga_deploy.export.run import ties_hint

    def report(agree_fq: float, acc: float) -> dict:
        return {"images": 1000, "top1_agreement": 1.0, "accuracy_diff_points": acc,
                "comparisons": {"ort_vs_fake_quant": {"top1_agreement": agree_fq},
                                "ort_vs_unoptimized": {"identical_fraction": 0.098}}}

    tol = ParityConfig()
    hint = ties_hint(report(0.998, 0.2), tol, all_integer=False)
    assert "2 differing image(s) of 1000" in hint and "--parity-images" in hint and "--max-accuracy-diff" in hint
    assert ties_hint(report(0.998, 0.2), tol, all_integer=True) == ""  # an all-integer graph must be exact
    assert ties_hint(report(0.990, 0.2), tol, all_integer=False) == ""  # agreement failed: not ties alone
    assert ties_hint(report(0.999, 0.1), tol, all_integer=False) == ""  # nothing failed on accuracy
