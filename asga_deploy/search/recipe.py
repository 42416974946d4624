"""The search as a recipe (torchtune style): setup -> epochs (each checkpointed) -> finish.

`prepare` validates the config and builds the supernet before anything is written; `SearchRecipe`
owns the optimisers, the radius, the budget controller and the run state, and resumes exactly from
its per-epoch checkpoint (the data order is a function of (seed, epoch) only).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..checkpoint import (
    load_checkpoint,
    plain_provenance,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..errors import BudgetError, CheckpointError, OutputExistsError, TrainingDivergedError
from ..io import atomic_write_text, provenance
from ..policy import validate_policy
from ..progress import Callback, ProgressEvent, emit
from .config import RESUME_FREE, SearchConfig, SearchData, SearchDiagnosticError, SearchResult
from .controller import (
    Controller,
    choice_distance,
    cost_shape,
    extract,
    logit_gaps,
    logit_moves,
    start_at_budget,
    start_under_limits,
    temperature,
)
from .objective import ASGAStep, NonFiniteLoss, Radius
from .outputs import finish
from .setup import prepare

# a searched latency policy whose side-model price exceeds its budget by more fails a diagnostic: on the ResNet-20
# fronts (32 searched policies) the largest was 1.03x, on MobileNetV2's two misses 1.63x and 1.74x
SIDE_MODEL_TOLERANCE = 0.05


class SearchRecipe:
    """One search run: supernet, optimisers, radius, controller and log, checkpointed every epoch."""

    def __init__(self, cfg: SearchConfig, data: SearchData, run_dir: Path, command: str | None = None,
                 callback: Callback | None = None):
        self.cfg, self.data, self.run_dir, self.command, self.callback = cfg, data, Path(run_dir), command, callback
        self.net, self.init, self.budget = prepare(cfg, data)  # every input check happens before any write
        self.limits = self.budget.limits if self.budget else ()
        self.ratios = [lim.ratio(self.net.table) for lim in self.limits]
        self.metric = self.limits[0].metric if self.limits else "bitops"  # what the log and plots show
        w_params, a_params = self.net.weight_parameters(), self.net.arch_parameters()
        decay = [p for p in w_params if p.dim() > 1]
        rest = [p for p in w_params if p.dim() <= 1]
        self.w_opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}],
                                     lr=cfg.lr, momentum=cfg.momentum)
        self.a_opt = torch.optim.Adam(a_params, lr=cfg.alpha_lr, weight_decay=0.0)
        self.radius = Radius(cfg.rho_rule, cfg.epsilon, cfg.rho_min)
        upper_only = self.budget is not None and self.budget.upper_only
        self.ctrl = Controller(1.0 if self.limits else None, cfg.lam, cfg.k_p, cfg.eta, cfg.lam_max, cfg.band,
                               upper_only=upper_only, floor=cfg.lam_floor)
        self.stepper = ASGAStep(self.net, w_params, a_params, self.w_opt, self.a_opt, cfg.objective, cfg.gamma,
                                self.radius, cost_fn=self.budget_use, perturb=cfg.perturb)
        self.total = cfg.epochs * data.steps_per_epoch
        self.freeze_step = min(self.total, math.ceil((1.0 - cfg.freeze_frac) * self.total))
        self.net.set_temperature(cfg.tau_start)
        for m in self.net.mixed_layers().values():
            m.prior_space = cfg.prior_space
        beta: float | list[float] = 0.0
        if self.limits and cfg.start_at_budget and upper_only:  # a prior in cost space, one beta per limit
            beta = start_under_limits(self.net, self.limit_uses,
                                      [cost_shape(self.net, lim.metric) for lim in self.limits])
        elif self.limits and cfg.start_at_budget:
            beta = start_at_budget(self.net, self.budget_use)
        start = {n: [p.tolist() for p in m.arch_parameters()] for n, m in self.net.mixed_layers().items()}
        self.state = {"log": [], "epochs": [], "beta": beta, "start_logits": start,
                      "start_argmax": self.net.argmax_choice(), "argmax": self.net.argmax_choice(),
                      "argmax_changed_step": 0, "loss_at_change": None}
        self.start_epoch = 0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def budget_use(self) -> torch.Tensor:
        """Return the expected cost of the tightest limit over its bound (the controller drives it to 1).

        Soft budget: the expected BitOPs ratio, to which a fixed lambda is applied.
        """
        if not self.limits:
            return self.net.expected_cost("bitops")
        return self.limit_uses().max()

    def limit_uses(self) -> torch.Tensor:
        """Return each limit's expected cost over its bound."""
        return torch.stack([self.net.expected_cost(lim.metric) / r
                            for lim, r in zip(self.limits, self.ratios, strict=True)])

    # ------------------------------------------------------------------ checkpoint
    def resume(self) -> None:
        """Restore every state from the run folder's checkpoint (refusing one written by another search)."""
        ck = load_checkpoint(self.ckpt_path, "search")
        current = self.cfg.as_dict()
        diff = [k for k, v in current.items() if k not in RESUME_FREE and ck["config"].get(k) != v]
        if diff or ck.get("dataset_fingerprint") != self.data.fingerprint:
            raise CheckpointError(f"{self.ckpt_path} was written by another search (differs in: "
                                  f"{', '.join(diff) or 'dataset fingerprint'}); use --force to restart")
        self.net.load_state_dict(ck["model"])
        self.w_opt.load_state_dict(ck["optimizer"]["w"])
        self.a_opt.load_state_dict(ck["optimizer"]["a"])
        self.radius.load_state_dict(ck["radius"])
        self.ctrl.load_state_dict(ck["controller"])
        self.state = ck["state"]
        set_rng_state(ck["rng"])
        self.start_epoch = ck["epoch"]

    def save(self, epoch: int, metrics: dict) -> None:
        """Write checkpoint.pt (atomically) and log.jsonl after an epoch."""
        d = self.data
        save_checkpoint({"kind": "search", "model": self.net.state_dict(), "model_name": self.cfg.model,
                         "num_classes": d.num_classes, "in_chans": d.in_chans, "input_size": d.input_size,
                         "dataset": d.name, "dataset_fingerprint": d.fingerprint, "config": self.cfg.as_dict(),
                         "metrics": metrics, "provenance": plain_provenance(self.command), "epoch": epoch,
                         "optimizer": {"w": self.w_opt.state_dict(), "a": self.a_opt.state_dict()},
                         "scheduler": None, "radius": self.radius.state_dict(), "controller": self.ctrl.state_dict(),
                         "state": self.state, "rng": rng_state()}, self.ckpt_path)
        atomic_write_text(self.run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.state["log"]))

    # ------------------------------------------------------------------ the loop
    def step(self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor, held) -> dict:
        """Run one search iteration at global step t; return its log record."""
        cfg, net = self.cfg, self.net
        t = epoch * self.data.steps_per_epoch + i
        tau = self.tau(t)
        net.set_temperature(tau)
        lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t / self.total))  # cosine, a function of the step
        for g in self.w_opt.param_groups:
            g["lr"] = lr
        for g in self.a_opt.param_groups:
            g["lr"] = self.alpha_lr(tau, t)
        with torch.no_grad():
            use = float(self.budget_use())
            c_exp = float(net.expected_cost(self.metric))
        frozen = t >= self.freeze_step  # the logits stay; the weights train on under the fixed policy
        lam = self.ctrl.lam if frozen else self.ctrl(use)
        t0 = time.perf_counter()
        try:
            st = self.stepper.step(x, y, lam, held, update_alpha=not frozen)
        except NonFiniteLoss as e:
            kept = (f"the last good checkpoint {self.ckpt_path} (epoch {epoch}) is kept" if epoch > 0
                    else "no checkpoint was written yet")
            raise TrainingDivergedError(f"non-finite loss at epoch {epoch + 1} step {i + 1} (global step "
                                        f"{t + 1}): {e}; {kept}; lower --lr or check the data") from None
        dt = time.perf_counter() - t0
        am = net.argmax_choice()
        if am != self.state["argmax"]:
            self.state.update(argmax=am, argmax_changed_step=t + 1)
        return {"step": t + 1, "epoch": epoch + 1, **st, "lambda": lam, "temperature": tau, "lr": lr,
                "alpha_lr": self.alpha_lr(tau, t), "frozen": frozen, "expected_cost": c_exp, "budget_use": use,
                "argmax_cost": net.cost_ratio(am, self.metric),
                "target_t": self.ratios[0] if self.limits else None, "images_per_s": len(x) / dt}

    def tau(self, t: int) -> float:
        """Return the temperature at step t: geometric from tau_start to tau_end over the steps before the
        freeze, then held, so that the frozen logits keep ONE policy while the weights adapt to it."""
        cfg = self.cfg
        return temperature(min(t, self.freeze_step - 1), self.freeze_step, cfg.tau_start, cfg.tau_end)

    def alpha_lr(self, tau: float, t: int | None = None) -> float:
        """Return the logit learning rate at temperature tau (method.md section 2, revision 3), and with the
        "tau-cos" rule at step t a cosine decay to 0 at the freeze: the nominal rate without t.

        The cosine lets near-ties settle before the freeze instead of flipping on minibatch noise until its
        last step (measured on resnet20: the argmax changed within 10 steps of the freeze in most searches);
        the diagnostics still measure ties against the nominal step.
        """
        rule, lr = self.cfg.alpha_lr_rule, self.cfg.alpha_lr
        lr *= tau if rule in ("tau", "tau-cos") else 1.0
        if rule == "tau-cos" and t is not None:
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(t / max(self.freeze_step, 1), 1.0)))
        return lr

    def run_epoch(self, epoch: int) -> dict:
        """Train one epoch of the search; update the argmax record; return the epoch's metrics."""
        cfg, data, net = self.cfg, self.data, self.net
        net.train()
        loss_sum, count = 0.0, 0
        held_iter = iter(data.heldout(epoch)) if cfg.alpha_data == "heldout" and data.heldout else None
        for i, (x, y) in enumerate(data.train(epoch)):
            held = None
            if held_iter is not None:
                held = next(held_iter, None)
                if held is None:
                    held_iter = iter(data.heldout(epoch))
                    held = next(held_iter)
            rec = self.step(epoch, i, x, y, held)
            self.state["log"].append(rec)
            loss_sum += rec["loss"] * len(x)
            count += len(x)
            emit(self.callback, ProgressEvent("step", "search", epoch + 1, cfg.epochs, i + 1, data.steps_per_epoch,
                                              {"loss": rec["loss"], "gap": rec["gap"], "rho": rec["rho"],
                                               "cost": rec["expected_cost"], "lam": rec["lambda"]}))
        train_loss = loss_sum / max(count, 1)
        if self.state["argmax_changed_step"] > epoch * data.steps_per_epoch:
            self.state["loss_at_change"] = train_loss
        with torch.no_grad():
            c_end = float(net.expected_cost(self.metric))
        ep = {"epoch": epoch + 1, "train_loss": train_loss,
              "argmax_cost": net.cost_ratio(net.argmax_choice(), self.metric), "expected_cost": c_end}
        self.state["epochs"].append(ep)
        return ep

    def run(self) -> None:
        """Run the remaining epochs, checkpointing after each."""
        cfg, data = self.cfg, self.data
        emit(self.callback, ProgressEvent("start", "search", self.start_epoch, cfg.epochs, 0, data.steps_per_epoch,
                                          message=f"{len(self.net.searched)} searched layers"))
        for epoch in range(self.start_epoch, cfg.epochs):
            ep = self.run_epoch(epoch)
            self.save(epoch + 1, ep)
            emit(self.callback, ProgressEvent("epoch", "search", epoch + 1, cfg.epochs, data.steps_per_epoch,
                                              data.steps_per_epoch, {k: v for k, v in ep.items() if k != "epoch"}))
        emit(self.callback, ProgressEvent("end", "search", cfg.epochs, cfg.epochs))

    # ------------------------------------------------------------------ the policy
    def diagnostics(self, choice: dict[str, tuple[int, int]], argmax: dict[str, tuple[int, int]]) -> dict:
        """Return the decision diagnostics of method.md section 6 (revision 3), measured where they mean something.

        undecided: a choice whose two largest decision variables (alpha / tau + prior at the freeze) are closer
        than one epoch of nominal logit steps (alpha_lr * tau per step, i.e. alpha_lr in alpha / tau): one more
        epoch could flip it. did not move: a
        choice whose logits moved less than a tenth of the nominal movement before the freeze. unstable: the
        argmax changed in the last 10% of the steps before the freeze. far: the extraction differs from the
        argmax in more than one choice per 4 layers.
        """
        steps = self.data.steps_per_epoch
        tau_pf = self.tau(self.freeze_step - 1)
        # one epoch of nominal logit steps, in the units of the decision variable alpha / tau at the freeze
        epoch_move = steps * self.alpha_lr(tau_pf) / tau_pf
        budget_move = sum(self.alpha_lr(self.tau(t), t) for t in range(self.freeze_step))
        gaps, moves = logit_gaps(self.net), logit_moves(self.net, self.state["start_logits"])
        undecided = sum(g < epoch_move for g in gaps) / len(gaps)
        still = sum(m < 0.1 * budget_move for m in moves) / len(moves) if budget_move > 0 else 1.0
        last = self.state["argmax_changed_step"]
        moved = choice_distance(choice, argmax)
        return {"alpha_undecided_fraction": undecided, "alpha_undecided": undecided > 0.25,
                "alpha_still_fraction": still, "alpha_did_not_move": still > 0.5,
                "argmax_last_change_step": last, "argmax_last_change_epoch": math.ceil(last / steps) if last else 0,
                "freeze_step": self.freeze_step,
                "argmax_unstable": last > self.freeze_step - math.ceil(0.1 * self.freeze_step),
                "extraction_vs_argmax_choices": moved, "extraction_far_from_argmax": moved > len(choice) / 4,
                "policy_vs_start_choices": choice_distance(choice, self.state["start_argmax"]),
                "epoch_logit_step": epoch_move, "logit_move_budget": budget_move}

    def side_model_latency(self, pol) -> float | None:
        """Return a policy's latency (ms) by its table's side model (lut.predict_latency: a float layer at its island
        step less the sides it shares with float neighbours), or None without a full `asga lut` table. The search
        prices the side model itself (pair terms) except a float layer with several successors that all requantize
        (predict_latency uses its island measured before requantized layers there); before the pair terms, its
        additive entries priced MobileNetV2's 12 scattered float layers at 0.44 of the measured latency, where the
        side model said 1.14."""
        from ..lut.table import LutError, load_lut, predict_latency

        if not self.cfg.lut:
            return None
        try:
            table = load_lut(self.cfg.lut)
        except (LutError, OSError, ValueError, KeyError, TypeError):
            return None  # a bare table (layers and rest only): the additive price is all there is
        if not all("float_side_saving" in (table.data.get("kernels") or {}).get(n, {}) for n in pol.layers):
            return None
        return float(predict_latency(table, pol))

    def finish(self, out_dir: str | Path, name: str | None, force: bool) -> SearchResult:
        """Extract the policy that meets the budget, check the diagnostics, write the policy and its log."""
        cfg, net, state = self.cfg, self.net, self.state
        net.set_temperature(self.tau(self.total - 1))
        argmax = net.argmax_choice()
        if self.budget is not None:
            choice, solve = extract(net, self.budget)
        else:
            choice, solve = argmax, {"cost_ratios": {self.metric: net.cost_ratio(argmax, self.metric)}}
        diag = self.diagnostics(choice, argmax)
        metrics = {"metric": self.metric, "budget": self.budget.describe() if self.budget else None,
                   "budget_ratio": self.ratios[0] if self.limits else None, "tol": cfg.tol,
                   **{f"extraction_{k}": v for k, v in solve.items()},
                   "extraction_cost_ratio": net.cost_ratio(choice, self.metric),
                   "extraction_exact_dp": solve.get("method") == "dp" if self.budget else None,
                   "argmax_cost_ratio": net.cost_ratio(argmax, self.metric),
                   "expected_cost_ratio": state["epochs"][-1]["expected_cost"], "start_beta": state["beta"],
                   "proxy_train_loss_at_last_change": state["loss_at_change"],
                   "proxy_train_loss_final": state["epochs"][-1]["train_loss"], "final_lambda": self.ctrl.lam,
                   "final_temperature": net.mixed_layers()[net.searched[0]].tau,
                   "flipped_codes_mean": statistics.fmean(r["flipped_codes"] for r in state["log"]),
                   "allow_diagnostics": cfg.allow_diagnostics, **diag}
        if net.table.lut is not None:  # what the policy is predicted to cost on the measured backend
            lat = [lim for lim in self.limits if lim.metric == "latency"]
            metrics["latency"] = {"predicted_ms": (net.table.constant("latency") + net.table.total("latency", choice)) / 1e6,
                                  "budget_ms": lat[0].target(net.table) / 1e6 if lat else None, "lut": cfg.lut,
                                  "pricing": "side model (pair terms)" if net.table.pairs else "additive"}
        d = self.data
        pol = net.derive_policy(choice, cfg.edge_bits, provenance(
            self.command, dataset=d.name, dataset_fingerprint=d.fingerprint, dataset_info=d.info, seed=cfg.seed,
            method=cfg.objective, config=cfg.as_dict(), supernet_init=self.init, run_dir=str(self.run_dir),
            metrics=metrics))
        if self.budget is not None and not self.budget.meets(net.table, choice):  # internal invariant
            raise BudgetError(f"extracted policy misses the budget {self.budget.describe()}")
        bad = [k for k in ("alpha_undecided", "alpha_did_not_move", "argmax_unstable", "extraction_far_from_argmax")
               if diag[k]]
        side_note = ""
        latency = metrics.get("latency") or {}
        if latency.get("budget_ms") and pol.float_layers:  # float layers are what the additive price can get wrong
            side = self.side_model_latency(pol)
            latency["side_model_ms"] = side
            if side is not None and side > latency["budget_ms"] * (1 + SIDE_MODEL_TOLERANCE):
                bad.append("latency_side_model_over_budget")
                side_note = (f"; the table's side model prices the policy at {side:.4g} ms, {side / latency['budget_ms']:.2f}x "
                             f"its {latency['budget_ms']:.4g} ms budget (the search's price: "
                             f"{latency['predicted_ms']:.4g} ms, {latency['pricing']}): its {len(pol.float_layers)} "
                             "float layers cost more among their neighbours than the search's price says; add a size "
                             "budget or search without --float-choice")
        metrics["diagnostics_failed"] = bad
        if bad and not cfg.allow_diagnostics:
            raise SearchDiagnosticError(
                f"search diagnostics failed: {', '.join(bad)}{side_note} (undecided choices {diag['alpha_undecided_fraction']:.0%}, "
                f"choices that did not move {diag['alpha_still_fraction']:.0%}, argmax last changed at step "
                f"{diag['argmax_last_change_step']} of {self.freeze_step} before the freeze, extraction differs from "
                f"argmax in {diag['extraction_vs_argmax_choices']} of {2 * len(choice)} choices); more epochs, another "
                f"budget or --alpha-lr may help; rerun with --resume --allow-diagnostics to write the policy anyway "
                f"(checkpoint in {self.run_dir})")
        validate_policy(pol, net.model, "searched policy", costs=net.costs)
        path = finish(pol, state, out_dir, name, force, cfg.stem())
        return SearchResult(path, pol, metrics, self.run_dir)


def check_run_dir(recipe: SearchRecipe, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run folder without --force, or to resume one that has no checkpoint."""
    if recipe.ckpt_path.exists() and not resume and not force:
        raise OutputExistsError(f"{recipe.ckpt_path} exists; pass --resume to continue that search or --force to "
                                "restart it")
    if resume and not recipe.ckpt_path.exists():
        raise CheckpointError(f"--resume: no checkpoint {recipe.ckpt_path} (run the search without --resume first)")
