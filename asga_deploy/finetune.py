"""QAT with a fixed policy: float weights -> apply_policy -> calibrate -> the train.py loop.

The recipe follows the paper: SGD with Nesterov momentum 0.9, lr 0.04, cosine decay, a linear
warm-up, no weight decay on the quantizer step sizes, optional distillation from the float model.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from . import data
from .checkpoint import incomplete_note, load_checkpoint, load_weights
from .dist import barrier, init_distributed, shutdown
from .errors import AsgaError, CheckpointError, PolicyError
from .evaluate import check_channels, check_classes, evaluate
from .io import atomic_write_json, check_name, machine_info, provenance, versions
from .models import create_model, model_info
from .naming import safe_name
from .policy import Policy, check_policy_shape, validate_policy
from .progress import Callback, ProgressEvent, emit
from .quant import apply_policy, calibrate
from .train import Recipe, TrainResult, check_outputs, fit, prepare_run, seed_everything
from .validate import check_int, check_number, check_recipe


def default_warmup(epochs: int) -> int:
    """Return the warm-up epochs: the paper's 5 for long runs, a fifth of a short run (0 below 5 epochs)."""
    return min(5, epochs // 5)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `asga finetune` needs; recorded whole in finetuned.pt and finetune.json."""

    policy: str
    float_checkpoint: str | None = None
    weights: str | None = None  # "torchvision": the torchvision pretrained weights (needs internet)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.04
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    warmup_epochs: int | None = None  # None: default_warmup(epochs)
    label_smoothing: float = 0.0
    kd: bool = False
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    freeze_bn_after: int | None = None
    calib_batches: int = 4
    seed: int = 0
    workers: int = 0
    augment: bool = False
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    device: str = "auto"
    amp_bf16: bool = False
    out_dir: str = "export"
    run: str | None = None
    allow_incomplete: bool = False  # accept a float checkpoint of an interrupted `asga train` (recorded)

    def recipe(self) -> Recipe:
        """Return the loop recipe of this config."""
        warm = default_warmup(self.epochs) if self.warmup_epochs is None else self.warmup_epochs
        return Recipe(self.epochs, self.batch_size, self.lr, self.momentum, self.nesterov, self.weight_decay,
                      warm, self.label_smoothing, self.seed, self.workers, self.amp_bf16, self.freeze_bn_after,
                      self.kd_temperature, self.kd_alpha if self.kd else 0.0)

    def run_name(self) -> str:
        """Return the output folder name: given, or the policy file's stem (its identity)."""
        return self.run or safe_name(Path(self.policy).stem)


def _float_model(cfg: FinetuneConfig, policy: Policy, num_classes: int, in_chans: int) -> tuple[nn.Module, dict]:
    """Return the float model with its weights and the facts recorded with them."""
    if cfg.float_checkpoint and cfg.weights:
        raise AsgaError("give either --float CHECKPOINT or --weights torchvision, not both")
    if cfg.float_checkpoint:
        path = Path(cfg.float_checkpoint)
        ck = load_checkpoint(path, "float", cfg.allow_incomplete)
        name = ck.get("model_name")
        if name != policy.model:
            raise CheckpointError(f"{path} holds a {name} model but policy {cfg.policy} is for {policy.model}; "
                                  f"train one with `asga train --model {policy.model}` or pick the matching policy")
        check_classes(cfg.dataset, num_classes, int(ck["num_classes"]), str(path))
        check_channels(cfg.dataset, in_chans, int(ck["in_chans"]), str(path), ck.get("dataset"))
        in_chans = int(ck.get("in_chans", in_chans))
        model = create_model(policy.model, num_classes=num_classes, in_chans=in_chans)
        try:
            load_weights(model, path, policy.model)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("\n", " ")) from None
        return model, {"in_chans": in_chans, "input_size": ck.get("input_size"), "source": str(path),
                       "incomplete": incomplete_note(ck)}
    if cfg.weights == "torchvision":
        try:
            model = create_model(policy.model, num_classes=num_classes, in_chans=in_chans, weights="torchvision")
        except AsgaError:
            raise
        except Exception as e:  # no internet, no weights cache
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"torchvision weights for {policy.model} could not be loaded: {first}") from None
        return model, {"in_chans": in_chans, "input_size": None, "source": "torchvision"}
    if cfg.weights:
        raise AsgaError(f"--weights {cfg.weights!r}: only 'torchvision' is known; use --float for a file")
    raise AsgaError("fine-tuning needs float weights: pass --float export/<run>/float.pt (from `asga train`) "
                    "or --weights torchvision")


