"""Before a search writes anything: validate its config, build the float model and the supernet, price the budget."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from ..budget import Budget
from ..checkpoint import load_checkpoint, load_weights
from ..cost import PairTerm, choice_key, layer_costs
from ..errors import AsgaError, BudgetError
from ..lut.model import search_terms
from ..models import create_model, edge_layers
from .config import SearchConfig, SearchData
from .objective import OBJECTIVES, RHO_RULES
from .perturb import PERTURBS
from .supernet import Supernet, check_bits


def build_model(cfg: SearchConfig, data: SearchData) -> tuple[torch.nn.Module, dict]:
    """Return the float model for the supernet (scratch, float checkpoint or torchvision) and its record."""
    if cfg.init == "scratch":
        return create_model(cfg.model, data.num_classes, data.in_chans), {"init": "scratch"}
    if cfg.init == "torchvision":
        model = create_model(cfg.model, data.num_classes, data.in_chans, weights="torchvision")
        return model, {"init": "torchvision", "note": "pretrained backbone, new classifier head"}
    ckpt = load_checkpoint(cfg.init, "float")
    model = load_weights(create_model(cfg.model, data.num_classes, data.in_chans), cfg.init, cfg.model)
    excluded = ckpt.get("excluded_proxy") or {}
    return model, {"init": "float", "checkpoint": str(cfg.init), "checkpoint_dataset": ckpt.get("dataset"),
                   "proxy_excluded_from_float": excluded.get("fingerprint") == data.fingerprint,
                   "checkpoint_provenance": ckpt.get("provenance", {})}


LUT_CHECK_TOLERANCE = 0.15  # a table whose own float checks miss by more cannot price float choices


def read_lut(path: str, costs: dict, target: str | None = None, float_choice: bool = False,
             allow: bool = False) -> tuple[dict, float, tuple[PairTerm, ...]]:
    """Return (per-layer latency table, rest of the graph in ms, pair terms) of an `asga lut` file, priced by its side
    model where it has one (lut.model.search_terms: a float layer at its island price, pairs of float neighbours
    sharing what lies between them; the additive entries otherwise), checked against the model
    (and the target it must have been measured for, when given). With float choices, refuse (unless `allow`) a
    table whose own checks (whole models with float layers it was not summed from) miss by more than 15%."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        rest = float(d["rest_ms"])
        lut, pairs = search_terms(d)
        pairs = tuple(PairTerm.from_dict(p) for p in pairs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BudgetError(f"--lut {path}: not a latency table of `asga lut` ({str(e)[:120]})") from None
    measured_for = (d.get("key") or {}).get("target") if isinstance(d.get("key"), dict) else None
    if target is not None and measured_for is not None and measured_for != target:
        raise BudgetError(f"--lut {path} was measured for target {measured_for}, this search is for --target "
                          f"{target}: search with --target {measured_for} or measure a table with "
                          f"`asga lut MODEL --target {target}`")
    missing = [n for n in costs if n not in lut]
    if missing:
        raise BudgetError(f"--lut {path} has no latency for layers {', '.join(missing[:4])}: it was measured for "
                          "another model; measure this one with `asga lut`")
    checks = d.get("rest_check") if isinstance(d.get("rest_check"), dict) else {}
    off = {k: float(v["ratio"]) for k, v in checks.items()
           if isinstance(v, dict) and abs(float(v.get("ratio", 1.0)) - 1.0) > LUT_CHECK_TOLERANCE}
    if float_choice and off and not allow:
        k, r = max(off.items(), key=lambda kv: abs(kv[1] - 1.0))
        raise BudgetError(f"--lut {path}: its own check predicts the '{k}' model at {r:.2f} of measured (more than "
                          f"{LUT_CHECK_TOLERANCE:.0%} off): latency budgets with --float-choice would not hold; search "
                          "without --float-choice, or pass --allow-diagnostics to use the table anyway")
    return lut, rest, pairs


def _first_batch(data: SearchData) -> torch.Tensor:
    for x, _ in data.train(0):
        return x
    raise BudgetError(f"dataset {data.name} yields no batch")  # pragma: no cover - data.py refuses empty sets


def prepare(cfg: SearchConfig, data: SearchData) -> tuple[Supernet, dict, Budget | None]:
    """Validate the config and build the supernet; return (net, init record, budget)."""
    for name, val, allowed in (("objective", cfg.objective, OBJECTIVES), ("rho rule", cfg.rho_rule, RHO_RULES),
                               ("alpha data", cfg.alpha_data, ("same", "heldout")),
                               ("edge bits", cfg.edge_bits, ("8", "float")), ("perturb", cfg.perturb, PERTURBS),
                               ("alpha lr rule", cfg.alpha_lr_rule, ("tau", "tau-cos", "fixed")),
                               ("prior space", cfg.prior_space, ("logit", "score"))):
        if val not in allowed:
            raise AsgaError(f"{name} {val!r} unknown; choose one of {', '.join(allowed)}")
    check_bits(cfg.weight_bits, "weight")
    check_bits(cfg.act_bits, "activation")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise AsgaError(f"epochs ({cfg.epochs}) and batch size ({cfg.batch_size}) must be at least 1")
    for name in ("lr", "alpha_lr", "gamma", "epsilon", "rho_min", "k_p", "eta", "lam_max", "lam_floor", "band",
                 "tau_start",
                 "tau_end"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0) or (name in ("tau_start", "tau_end", "epsilon") and v == 0):
            raise AsgaError(f"--{name.replace('_', '-')} {v}: must be a finite number "
                            f"{'> 0' if name in ('tau_start', 'tau_end', 'epsilon') else '>= 0'}")
    if not math.isfinite(cfg.lam) or not 0.0 <= cfg.freeze_frac < 1.0:
        raise AsgaError(f"--lambda {cfg.lam} must be finite and --freeze-frac {cfg.freeze_frac} in [0, 1)")
    budget = cfg.budget()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, init = build_model(cfg, data)
    calib = _first_batch(data)
    shape = (data.in_chans, data.input_size, data.input_size)
    size = cfg.cost_input_size or data.input_size
    signs = layer_costs(model, shape, example=calib)  # sign of each input read from real data
    costs = {n: type(c)(c.name, c.kind, c.macs, c.params, signs[n].input_signed)
             for n, c in layer_costs(model, (data.in_chans, size, size)).items()}
    edges = [] if cfg.search_edges else edge_layers(model)
    lut, rest_ms, pairs = read_lut(cfg.lut, costs, cfg.target, cfg.float_choice, cfg.allow_diagnostics) if cfg.lut \
        else (None, 0.0, ())
    if budget is not None and "latency" in budget.metrics and lut is None:
        raise BudgetError("--budget-latency needs --lut TABLE: measure it with `asga lut MODEL --target "
                          f"{cfg.target} --batch-size B`")
    net = Supernet.build(model, cfg.model, costs, calib, cfg.weight_bits, cfg.act_bits, cfg.target, edges,
                         cfg.replace_unsupported, cfg.alpha_init, data.num_classes, (data.in_chans, size, size),
                         cfg.float_choice, cfg.edge_bits, lut, rest_ms, pairs)
    if lut is not None:  # every candidate priced: a table of other choices is named, not a KeyError mid-search
        gaps = [f"{n} {choice_key(*c)}" for n, opts in net.options().items() for c in opts
                if choice_key(*c) not in lut.get(n, {})]
        if gaps:
            raise BudgetError(f"--lut {cfg.lut} has no latency for {len(gaps)} candidate(s) of this search "
                              f"({', '.join(gaps[:4])}{', ...' if len(gaps) > 4 else ''}); narrow --weight-bits / "
                              f"--act-bits or measure the table for --target {cfg.target}")
    if budget is not None:
        budget.check_feasible(net.table, net.options())
    return net, init, budget
