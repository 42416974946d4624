"""SearchConfig and run_search: the search loop, per-epoch checkpoints (resume), extraction, outputs.

Layout: the run folder (default runs/search/<model>-<objective>-<budget>-s<seed>/) holds checkpoint.pt
(after every epoch) and log.jsonl; the outputs beside the policy are <stem>.json, <stem>.search.jsonl
and <stem>.{bits,rho,cost}.png.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cost import layer_costs
from ..errors import AsgaError, BudgetError, CheckpointError, OutputExistsError, TrainingDivergedError
from ..io import atomic_torch_save, atomic_write_text, check_writable, load_checkpoint, provenance
from ..models import create_model, edge_layers, load_weights
from ..policy import Policy, validate_policy
from ..progress import Callback, ProgressEvent, emit
from .budget import Controller, check_budget, choice_distance, extract, max_prob_fraction, temperature
from .objective import ASGAStep, NonFiniteLoss, Radius
from .supernet import DEFAULT_BITS, Supernet, check_bits

RESUME_FREE = ("allow_diagnostics",)  # may change on --resume: it only decides whether the policy is written


class SearchDiagnosticError(AsgaError):
    """The search ran but its diagnostics (method.md section 6) say the policy cannot be trusted."""


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of a search (recorded whole in the policy and the checkpoint)."""

    model: str
    dataset: str
    subset: int | None = None
    fraction: float | None = None
    objective: str = "asga"
    epochs: int = 15  # a 1,000-image proxy is memorised in about 15 epochs (method.md 4)
    batch_size: int = 64
    seed: int = 0
    target: str = "sim"
    weight_bits: tuple[int, ...] = DEFAULT_BITS
    act_bits: tuple[int, ...] = DEFAULT_BITS
    replace_unsupported: bool = True
    search_edges: bool = False
    edge_bits: str = "8"  # "8" or "float": the first conv and classifier in the written policy
    budget_bitops: float | None = None  # <= 1: ratio of W8A8 BitOPs; > 1: absolute BitOPs
    budget_weight_mb: float | None = None  # searched layers' weight megabytes (1e6 bytes)
    lam: float = 0.0  # soft budget lambda, or the controller's initial lambda
    k_p: float = 50.0
    eta: float = 0.5
    tol: float = 0.03
    tau_start: float = 1.0
    tau_end: float = 0.01
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha_lr: float = 0.01
    alpha_init: float = 0.01
    gamma: float = 0.001
    epsilon: float = 0.1
    rho_min: float = 0.01
    rho_rule: str | None = None  # None: "rel" for asga and erm; sam and sam-align always use "fixed" (method.md 4)
    alpha_data: str = "same"  # "same" batch, or "heldout" proxy batches (first-order bi-level)
    heldout_fraction: float = 0.2
    init: str = "scratch"  # "scratch", "torchvision", or a float checkpoint path
    cost_input_size: int | None = None  # MACs at the TARGET input size (default: the data's)
    allow_diagnostics: bool = False

    def __post_init__(self) -> None:
        if self.rho_rule is None:  # record the rule that runs: the ablation's baselines keep rho = epsilon
            object.__setattr__(self, "rho_rule", "fixed" if self.objective in ("sam", "sam-align") else "rel")


@dataclass
class SearchData:
    """The proxy data as plain iterables: train(epoch) and heldout(epoch) yield (x, y) batches."""

    name: str
    fingerprint: str
    num_classes: int
    in_chans: int
    input_size: int
    size: int
    steps_per_epoch: int
    train: Callable[[int], Iterable]
    heldout: Callable[[int], Iterable] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class SearchResult:
    """What run_search wrote and measured."""

    policy_path: Path
    policy: Policy
    metrics: dict
    run_dir: Path


def budget_tag(cfg: SearchConfig) -> str:
    """Return a short name of the budget for the run folder."""
    if cfg.budget_weight_mb is not None:
        return f"wmb{cfg.budget_weight_mb:g}"
    if cfg.budget_bitops is not None:
        return f"b{cfg.budget_bitops:g}"
    return f"lam{cfg.lam:g}"


def default_run_dir(cfg: SearchConfig, root: str | Path = "runs/search") -> Path:
    """Return runs/search/<model>-<objective>-<budget>-s<seed>."""
    return Path(root) / f"{cfg.model}-{cfg.objective}-{budget_tag(cfg)}-s{cfg.seed}"


