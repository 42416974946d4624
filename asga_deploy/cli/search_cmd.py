"""`asga search`: parse options -> SearchConfig -> run_search -> one-paragraph summary."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from . import app
from .common import SEED, RichProgress, choice, console, handle_errors, number


def _bits(text: str, what: str) -> tuple[int, ...]:
    from ..errors import PolicyError

    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise PolicyError(f"--{what} {text!r}: give comma-separated integers in 2..8, e.g. 2,3,4,6,8") from None


def _command_line(ctx: typer.Context) -> str:
    """Return `asga search` with the options that differ from their defaults (argv is not ours in tests)."""
    parts = [ctx.command_path or "asga search"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v == p.default or v is None or not getattr(p, "opts", None):
            continue
        if getattr(p, "is_flag", False):
            parts.append(p.opts[0] if v else (p.secondary_opts or [p.opts[0]])[0])
        else:
            parts += [p.opts[0], shlex.quote(str(v))]
    return " ".join(parts)


@app.command("search")
@handle_errors
def search(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="registered model (asga models); required "
                                     "for --method supernet"),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="proxy dataset: fashion-mnist, cifar10, fake, "
                                       "...; required for --method supernet"),
    method: str = typer.Option("supernet", "--method", callback=choice("supernet", "sensitivity"),
                               help="supernet (the ASGA search, --objective) | "
                               "sensitivity (exact best policy of an `asga sensitivity` table)"),
    sensitivity: Path | None = typer.Option(None, "--sensitivity", help="--method sensitivity: the table "
                                            "(sensitivity.json of `asga sensitivity`)"),
    oracle: str = typer.Option("ptq", "--oracle", callback=choice("ptq", "finetune", "hessian"),
                               help="--method sensitivity: ptq | finetune | hessian"),
    pick: str = typer.Option("best", "--pick", callback=choice("best", "worst", "random"),
                             help="--method sensitivity: best | worst | random (seeded by --seed)"),
    subset: int | None = typer.Option(None, "--subset", min=1, help="class-balanced proxy of N images"),
    fraction: float | None = typer.Option(None, "--fraction", callback=number(0, 1, lo_open=True),
                                          help="proxy as a fraction of the train split"),
    budget_bitops: float | None = typer.Option(None, "--budget-bitops", callback=number(0, lo_open=True),
                                               help="hard budget: BitOPs as a ratio of W8A8, in (0, 1]"),
    budget_gbitops: float | None = typer.Option(None, "--budget-gbitops", callback=number(0, lo_open=True),
                                                help="hard budget: absolute GBitOPs (1e9)"),
    budget_weight_mb: float | None = typer.Option(None, "--budget-weight-mb", callback=number(0, lo_open=True),
                                                  help="hard budget on the searched layers' weight MB"),
    budget_size_mb: float | None = typer.Option(None, "--budget-size-mb", callback=number(0, lo_open=True),
                                                help="hard budget on the whole model's weight MB"),
    budget_latency: str | None = typer.Option(None, "--budget-latency", help="hard budget on measured latency: ms "
                                              "(1.5 or 1.5ms) or a ratio of the whole W8A8 / float model "
                                              "(0.8xw8a8, 1.5xfloat); an upper bound only: any policy "
                                              "under it (and under the other limits) qualifies; needs --lut"),
    lut: Path | None = typer.Option(None, "--lut", help="per-layer latency table of `asga lut` (latency budgets)"),
    float_choice: bool = typer.Option(False, "--float-choice", help="a searched layer may also stay float"),
    lam: float = typer.Option(0.0, "--lambda", callback=number(0),
                              help="soft budget lambda (no hard budget), or initial lambda"),
    k_p: float = typer.Option(2.0, "--k-p", callback=number(0),
                              help="budget controller: proportional gain on e = C/T - 1"),
    eta: float = typer.Option(0.1, "--eta", callback=number(0), help="budget controller: integral gain (per step)"),
    lam_max: float = typer.Option(10.0, "--lam-max", callback=number(0),
                                  help="budget controller: clamp of the integral"),
    lam_floor: float = typer.Option(0.1, "--lam-floor", callback=number(0),
                                    help="latency (upper-bound-only) budgets: the least lambda, a tie-breaker "
                                    "towards faster choices below the bound"),
    prior_space: str = typer.Option("logit", "--prior-space", help="the starting cost bias on the raw logits "
                                    "(logit) or on alpha / tau (score)"),
    band: float = typer.Option(0.1, "--band", callback=number(0, 1, hi_open=True),
                               help="budget controller: no action while the cost is in [(1 - band) T, T]"),
    freeze_frac: float = typer.Option(0.15, "--freeze-frac", callback=number(0, 1, hi_open=True),
                                      help="freeze the logits for this last fraction of "
                                      "the steps (the weights keep training)"),
    start_at_budget: bool = typer.Option(True, "--start-at-budget/--no-start-at-budget",
                                         help="start the logits with a cost bias that puts C(alpha_0) at the budget"),
    objective: str = typer.Option("asga", "--objective", help="asga | sam-align | sam | erm"),
    epochs: int = typer.Option(20, "--epochs", min=1),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", **SEED),
    target: str = typer.Option("sim", "--target", help="sim | ort | tensorrt (narrows the candidates)"),
    weight_bits: str = typer.Option("2,3,4,6,8", "--weight-bits", help="candidate weight bit-widths"),
    act_bits: str = typer.Option("2,3,4,6,8", "--act-bits", help="candidate activation bit-widths"),
    no_replace: bool = typer.Option(False, "--no-replace",
                                    help="drop (not lower) candidates the target cannot run"),
    search_edges: bool = typer.Option(False, "--search-edges", help="search the first conv and classifier too"),
    edge_bits: str = typer.Option("8", "--edge-bits", help="first conv / classifier in the policy: 8 | float"),
    tol: float = typer.Option(0.03, "--tol", callback=number(0, 1, lo_open=True, hi_open=True),
                              help="policy cost window [(1 - tol) T, T] of a BitOPs or size "
                              "budget (none below a latency budget)"),
    rho_rule: str | None = typer.Option(None, "--rho-rule", show_default=False,
                                 help="rel | literal | fixed, for asga (sam, sam-align: fixed) [default: rel]"),
    epsilon: float = typer.Option(0.1, "--epsilon", callback=number(0, lo_open=True),
                                  help="largest perturbation radius (rho_0)"),
    rho_min: float = typer.Option(0.01, "--rho-min", callback=number(0)),
    gamma: float = typer.Option(0.001, "--gamma", callback=number(0), help="SAGM alignment coefficient"),
    lr: float = typer.Option(0.01, "--lr", callback=number(0, lo_open=True)),
    alpha_lr: float = typer.Option(0.05, "--alpha-lr", callback=number(0),
                                   help="logit learning rate (Adam), times tau by default"),
    alpha_lr_rule: str = typer.Option("tau-cos", "--alpha-lr-rule", help="tau-cos (alpha_lr * tau, decaying to 0 at "
                                      "the freeze) | tau (alpha_lr * tau) | fixed"),
    perturb: str = typer.Option("latent", "--perturb", help="latent | quantized | asam: what the sharpness step "
                                "perturbs"),
    proxy_seed: int = typer.Option(0, "--proxy-seed", **SEED,
                                   help="seed of the proxy subset, fixed across search seeds"),
    heldout_fraction: float = typer.Option(0.2, "--heldout-fraction", callback=number(0, 1, True, True),
                                           help="--alpha-data heldout: its share"),
    tau_end: float = typer.Option(0.01, "--tau-end", callback=number(0, lo_open=True)),
    alpha_data: str = typer.Option("same", "--alpha-data", help="same | heldout (first-order bi-level)"),
    float_ckpt: Path | None = typer.Option(None, "--float", help="init from a float checkpoint (asga train)"),
    weights: str | None = typer.Option(None, "--weights", help="torchvision: pretrained backbone, new head"),
    cost_input_size: int | None = typer.Option(None, "--cost-input-size", min=1, help="MACs at this (target) size"),
    allow_diagnostics: bool = typer.Option(False, "--allow-diagnostics",
                                           help="write the policy even when the diagnostics fail"),
    out: Path = typer.Option(Path("policies"), "--out", help="folder of the policy file"),
    name: str | None = typer.Option(None, "--name", help="policy file stem (default <model>-<objective>-r<NN>)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="checkpoint folder (default runs/search/...)"),
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    download: bool = typer.Option(False, "--download"),
    workers: int = typer.Option(0, "--workers", min=0),
    force: bool = typer.Option(False, "--force", help="overwrite the policy / restart the run folder"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run folder's checkpoint"),
) -> None:
    """Search a mixed-precision policy and write policies/<model>-<method>-<budget tag>[-<target>].json."""
    from ..budget import Budget
    from ..errors import AsgaError
    from ..search.config import check_search_outputs
    from ..search.proxy import proxy_data
    from ..search.run import SearchConfig, default_run_dir, run_search

    if method == "sensitivity":
        from ..oracle import oracle_policy_file

        if sensitivity is None:
            raise AsgaError("--method sensitivity needs --sensitivity TABLE (written by `asga sensitivity`)")
        budget = Budget.from_options(budget_bitops, budget_gbitops, budget_weight_mb, tol, budget_size_mb,
                                     budget_latency)
        if budget is None:
            raise AsgaError("--method sensitivity needs a budget: --budget-bitops, --budget-gbitops or "
                            "--budget-weight-mb")
        path, pol, info = oracle_policy_file(sensitivity, budget, oracle, pick, seed, out, name, force, lut)
        console.print(f"wrote {path}: BitOPs {pol.cost['bitops_vs_w8a8']:.4f} of W8A8, weight bytes "
                      f"{pol.cost['weight_bytes']:.0f}; predicted loss increase "
                      + ", ".join(f"{k} {v:+.4f}" for k, v in info["predicted"].items()))
        return
    if model is None or dataset is None:
        raise AsgaError("--method supernet needs --model and --dataset")
    if float_ckpt is not None and weights is not None:
        raise AsgaError("give --float or --weights, not both")
    if weights not in (None, "torchvision"):
        raise AsgaError(f"--weights {weights!r}: only 'torchvision' (use --float for a checkpoint)")
    init = str(float_ckpt) if float_ckpt is not None else (weights or "scratch")
    cfg = SearchConfig(model=model, dataset=dataset, subset=subset, fraction=fraction, objective=objective,
                       epochs=epochs, batch_size=batch_size, seed=seed, target=target,
                       weight_bits=_bits(weight_bits, "weight-bits"), act_bits=_bits(act_bits, "act-bits"),
                       replace_unsupported=not no_replace, search_edges=search_edges, edge_bits=edge_bits,
                       budget_bitops=budget_bitops, budget_gbitops=budget_gbitops,
                       budget_weight_mb=budget_weight_mb, budget_size_mb=budget_size_mb,
                       budget_latency=budget_latency, lut=str(lut) if lut else None, float_choice=float_choice,
                       lam=lam, tol=tol,
                       k_p=k_p, eta=eta, lam_max=lam_max, lam_floor=lam_floor, band=band, prior_space=prior_space, freeze_frac=freeze_frac, start_at_budget=start_at_budget,
                       alpha_lr_rule=alpha_lr_rule, perturb=perturb, proxy_seed=proxy_seed,
                       heldout_fraction=heldout_fraction,
                       tau_end=tau_end, lr=lr, alpha_lr=alpha_lr, gamma=gamma, epsilon=epsilon, rho_min=rho_min,
                       rho_rule=rho_rule, alpha_data=alpha_data, init=init, cost_input_size=cost_input_size,
                       allow_diagnostics=allow_diagnostics)
    check_search_outputs(out, run_dir or default_run_dir(cfg), name)  # before reading data or searching
    data = proxy_data(cfg, data_dir, download, workers)
    progress = RichProgress(keys=("loss", "gap", "rho", "cost", "train_loss", "expected_cost", "argmax_cost"))
    command = _command_line(ctx)
    try:
        res = run_search(cfg, data, out, run_dir, command, progress, resume=resume, force=force, name=name)
    finally:
        progress.close()
    c, m = res.policy.cost, res.metrics
    console.print(f"wrote {res.policy_path}: BitOPs {c['bitops_vs_w8a8']:.4f} of W8A8, weight bytes "
                  f"{c['weight_bytes']:.0f}; argmax last changed in epoch {m['argmax_last_change_epoch']}; "
                  f"extraction differs from argmax in {m['extraction_vs_argmax_choices']} choices; "
                  f"checkpoints in {res.run_dir}")
