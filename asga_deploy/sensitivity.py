"""The sensitivity oracle (method.md section 9): what each layer's bit-widths cost in loss, measured.

From a reference policy (default uniform W3A3) and the float model, for every searched layer and every
candidate (w, a) of that layer: the loss increase on held-out training images when that one layer takes
that choice, measured
  - after post-training quantization (`ptq`: calibrate the changed layer, re-estimate BatchNorm),
  - optionally after a SHORT fine-tune (`finetune`: the reference is fine-tuned a few hundred steps,
    then each single-layer change gets the same further steps on the same batches; weights and
    activations are changed separately and added, Delta(w, a) = Delta(w, a_ref) + Delta(w_ref, a)),
  - and as a Hessian estimate (`hessian`, HAWQ-V2: Hutchinson trace per layer times the squared
    quantization error of the weight and of the layer input).
The table is JSON (self-contained: costs, options, reference); `oracle.py` turns it into policies.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import data
from .checkpoint import load_model
from .cost import FLOAT, CostTable, LayerCost, layer_costs
from .errors import AsgaError
from .evaluate import check_classes
from .hessian import hutchinson_traces
from .io import provenance
from .models import edge_layers
from .policy import policy_from_choice
from .progress import Callback, ProgressEvent, emit
from .ptq import loss_and_top1, ptq, reestimate_bn
from .quant.modules import input_quantizer, weight_quantizer
from .search.supernet import DEFAULT_BITS, calibration_sample, check_bits, narrow
from .targets import get_target
from .train import Recipe, optimizer_for

SCHEMA = "asga-sensitivity/1"
KINDS = ("ptq", "finetune", "hessian")


@dataclass(frozen=True)
class SensitivityConfig:
    """What to measure: the float model, data, candidates, reference policy and the three oracles' sizes."""

    float_checkpoint: str
    dataset: str | None = None  # None: the checkpoint's dataset
    data_dir: str | None = None
    target: str = "ort"
    weight_bits: tuple[int, ...] = DEFAULT_BITS
    act_bits: tuple[int, ...] = DEFAULT_BITS
    reference: tuple[int, int] = (3, 3)
    images: int = 2000  # held-out training images the loss is measured on
    calib_images: int = 256
    bn_images: int = 1024
    batch_size: int = 256
    finetune_steps: int = 0  # > 0: also the short-fine-tune table (steps after the single-layer change)
    finetune_warmup: int = 200  # steps of the reference before the changes branch off
    finetune_batch: int = 64
    finetune_lr: float = 0.01
    hessian_samples: int = 4  # Rademacher vectors per batch (0: no Hessian table)
    hessian_images: int = 256
    float_choice: bool = False  # also measure each layer left float (FP32: no quantizer)
    seed: int = 0
    allow_incomplete: bool = False

    def check(self) -> None:
        """Raise AsgaError naming the first out-of-range setting."""
        check_bits(self.weight_bits, "weight")
        check_bits(self.act_bits, "activation")
        check_bits(self.reference, "reference")
        for k in ("images", "calib_images", "bn_images", "batch_size", "finetune_batch", "hessian_images"):
            if getattr(self, k) < 1:
                raise AsgaError(f"{k.replace('_', '-')} {getattr(self, k)} must be at least 1")
        for k in ("finetune_steps", "finetune_warmup", "hessian_samples"):
            if getattr(self, k) < 0:
                raise AsgaError(f"{k.replace('_', '-')} {getattr(self, k)} must be 0 or more")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise AsgaError(f"finetune-lr {self.finetune_lr} must be a positive finite number")


def _batches(ds, idx: list[int], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs, ys = zip(*(ds[i] for i in idx), strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(idx), batch)]


@torch.no_grad()
def _layer_inputs(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Return a calibration sample of the float input each named layer sees in model (eval mode)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: seen[n].append(inp[0].detach())) for n in names]
    was = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return {n: calibration_sample(torch.cat([t.reshape(-1) for t in v])) for n, v in seen.items()}