def build_model(cfg: SearchConfig, data: SearchData) -> tuple[torch.nn.Module, dict]:
    """Return the float model for the supernet (scratch, float checkpoint or torchvision) and its record."""
    if cfg.init == "scratch":
        return create_model(cfg.model, data.num_classes, data.in_chans), {"init": "scratch"}
    if cfg.init == "torchvision":
        model = create_model(cfg.model, data.num_classes, data.in_chans, weights="torchvision")
        return model, {"init": "torchvision", "note": "pretrained backbone, new classifier head"}
    ckpt = load_checkpoint(cfg.init, "float")
    model = create_model(cfg.model, data.num_classes, data.in_chans)
    load_weights(model, cfg.init, cfg.model)
    return model, {"init": "float", "checkpoint": str(cfg.init), "checkpoint_dataset": ckpt.get("dataset"),
                   "checkpoint_provenance": ckpt.get("provenance", {})}


def _first_batch(data: SearchData) -> torch.Tensor:
    for x, _ in data.train(0):
        return x
    raise BudgetError(f"dataset {data.name} yields no batch")  # pragma: no cover - data.py refuses empty sets


def prepare(cfg: SearchConfig, data: SearchData) -> tuple[Supernet, dict, str, float | None]:
    """Validate the config and build the supernet; return (net, init record, metric, target ratio)."""
    from .objective import OBJECTIVES, RHO_RULES

    for name, val, allowed in (("objective", cfg.objective, OBJECTIVES), ("rho rule", cfg.rho_rule, RHO_RULES),
                               ("alpha data", cfg.alpha_data, ("same", "heldout")),
                               ("edge bits", cfg.edge_bits, ("8", "float"))):
        if val not in allowed:
            raise AsgaError(f"{name} {val!r} unknown; choose one of {', '.join(allowed)}")
    if cfg.objective in ("sam", "sam-align") and cfg.rho_rule != "fixed":
        raise AsgaError(f"--rho-rule {cfg.rho_rule} applies to asga only: {cfg.objective} keeps rho = epsilon "
                        "(the ablation of method.md section 4); drop --rho-rule or use --objective asga")
    check_bits(cfg.weight_bits, "weight")
    check_bits(cfg.act_bits, "activation")
    if cfg.budget_bitops is not None and cfg.budget_weight_mb is not None:
        raise BudgetError("give --budget-bitops or --budget-weight-mb, not both")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise AsgaError(f"epochs ({cfg.epochs}) and batch size ({cfg.batch_size}) must be at least 1")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, init = build_model(cfg, data)
    calib = _first_batch(data)
    shape = (data.in_chans, data.input_size, data.input_size)
    cshape = (data.in_chans, cfg.cost_input_size or data.input_size, cfg.cost_input_size or data.input_size)
    signs = layer_costs(model, shape, example=calib)  # sign of each input read from real data
    costs = {n: type(c)(c.name, c.kind, c.macs, c.params, signs[n].input_signed)
             for n, c in layer_costs(model, cshape).items()}
    edges = [] if cfg.search_edges else edge_layers(model)
    net = Supernet.build(model, cfg.model, costs, calib, cfg.weight_bits, cfg.act_bits, cfg.target, edges,
                         cfg.replace_unsupported, cfg.alpha_init, data.num_classes, cshape)
    metric, ratio = "bitops", None
    if cfg.budget_bitops is not None:
        b = cfg.budget_bitops
        if not b > 0:
            raise BudgetError(f"--budget-bitops {b} must be positive (<= 1: ratio of W8A8; > 1: BitOPs)")
        ratio = b if b <= 1 else b / net.ref_bitops
        check_budget(net, metric, ratio, cfg.tol, f"--budget-bitops {b:g}")
    elif cfg.budget_weight_mb is not None:
        metric = "weight"
        if not cfg.budget_weight_mb > 0:
            raise BudgetError(f"--budget-weight-mb {cfg.budget_weight_mb} must be positive")
        ratio = cfg.budget_weight_mb * 8e6 / net.ref_weight_bits
        check_budget(net, metric, ratio, cfg.tol, f"--budget-weight-mb {cfg.budget_weight_mb:g}")
    return net, init, metric, ratio


def _config_dict(cfg: SearchConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored in checkpoints


def _plain(d: dict) -> dict:
    """Return d with str subclasses (torch's TorchVersion) made plain str: weights_only loads refuse them."""
    return {k: str(v) if isinstance(v, str) else v for k, v in d.items()}


def _rng_state() -> dict:
    st = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [st[0], list(st[1]), st[2]], "cuda": None}


