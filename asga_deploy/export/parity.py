"""Parity: ONNX Runtime (all optimizations) vs ONNX Runtime (none) vs the torch references, on real images.

The references (both torch, both BN-folded with the bias on its INT32 grid):
  - the integer reference (reference.py): every integer node unit computed as ORT's kernels round it;
    ORT with its default optimizations must match it to within `max_output_steps` logit steps (the logit
    step of class c is s_x s_w[c] of a QGemm classifier), bit for bit where every unit is integer;
  - the fake-quant model (float convs, a division by the output scale): the trained function; ORT must
    agree with its top-1 on `min_agreement` of the images and its accuracy within `max_accuracy_diff`.
ORT with optimizations disabled runs the QDQ graph literally in float: comparing it catches graph
rewrites that change values (Q/DQ pairs merged, kernels that saturate) beside ties that round differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .ort import ParityConfig, cpu_isa, recorded_session_config, session


def _batches(loader: Iterable, limit: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    seen = 0
    for b in loader:
        x, y = (b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None)
        if seen >= limit:
            break
        take = min(len(x), limit - seen)
        seen += take
        yield x[:take], (None if y is None else torch.as_tensor(y)[:take])


def compare(a: np.ndarray, b: np.ndarray, step: np.ndarray | None) -> dict:
    """Return how two logit arrays (N, classes) differ: top-1 agreement, max/median |diff|, in logit steps."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    out = {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_abs_diff": float(d.max()),
           "median_abs_diff": float(np.median(d)), "identical_fraction": float((d == 0).mean())}
    if step is not None:
        steps = d / step.reshape(1, -1)
        out.update(max_steps=float(steps.max()), within_one_step_fraction=float((steps <= 1.0).mean()))
    return out


@torch.no_grad()
def parity(fake_quant: torch.nn.Module, integer_ref: torch.nn.Module, onnx_model: str | Path | bytes,
           loader: Iterable, cfg: ParityConfig = ParityConfig(), step: np.ndarray | None = None,
           all_integer: bool = True) -> dict:
    """Return ORT (all optimizations / none) vs the integer reference and the fake-quant model on real images.

    step: the logit step per class (None for a float classifier); all_integer: ORT runs every unit on an
    integer kernel, so its logits must be within `cfg.max_output_steps` of the integer reference's (where
    some layer runs in float, its float rounding decides ties and only the top-1 criteria apply).
    """
    runs = {"ort": session(onnx_model, cfg.threads), "ort_unoptimized": session(onnx_model, cfg.threads, level="none")}
    name = runs["ort"].get_inputs()[0].name
    logits: dict[str, list] = {k: [] for k in ("ort", "ort_unoptimized", "integer_reference", "fake_quant")}
    labels: list | None = []
    for x, y in _batches(loader, cfg.images):
        xt = x.float().cpu()
        for k, sess in runs.items():
            logits[k].append(sess.run(None, {name: xt.numpy()})[0])
        logits["integer_reference"].append(integer_ref.eval()(xt).numpy())
        logits["fake_quant"].append(fake_quant.eval()(xt).numpy())
        labels = None if (y is None or labels is None) else [*labels, y.numpy()]
    if not logits["ort"]:
        raise ExportError("parity: the test data yielded no images")
    out = {k: np.concatenate(v) for k, v in logits.items()}
    main = compare(out["ort"], out["integer_reference"], step)
    res = {"images": len(out["ort"]), "reference": "integer reference (ORT's integer kernels' rounding)",
           "top1_agreement": main["top1_agreement"], "max_abs_logit_diff": main["max_abs_diff"],
           "median_abs_logit_diff": main["median_abs_diff"], "max_output_steps": main.get("max_steps"),
           "bit_identical": main["max_abs_diff"] == 0.0, "logit_step": None if step is None else step.tolist(),
           "comparisons": {"ort_vs_integer_reference": main,
                           "ort_vs_unoptimized": compare(out["ort"], out["ort_unoptimized"], step),
                           "unoptimized_vs_fake_quant": compare(out["ort_unoptimized"], out["fake_quant"], step),
                           "ort_vs_fake_quant": compare(out["ort"], out["fake_quant"], step)},
           "session_config": recorded_session_config(runs["ort"]), "isa": cpu_isa()}
    fq = res["comparisons"]["ort_vs_fake_quant"]
    if labels is not None:
        yn = np.concatenate(labels)
        ct, co = int((out["fake_quant"].argmax(1) == yn).sum()), int((out["ort"].argmax(1) == yn).sum())
        res.update(torch_top1=ct / len(yn), onnx_top1=co / len(yn), accuracy_diff_points=abs(100.0 * (ct - co) / len(yn)))
    steps_ok = main.get("max_steps", 0.0) <= cfg.max_output_steps if (step is not None and all_integer) else True
    res["steps_checked"] = bool(step is not None and all_integer)
    res["passed"] = bool(steps_ok and main["top1_agreement"] >= cfg.min_agreement
                         and fq["top1_agreement"] >= cfg.min_agreement
                         and res.get("accuracy_diff_points", 0.0) <= cfg.max_accuracy_diff)
    res["tolerance"] = {"min_agreement": cfg.min_agreement, "max_accuracy_diff_points": cfg.max_accuracy_diff,
                        "max_output_steps": cfg.max_output_steps}
    return res