def run_finetune(cfg: FinetuneConfig, resume: bool = False, force: bool = False,
                 callback: Callback | None = None) -> TrainResult:
    """Fine-tune a policy's quantized model; write <out>/<run>/finetuned.pt every epoch and finetune.json."""
    check_name(cfg.run, "--run")
    check_recipe(cfg.recipe())
    check_number("--kd-alpha", cfg.kd_alpha, 0, 1)
    for k in ("train_limit", "test_limit"):
        if getattr(cfg, k) is not None:
            check_int(f"--{k.replace('_', '-')}", getattr(cfg, k), 1)
    check_int("--calib-batches", cfg.calib_batches, 1)
    policy = Policy.load(cfg.policy)
    info = model_info(policy.model)
    spec = data.dataset_spec(cfg.dataset, cfg.data_dir)
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    ckpt_path, report_path = run_dir / "finetuned.pt", run_dir / "finetune.json"
    check_outputs(ckpt_path, report_path)
    if resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path, "finetuned", allow_incomplete=True)
        diff = Policy.from_dict(saved.get("policy"), f"{ckpt_path} (embedded policy)").diff(policy)
        if diff:
            raise PolicyError(f"{ckpt_path} was trained with another policy than {cfg.policy}; differing layers: "
                              + ", ".join(diff) + "; pass --force to start over")
    state = prepare_run(ckpt_path, "finetuned", asdict(cfg), resume, force)
    seed_everything(cfg.seed)
    model, facts = _float_model(cfg, policy, spec.num_classes, spec.in_chans)
    validate_policy(policy, model, cfg.policy)  # before any data is touched: bad input fails fast
    in_chans = facts["in_chans"]
    size = int(facts["input_size"] or (info.input_size if cfg.dataset == "imagefolder" else spec.input_size))
    check_policy_shape(policy, (in_chans, size, size), cfg.policy)
    train_set, test_set = (data.get_dataset(cfg.dataset, s, cfg.data_dir, in_chans, size,
                                            augment=cfg.augment and s == "train", download=cfg.download)
                           for s in ("train", "test"))
    calib_set = data.get_dataset(cfg.dataset, "train", cfg.data_dir, in_chans, size, augment=False)
    if cfg.train_limit:
        train_set, _ = data.proxy_subset(train_set, cfg.train_limit, cfg.seed, cfg.dataset, "train")
        calib_set, _ = data.proxy_subset(calib_set, cfg.train_limit, cfg.seed, cfg.dataset, "train")
    if cfg.test_limit:
        test_set, _ = data.proxy_subset(test_set, cfg.test_limit, cfg.seed, cfg.dataset, "test")
    dist = init_distributed(cfg.device)
    cb = callback if dist.is_main else None
    try:
        teacher = copy.deepcopy(model) if cfg.kd else None
        if state is not None:
            float_top1 = float(state["metrics"].get("float_top1", float("nan")))
            emit(cb, ProgressEvent("info", "finetune", message=f"resuming {ckpt_path} after epoch {state['epoch']}"))
        else:
            test_loader = data.make_loader(test_set, 256, False, cfg.seed, cfg.workers, dist.distributed)
            float_top1 = evaluate(model.to(dist.device), test_loader, dist.device, dist)["top1"]
            emit(cb, ProgressEvent("info", "finetune", message=f"float model top-1 {float_top1:.4f}"))
        apply_policy(model, policy, validate=False)
        model.to(dist.device)
        if state is None:
            # the same seeded batches on every rank give every rank the same step sizes
            calib = data.make_loader(calib_set, cfg.batch_size, True, cfg.seed + 1)
            calibrate(model, calib, cfg.calib_batches)
        meta = {"kind": "finetuned", "model_name": policy.model, "num_classes": spec.num_classes,
                "in_chans": in_chans, "input_size": size, "dataset": cfg.dataset, "config": asdict(cfg),
                "policy": policy.to_dict(), "float_source": facts["source"],
                "float_incomplete": facts.get("incomplete"), "metrics": {"float_top1": float_top1}}
        record = fit(model, train_set, test_set, cfg.recipe(), dist, ckpt_path, meta, state, callback, "finetune",
                     teacher)
        report = {"config": asdict(cfg), "recipe": asdict(cfg.recipe()), "model": policy.model,
                  "policy": cfg.policy, "target": policy.target, "dataset": cfg.dataset,
                  "float_top1": float_top1, "float_incomplete": facts.get("incomplete"), "top1_per_epoch": [h["test_top1"] for h in record["history"]],
                  "top1": record["top1"], "test_count": record["test_count"], "time_s": record["time_s"],
                  "history": record["history"], "world_size": dist.world, "machine": machine_info(),
                  "versions": versions(), "provenance": provenance(dataset=cfg.dataset, seed=cfg.seed),
                  "checkpoint": str(ckpt_path)}
        if dist.is_main:
            atomic_write_json(report_path, report)
        barrier(dist)
        return TrainResult(ckpt_path, report_path, report, dist.is_main)
    finally:
        shutdown(dist)
