"""What a search is given (SearchConfig, SearchData) and what it returns (SearchResult)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..budget import Budget
from ..errors import AsgaError
from ..io import check_name, check_output_dir
from ..naming import artifact_stem
from ..policy import Policy
from .objective import rho_rule_for
from .supernet import DEFAULT_BITS

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
    epochs: int = 20  # two seeds agreed on 0.8 of resnet20-w0.5's layers after 20 epochs, 0.5 after 10 (tuning)
    batch_size: int = 64
    seed: int = 0
    target: str = "sim"
    weight_bits: tuple[int, ...] = DEFAULT_BITS
    act_bits: tuple[int, ...] = DEFAULT_BITS
    replace_unsupported: bool = True
    search_edges: bool = False
    edge_bits: str = "8"  # "8" or "float": the first conv and classifier in the written policy
    budget_bitops: float | None = None  # ratio of W8A8 BitOPs, in (0, 1]
    budget_gbitops: float | None = None  # absolute BitOPs, in units of 1e9
    budget_weight_mb: float | None = None  # searched layers' weight megabytes (1e6 bytes)
    budget_size_mb: float | None = None  # the whole model's weight megabytes
    budget_latency: str | None = None  # "1.5ms" or a ratio of the whole W8A8 / float model: "0.8xw8a8", "1.5xfloat"
    lut: str | None = None  # the measured per-layer latency table (asga lut) a latency budget is priced with
    float_choice: bool = False  # a searched layer may also stay float (FP32 on ORT, FP16 on TensorRT)
    lam: float = 0.0  # soft budget lambda, or the controller's initial lambda
    k_p: float = 2.0  # controller gains on e = C/T - 1 (method.md 6), tuned on resnet20 and smallcnn
    eta: float = 0.1
    lam_max: float = 10.0
    lam_floor: float = 0.1  # an upper-bound-only (latency) budget: lambda_used >= this, so that below the bound the
    # faster choice wins where the loss is indifferent (without it a loose budget returned slower policies)
    band: float = 0.1  # the controller acts only outside [(1 - band) T, T]
    start_at_budget: bool = True  # logits start with a cost bias that puts C(alpha_0) at the budget
    prior_space: str = "logit"  # the cost bias on the raw logits ("logit") or on alpha / tau ("score")
    freeze_frac: float = 0.15  # the logits are frozen for this last fraction of the steps; the weights train on
    tol: float = 0.03
    tau_start: float = 1.0
    tau_end: float = 0.01
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha_lr: float = 0.05
    alpha_lr_rule: str = "tau-cos"  # "tau": the logit step is alpha_lr * tau (a constant step in alpha / tau);
    # "tau-cos": that times a cosine decay to 0 at the freeze (the argmax settles); "fixed"
    alpha_init: float = 0.01
    gamma: float = 0.001
    epsilon: float = 0.1
    rho_min: float = 0.01
    rho_rule: str | None = None  # None: "rel" for asga and erm; sam and sam-align always use "fixed" (method.md 4)
    perturb: str = "latent"  # latent | quantized | asam: what the sharpness step perturbs (search/perturb.py)
    alpha_data: str = "same"  # "same" batch, or "heldout" proxy batches (first-order bi-level)
    heldout_fraction: float = 0.2
    proxy_seed: int = 0  # draws the proxy (and its held-out part), fixed across search seeds
    init: str = "scratch"  # "scratch", "torchvision", or a float checkpoint path
    cost_input_size: int | None = None  # MACs at the TARGET input size (default: the data's)
    allow_diagnostics: bool = False

    def __post_init__(self) -> None:
        if self.objective in ("sam", "sam-align") and self.rho_rule not in (None, "fixed"):
            raise AsgaError(f"--rho-rule {self.rho_rule} applies to asga only: {self.objective} keeps rho = epsilon "
                            "(the ablation of method.md section 4); drop --rho-rule or use --objective asga")
        object.__setattr__(self, "rho_rule", rho_rule_for(self.objective, self.rho_rule))  # the rule that runs

    def budget(self) -> Budget | None:
        """Return the hard budget of this search (None: a soft budget with a fixed lambda)."""
        return Budget.from_options(self.budget_bitops, self.budget_gbitops, self.budget_weight_mb, self.tol,
                                   self.budget_size_mb, self.budget_latency)

    def stem(self) -> str:
        """Return the artifact stem of this search: <model>-<objective>-<budget tag>[-<target>]."""
        budget = self.budget()
        return artifact_stem(self.model, self.objective, budget.tag() if budget else f"lam{self.lam:g}",
                             self.target)

    def as_dict(self) -> dict:
        """Return the config as stored in checkpoints and policies (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


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


def check_search_outputs(out_dir: str | Path, run_dir: str | Path, name: str | None) -> None:
    """Raise AsgaError, before any data is read or any step taken, when the policy folder or the run folder
    cannot be written or --name is not a plain file name."""
    check_name(name, "--name")
    check_output_dir(out_dir)
    check_output_dir(run_dir)