def _nearest(candidates: list[int], b: int) -> int:
    """Return the largest candidate <= b (the smallest candidate when none is)."""
    lower = [c for c in candidates if c <= b]
    return max(lower) if lower else min(candidates)


def _swap(layer: nn.Module, w: int, a: int, signed: bool, sample: torch.Tensor) -> tuple:
    """Give a quantized layer new weight/input quantizers (MSE-initialised; none for FLOAT); return the old ones."""
    old = (layer.weight_quantizer, layer.input_quantizer)
    if (w, a) == FLOAT:
        layer.weight_quantizer, layer.input_quantizer = nn.Identity(), nn.Identity()
        return old
    if w != old[0].bits:
        layer.weight_quantizer = weight_quantizer(w, layer.weight.shape[0])
        layer.weight_quantizer.init_mse(layer.weight.detach())
    if a != old[1].bits:
        layer.input_quantizer = input_quantizer(a, signed)
        layer.input_quantizer.init_mse(sample)
    return old


def _finetune(model: nn.Module, batches, lr: float) -> nn.Module:
    """Run plain QAT steps (SGD, Nesterov, constant lr, no decay on step sizes) over the given batches."""
    opt = optimizer_for(model, Recipe(epochs=1, batch_size=1, lr=lr, nesterov=True, weight_decay=5e-5))
    model.train()
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def measure(cfg: SensitivityConfig, callback: Callback | None = None, reuse: dict | None = None) -> dict:
    """Return the sensitivity table (JSON-able) of a float checkpoint around the reference policy.

    `reuse`: an earlier table of the same checkpoint, reference and options whose measured oracles are kept
    (e.g. to add the short-fine-tune oracle to a post-training table without measuring that again).
    """
    cfg.check()
    target = get_target(cfg.target)
    model, ckpt = load_model(cfg.float_checkpoint, "float", cfg.allow_incomplete)
    dataset = cfg.dataset or ckpt.get("dataset")
    if not dataset:
        raise AsgaError(f"{cfg.float_checkpoint} does not record its dataset; pass --dataset")
    spec = data.dataset_spec(dataset, cfg.data_dir)
    check_classes(dataset, spec.num_classes, int(ckpt["num_classes"]), cfg.float_checkpoint)
    chans, size = int(ckpt["in_chans"]), int(ckpt.get("input_size") or spec.input_size)
    train = data.get_dataset(dataset, "train", cfg.data_dir, chans, size)
    need = cfg.calib_images + cfg.bn_images + cfg.images
    held, fp = data.proxy_subset(train, need, cfg.seed, dataset, "train")
    perm = torch.randperm(need, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    idx = [held.indices[i] for i in perm]
    calib = _batches(train, idx[:cfg.calib_images], cfg.batch_size)
    bn = _batches(train, idx[cfg.calib_images:cfg.calib_images + cfg.bn_images], cfg.batch_size)
    evals = _batches(train, idx[cfg.calib_images + cfg.bn_images:], cfg.batch_size)
    model.eval()
    costs = layer_costs(model, (chans, size, size), example=calib[0][0])
    edges = edge_layers(model)
    searched = [n for n in costs if n not in edges]
    options = {n: [(w, a) for w in narrow(tuple(cfg.weight_bits), target.weight_bits, True)
                   for a in narrow(tuple(cfg.act_bits), target.act_bits(costs[n].input_signed), True)]
               + ([FLOAT] if cfg.float_choice else []) for n in searched}
    ref_choice = {n: (_nearest([o[0] for o in options[n] if o != FLOAT], cfg.reference[0]),
                      _nearest([o[1] for o in options[n] if o != FLOAT], cfg.reference[1])) for n in searched}
    ref_policy = policy_from_choice(ckpt["model_name"], target.name, costs, ref_choice, (chans, size, size),
                                    int(ckpt["num_classes"]))
    ref = copy.deepcopy(model)
    ptq(ref, ref_policy, calib, bn)
    loss_ref, top1_ref = loss_and_top1(ref, evals)
    samples = _layer_inputs(ref, searched, calib)
    total = sum(len(o) for o in options.values())
    same = reuse is not None and reuse.get("layers") == searched and reuse.get("reference") == list(cfg.reference) \
        and reuse.get("options") == {n: [list(o) for o in opts] for n, opts in options.items()}
    if reuse is not None and not same:
        raise AsgaError("the table to reuse was measured with other layers, options or reference; measure anew")
    table = {n: [] for n in searched} if not same else reuse["ptq"]
    done = 0
    for n in (searched if not same else []):  # one layer changed at a time, the rest as calibrated for the reference
        layer = ref.get_submodule(n)
        bn_state = {k: v.clone() for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}
        for w, a in options[n]:
            if (w, a) == ref_choice[n]:
                table[n].append(0.0)
            else:
                old = _swap(layer, w, a, costs[n].input_signed, samples[n])
                reestimate_bn(ref, bn)
                table[n].append(loss_and_top1(ref, evals)[0] - loss_ref)
                layer.weight_quantizer, layer.input_quantizer = old
                ref.load_state_dict(bn_state, strict=False)
            done += 1
            emit(callback, ProgressEvent("step", "sensitivity ptq", 1, 1, done, total))
    out = {"schema": SCHEMA, "model": ckpt["model_name"], "dataset": dataset, "dataset_fingerprint": fp,
           "target": target.name, "input_shape": [chans, size, size], "num_classes": int(ckpt["num_classes"]),
           "reference": list(cfg.reference), "reference_choice": {n: list(c) for n, c in ref_choice.items()},
           "layers": searched, "edges": edges,
           "costs": {n: {"kind": c.kind, "macs": c.macs, "params": c.params, "input_signed": c.input_signed}
                     for n, c in costs.items()},
           "options": {n: [list(o) for o in opts] for n, opts in options.items()},
           "loss_ref": loss_ref, "top1_ref": top1_ref, "ptq": table, "finetune": None, "hessian": None,
           "config": json_safe(asdict(cfg)), "provenance": provenance(float_checkpoint=cfg.float_checkpoint)}
    if same:
        out.update(hessian=reuse.get("hessian"), finetune=reuse.get("finetune"), loss_ref=reuse["loss_ref"],
                   top1_ref=reuse["top1_ref"], time_s=reuse.get("time_s"))
    if cfg.hessian_samples and out["hessian"] is None:
        h_batches = _batches(train, idx[:cfg.hessian_images], min(cfg.batch_size, cfg.hessian_images))
        out["hessian"] = hessian_table(model, searched, options, samples, h_batches, cfg)
    if cfg.finetune_steps and out["finetune"] is None:
        out["finetune"] = finetune_table(ref, train, idx, searched, options, ref_choice, samples, costs, evals,
                                         cfg, callback)
    return out


@torch.no_grad()
def _quant_error(q, v: torch.Tensor) -> float:
    """Return the summed squared error of quantizing v with q (after its MSE initialisation)."""
    q.init_mse(v)
    return float(((q(v) - v) ** 2).sum())


def hessian_table(model: nn.Module, names: list[str], options: dict, samples: dict, batches, cfg) -> dict:
    """Return per layer the weight / input traces and, per option, the HAWQ-V2 estimate of the loss increase."""
    traces = hutchinson_traces(model, names, batches, cfg.hessian_samples, cfg.seed)
    out = {}
    for n in names:
        layer = model.get_submodule(n)
        tw, ta = traces[n]["weight"], traces[n]["input"]
        err_w, err_a = {FLOAT[0]: 0.0}, {FLOAT[1]: 0.0}  # a float layer adds no quantization error
        for w, a in options[n]:
            if w not in err_w:
                err_w[w] = _quant_error(weight_quantizer(w, layer.weight.shape[0]), layer.weight.detach())
            if a not in err_a:  # the error per element of the sample, over an input tensor of the traced size
                err = _quant_error(input_quantizer(a, bool((samples[n] < 0).any())), samples[n])
                err_a[a] = err / samples[n].numel() * traces[n]["input_numel"]
        # 0.5 * (trace / size) * ||Q(v) - v||^2: the second-order term with the average curvature
        out[n] = {"weight_trace": tw, "input_trace": ta, "weight_numel": layer.weight.numel(),
                  "input_numel": traces[n]["input_numel"],
                  "estimate": [0.5 * (tw / layer.weight.numel() * err_w[w] + ta / traces[n]["input_numel"] * err_a[a])
                               for w, a in options[n]]}
    return out


def finetune_table(ref: nn.Module, train, held_idx: list[int], names: list[str], options: dict, ref_choice: dict,
                   samples: dict, costs: dict, evals, cfg: SensitivityConfig, callback: Callback | None) -> dict:
    """Return {layer: [Delta per option]} measured after a short fine-tune (weights and inputs changed apart)."""
    pool = sorted(set(range(len(train))) - set(held_idx[cfg.calib_images + cfg.bn_images:]))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    order = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
    need = (cfg.finetune_warmup + cfg.finetune_steps) * cfg.finetune_batch
    order = (order * (need // len(order) + 1))[:need]
    steps = _batches(train, order, cfg.finetune_batch)
    warm, branch = steps[:cfg.finetune_warmup], steps[cfg.finetune_warmup:]
    torch.manual_seed(cfg.seed)
    base = _finetune(copy.deepcopy(ref), warm, cfg.finetune_lr)
    loss_base = loss_and_top1(_finetune(copy.deepcopy(base), branch, cfg.finetune_lr), evals)[0]
    jobs = {n: sorted({(w, ref_choice[n][1]) for w, _ in options[n] if (w, _) != FLOAT}
                      | {(ref_choice[n][0], a) for _, a in options[n] if (_, a) != FLOAT}
                      | ({FLOAT} & set(options[n]))) for n in names}
    total, done = sum(len(v) for v in jobs.values()), 0
    out = {}
    for n in names:
        single = {}
        for w, a in jobs[n]:
            if (w, a) == ref_choice[n]:
                single[(w, a)] = 0.0
            else:
                m = copy.deepcopy(base)
                _swap(m.get_submodule(n), w, a, costs[n].input_signed, samples[n])
                single[(w, a)] = loss_and_top1(_finetune(m, branch, cfg.finetune_lr), evals)[0] - loss_base
            done += 1
            emit(callback, ProgressEvent("step", "sensitivity finetune", 1, 1, done, total))
        wr, ar = ref_choice[n]
        out[n] = [single[FLOAT] if (w, a) == FLOAT else single[(w, ar)] + single[(wr, a)] for w, a in options[n]]
    return {"table": out, "loss_base": loss_base, "steps": cfg.finetune_steps, "warmup": cfg.finetune_warmup}


def json_safe(d: dict) -> dict:
    """Return d with tuples as lists (the JSON form)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def deltas(table: dict, kind: str = "ptq") -> dict[str, list[float]]:
    """Return {layer: loss increase per option} of one oracle of a sensitivity table."""
    if kind not in KINDS:
        raise AsgaError(f"oracle {kind!r} unknown; choose one of {', '.join(KINDS)}")
    part = table.get(kind)
    if part is None:
        raise AsgaError(f"the sensitivity table has no '{kind}' oracle; measure it (asga sensitivity "
                        f"{'--finetune-steps N' if kind == 'finetune' else '--hessian-samples N'})")
    if kind == "finetune":
        return part["table"]
    if kind == "hessian":
        return {n: v["estimate"] for n, v in part.items()}
    return part


def cost_table(table: dict, lut: dict | None = None, rest_ms: float = 0.0, pairs: tuple = ()) -> CostTable:
    """Return the CostTable a sensitivity table was measured with (its searched layers counted, its edges at
    the target's highest bits), priced for latency with `lut` (an `asga lut` table, with its pair terms) when given."""
    layers = {n: LayerCost(n, c["kind"], int(c["macs"]), int(c["params"]), bool(c["input_signed"]))
              for n, c in table["costs"].items()}
    edges = table.get("edges", [])
    fixed = {n: get_target(table["target"]).highest(layers[n].input_signed) for n in edges} if edges else None
    return CostTable(layers, tuple(table["layers"]), fixed, lut, rest_ms, tuple(pairs))