def _set_rng(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    v, s, g = d["python"]
    random.setstate((v, tuple(s), g))


def run_search(cfg: SearchConfig, data: SearchData, out_dir: str | Path = "policies",
               run_dir: str | Path | None = None, command: str | None = None, callback: Callback | None = None,
               resume: bool = False, force: bool = False, name: str | None = None) -> SearchResult:
    """Search a policy, checkpointing every epoch; write the policy, its search log and plots."""
    from .outputs import finish

    net, init, metric, ratio = prepare(cfg, data)  # every input check happens before anything is written
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if name is not None and not force:  # a fixed name: refuse now, not after the search
        check_writable(Path(out_dir) / f"{name}.json", force)
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists() and not resume and not force:
        raise OutputExistsError(f"{ckpt_path} exists; pass --resume to continue that search or --force to restart it")
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"--resume: no checkpoint {ckpt_path} (run the search without --resume first)")
    w_params, a_params = net.weight_parameters(), net.arch_parameters()
    decay = [p for p in w_params if p.dim() > 1]
    rest = [p for p in w_params if p.dim() <= 1]
    w_opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}],
                            lr=cfg.lr, momentum=cfg.momentum)
    a_opt = torch.optim.Adam(a_params, lr=cfg.alpha_lr, weight_decay=0.0)
    radius = Radius(cfg.rho_rule, cfg.epsilon, cfg.rho_min)
    ctrl = Controller(ratio, cfg.lam, cfg.k_p, cfg.eta)
    stepper = ASGAStep(net, w_params, a_params, w_opt, a_opt, cfg.objective, cfg.gamma, radius,
                       cost_fn=lambda: net.expected_cost(metric))
    total = cfg.epochs * data.steps_per_epoch
    state = {"log": [], "epochs": [], "argmax": None, "argmax_changed_epoch": 0, "loss_at_change": None}
    start_epoch = 0
    if resume:
        ck = load_checkpoint(ckpt_path, "search")
        diff = [k for k, v in _config_dict(cfg).items() if k not in RESUME_FREE and ck["config"].get(k) != v]
        if diff or ck.get("dataset_fingerprint") != data.fingerprint:
            raise CheckpointError(f"{ckpt_path} was written by another search (differs in: "
                                  f"{', '.join(diff) or 'dataset fingerprint'}); use --force to restart")
        net.load_state_dict(ck["model"])
        w_opt.load_state_dict(ck["optimizer"]["w"])
        a_opt.load_state_dict(ck["optimizer"]["a"])
        radius.load_state_dict(ck["radius"])
        ctrl.load_state_dict(ck["controller"])
        state = ck["state"]
        _set_rng(ck["rng"])
        start_epoch = ck["epoch"]
    emit(callback, ProgressEvent("start", "search", start_epoch, cfg.epochs, 0, data.steps_per_epoch,
                                 message=f"{net.searched.__len__()} searched layers"))
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        sums = {"loss": 0.0, "n": 0}
        held_iter = iter(data.heldout(epoch)) if cfg.alpha_data == "heldout" and data.heldout else None
        for i, (x, y) in enumerate(data.train(epoch)):
            t = epoch * data.steps_per_epoch + i
            tau = temperature(t, total, cfg.tau_start, cfg.tau_end)
            net.set_temperature(tau)
            lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t / total))  # cosine, a function of the step
            for g in w_opt.param_groups:
                g["lr"] = lr
            with torch.no_grad():
                c_exp = float(net.expected_cost(metric))
            lam = ctrl(t, total, c_exp)
            held = None
            if held_iter is not None:
                held = next(held_iter, None)
                if held is None:
                    held_iter = iter(data.heldout(epoch))
                    held = next(held_iter)
            t0 = time.perf_counter()
            try:
                st = stepper.step(x, y, lam, held)
            except NonFiniteLoss as e:
                kept = (f"the last good checkpoint {ckpt_path} (epoch {epoch}) is kept" if epoch > 0
                        else "no checkpoint was written yet")
                raise TrainingDivergedError(f"non-finite loss at epoch {epoch + 1} step {i + 1} (global step "
                                            f"{t + 1}): {e}; {kept}; lower --lr or check the data") from None
            dt = time.perf_counter() - t0
            rec = {"step": t + 1, "epoch": epoch + 1, **st, "lambda": lam, "temperature": tau, "lr": lr,
                   "expected_cost": c_exp, "argmax_cost": net.cost_ratio(net.argmax_choice(), metric),
                   "target_t": ctrl.target_t if ratio is not None else None, "images_per_s": len(x) / dt}
            state["log"].append(rec)
            sums["loss"] += st["loss"] * len(x)
            sums["n"] += len(x)
            emit(callback, ProgressEvent("step", "search", epoch + 1, cfg.epochs, i + 1, data.steps_per_epoch,
                                         {"loss": st["loss"], "gap": st["gap"], "rho": st["rho"],
                                          "cost": c_exp, "lam": lam}))
        am = net.argmax_choice()
        train_loss = sums["loss"] / max(sums["n"], 1)
        if am != state["argmax"]:
            state.update(argmax=am, argmax_changed_epoch=epoch + 1, loss_at_change=train_loss)
        with torch.no_grad():
            c_end = float(net.expected_cost(metric))
        ep = {"epoch": epoch + 1, "train_loss": train_loss, "argmax_cost": net.cost_ratio(am, metric),
              "expected_cost": c_end}
        state["epochs"].append(ep)
        atomic_torch_save({"kind": "search", "model": net.state_dict(), "model_name": cfg.model,
                           "num_classes": data.num_classes, "in_chans": data.in_chans,
                           "input_size": data.input_size, "dataset": data.name,
                           "dataset_fingerprint": data.fingerprint, "config": _config_dict(cfg),
                           "metrics": ep, "provenance": _plain(provenance(command)), "epoch": epoch + 1,
                           "optimizer": {"w": w_opt.state_dict(), "a": a_opt.state_dict()}, "scheduler": None,
                           "radius": radius.state_dict(), "controller": ctrl.state_dict(), "state": state,
                           "rng": _rng_state()}, ckpt_path)
        atomic_write_text(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in state["log"]))
        emit(callback, ProgressEvent("epoch", "search", epoch + 1, cfg.epochs, data.steps_per_epoch,
                                     data.steps_per_epoch, {k: v for k, v in ep.items() if k != "epoch"}))
    emit(callback, ProgressEvent("end", "search", cfg.epochs, cfg.epochs))
    net.set_temperature(temperature(total - 1, total, cfg.tau_start, cfg.tau_end))
    argmax = net.argmax_choice()
    if ratio is not None:
        choice, solve = extract(net, metric, ratio, cfg.tol)
    else:
        choice, solve = argmax, {"cost_ratio": net.cost_ratio(argmax, metric), "exact_dp": None}
    undecided = max_prob_fraction(net)
    moved = choice_distance(choice, argmax)
    diag = {"alpha_undecided_fraction": undecided, "alpha_did_not_move": undecided > 0.5,
            "extraction_vs_argmax_choices": moved, "extraction_far_from_argmax": moved > len(choice) / 4}
    metrics = {"metric": metric, "budget_ratio": ratio, "tol": cfg.tol, **{f"extraction_{k}": v for k, v in solve.items()},
               "argmax_cost_ratio": net.cost_ratio(argmax, metric), "expected_cost_ratio": state["epochs"][-1]["expected_cost"],
               "argmax_last_change_epoch": state["argmax_changed_epoch"],
               "proxy_train_loss_at_last_change": state["loss_at_change"],
               "proxy_train_loss_final": state["epochs"][-1]["train_loss"], "final_lambda": ctrl.lam,
               "final_temperature": net.mixed_layers()[net.searched[0]].tau, **diag}
    pol = net.derive_policy(choice, cfg.edge_bits, provenance(
        command, dataset=data.name, dataset_fingerprint=data.fingerprint, dataset_info=data.info, seed=cfg.seed,
        method=cfg.objective, config=_config_dict(cfg), supernet_init=init, run_dir=str(run_dir), metrics=metrics))
    if ratio is not None:
        got = pol.cost["bitops_vs_w8a8"] if metric == "bitops" else solve["cost_ratio"]
        if not ((1 - cfg.tol) * ratio - 1e-12 <= got <= ratio + 1e-12):  # internal invariant, but say it clearly
            raise BudgetError(f"extracted policy costs {got:.4g}, outside [{(1 - cfg.tol) * ratio:.4g}, {ratio:.4g}]")
    bad = [k for k in ("alpha_did_not_move", "extraction_far_from_argmax") if diag[k]]
    if bad and not cfg.allow_diagnostics:
        raise SearchDiagnosticError(
            f"search diagnostics failed: {', '.join(bad)} (undecided choices {undecided:.0%}, extraction differs "
            f"from argmax in {moved} of {2 * len(choice)} choices); more epochs or another budget may help; "
            f"rerun with --resume --allow-diagnostics to write the policy anyway (checkpoint in {run_dir})")
    validate_policy(pol, net.model, "searched policy", costs=net.costs)
    path = finish(pol, state, out_dir, name, force, cfg)
    return SearchResult(path, pol, metrics, run_dir)
