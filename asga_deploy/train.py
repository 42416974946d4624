"""The one training loop, for float training and QAT: SGD + cosine, checkpoint/resume, DDP-aware.

Resume is exact on one device: every epoch's data order is a function of (seed, epoch) and the
checkpoint carries model, optimizer, scheduler and RNG states, so stopping after epoch k and
resuming ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from . import data
from .checkpoint import (
    check_resume_config,
    load_checkpoint,
    plain_provenance,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .dist import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from .errors import CheckpointError, DatasetError, OutputExistsError, TrainingDivergedError
from .evaluate import evaluate
from .io import atomic_write_json, check_name, check_writable, machine_info, provenance, versions
from .models import create_model, model_info
from .naming import safe_name
from .policy import costs_at
from .progress import Callback, ProgressEvent, emit
from .quant import FakeQuantizer
from .validate import check_int, check_recipe

# options that may change between a run and its resumption without changing the result
RESUME_FREE = frozenset({"workers", "device", "data_dir", "download", "out_dir", "run", "allow_incomplete"})


@dataclass(frozen=True)
class Recipe:
    """The optimisation recipe the loop runs (shared by float training and QAT)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    workers: int = 0
    amp_bf16: bool = False
    freeze_bn_after: int | None = None  # epochs after which BatchNorm statistics are frozen
    kd_temperature: float = 4.0
    kd_alpha: float = 0.0  # weight of the distillation term (0: no teacher)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `asga train` needs; recorded whole in float.pt and train.json."""

    model: str = "smallcnn"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 3  # smallcnn on Fashion-MNIST: 91.2% top-1 (measured; 88.9% with --augment)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    workers: int = 0
    augment: bool = False  # crop+flip slows short schedules of small models down (measured)
    download: bool = False
    in_chans: int | None = None
    input_size: int | None = None
    train_limit: int | None = None  # a class-balanced seeded subset of the training split
    test_limit: int | None = None
    exclude_proxy: int | None = None  # leave out the search proxy of this size (drawn with proxy_seed) from training
    proxy_seed: int = 0
    device: str = "auto"
    amp_bf16: bool = False
    out_dir: str = "export"
    run: str | None = None

    def recipe(self) -> Recipe:
        """Return the loop recipe of this config."""
        return Recipe(self.epochs, self.batch_size, self.lr, self.momentum, self.nesterov, self.weight_decay,
                      self.warmup_epochs, self.label_smoothing, self.seed, self.workers, self.amp_bf16)

    def run_name(self) -> str:
        """Return the run folder name (given, or model-dataset)."""
        return self.run or safe_name(f"{self.model}-{self.dataset}")


def check_outputs(ckpt_path: Path, report_path: Path) -> None:
    """Raise AsgaError, before any data is read, when a run's checkpoint or report cannot be written there."""
    for p in (ckpt_path, report_path):
        check_writable(p, force=True)  # existence is prepare_run's question (--resume / --force)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_factor(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return factor


def optimizer_for(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """Return the SGD of a recipe: weight decay on weights, none on LSQ step sizes."""
    # LSQ step sizes are not weights: decaying them would shrink the quantization grid
    no_decay = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    rest = [p for p in model.parameters() if id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": r.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0)


def _loss(out, y, r: Recipe, teacher_out=None):
    loss = F.cross_entropy(out, y, label_smoothing=r.label_smoothing)
    if teacher_out is None or r.kd_alpha <= 0:
        return loss
    t = r.kd_temperature
    kd = F.kl_div(F.log_softmax(out / t, 1), F.softmax(teacher_out / t, 1), reduction="batchmean") * t * t
    return (1 - r.kd_alpha) * loss + r.kd_alpha * kd


def fit(model: nn.Module, train_set, test_set, r: Recipe, info: DistInfo, ckpt_path: Path, meta: dict,
        resume: dict | None = None, callback: Callback | None = None, stage: str = "train",
        teacher: nn.Module | None = None) -> dict:
    """Train model (in place) for r.epochs, checkpointing every epoch; return the final metrics record.

    meta holds the checkpoint's fixed entries (kind, model_name, config, ...); meta["metrics"] extra
    metrics. Only rank 0 writes and reports; loss, correct and count are summed over ranks.
    """
    cb = callback if info.is_main else None
    dev = info.device
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
    train_loader = data.make_loader(train_set, r.batch_size, True, r.seed, r.workers, info.distributed,
                                    drop_last=len(train_set) > r.batch_size * info.world)
    test_loader = data.make_loader(test_set, max(r.batch_size, 256), False, r.seed, r.workers, info.distributed)
    opt = optimizer_for(model, r)
    steps = len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(r.warmup_epochs * steps, r.epochs * steps))
    start, history, spent = 0, [], 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        start = int(resume["epoch"])
        history = list(resume["metrics"].get("history", []))
        spent = float(resume["metrics"].get("time_s", 0.0))
    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=r.amp_bf16)
    record = dict(meta.get("metrics", {}))
    if resume is not None:  # a complete run resumed again reports what it had
        record.update(resume["metrics"])
    for epoch in range(start, r.epochs):
        t0 = time.perf_counter()
        data.set_epoch(train_loader, epoch)
        net.train()
        if r.freeze_bn_after is not None and epoch >= r.freeze_bn_after:
            for m in bn:  # fixed statistics for the last QAT epochs
                m.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for step, (x, y) in enumerate(train_loader, 1):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with amp:
                out = net(x)
                t_out = None
                if teacher is not None and r.kd_alpha > 0:
                    with torch.no_grad():
                        t_out = teacher(x).float()
                loss = _loss(out.float(), y, r, t_out)
            value = loss.item()
            # every rank must agree to stop, or the others would wait forever in the next all-reduce
            check = all_reduce_sum([value], info)[0] if info.distributed else value
            if not math.isfinite(check):
                last = f"the last good checkpoint {ckpt_path} (epoch {epoch}) is kept" if epoch else \
                    "no checkpoint was written"
                raise TrainingDivergedError(
                    f"{stage}: loss is {value} at epoch {epoch + 1} step {step}; {last}; "
                    f"lower --lr (now {r.lr}) or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = y.numel()
            loss_sum += value * n
            correct += (out.argmax(1) == y).sum().item()
            count += n
            if cb is not None:
                ips = count * info.world / max(time.perf_counter() - t0, 1e-9)
                emit(cb, ProgressEvent("step", stage, epoch + 1, r.epochs, step, steps,
                                       {"loss": value, "acc": correct / count, "img/s": ips}))
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], info)
        test = evaluate(model, test_loader, dev, info)
        spent += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                        "train_top1": correct / max(count, 1), "test_top1": test["top1"],
                        "test_loss": test["loss"], "test_count": test["count"],
                        "lr": opt.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - t0})
        record.update({"history": history, "top1": test["top1"], "test_loss": test["loss"],
                       "test_count": test["count"], "epochs_done": epoch + 1, "time_s": spent,
                       "world_size": info.world})
        if info.is_main:
            ckpt = {**meta, "model": model.state_dict(), "epoch": epoch + 1, "complete": epoch + 1 == r.epochs,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                    "metrics": record, "provenance": plain_provenance(dataset=meta.get("dataset"), seed=r.seed)}
            save_checkpoint(ckpt, ckpt_path)
        barrier(info)
        emit(cb, ProgressEvent("epoch", stage, epoch + 1, r.epochs, steps, steps,
                               {k: v for k, v in history[-1].items() if k != "epoch"}))
    emit(cb, ProgressEvent("end", stage, r.epochs, r.epochs))
    return record


def prepare_run(ckpt_path: Path, kind: str, config: dict, resume: bool, force: bool) -> dict | None:
    """Return the checkpoint to resume from (or None to start fresh); refuse to overwrite without force."""
    if ckpt_path.exists() and resume:
        ckpt = load_checkpoint(ckpt_path, kind, allow_incomplete=True)
        lost = [k for k, typ in (("optimizer", dict), ("scheduler", dict), ("rng", dict), ("epoch", int),
                                 ("metrics", dict), ("config", dict)) if not isinstance(ckpt.get(k), typ)]
        if lost:
            raise CheckpointError(f"{ckpt_path} cannot be resumed: its {', '.join(lost)} entries are missing or "
                                  "damaged; pass --force to start over")
        check_resume_config(ckpt.get("config", {}), config, ckpt_path, RESUME_FREE)
        return ckpt
    if ckpt_path.exists() and not force:
        raise OutputExistsError(f"{ckpt_path} exists; pass --resume to continue that run or --force to overwrite it")
    return None


@dataclass
class TrainResult:
    """What run_train produced: the checkpoint, the report, and whether this process is rank 0."""

    checkpoint: Path
    report_path: Path
    report: dict
    is_main: bool


def run_train(cfg: TrainConfig, resume: bool = False, force: bool = False,
              callback: Callback | None = None) -> TrainResult:
    """Train a float model; write <out>/<run>/float.pt every epoch and train.json at the end."""
    check_name(cfg.run, "--run")
    check_recipe(cfg.recipe())
    info = model_info(cfg.model)
    spec = data.dataset_spec(cfg.dataset, cfg.data_dir)
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    ckpt_path, report_path = run_dir / "float.pt", run_dir / "train.json"
    check_outputs(ckpt_path, report_path)
    state = prepare_run(ckpt_path, "float", asdict(cfg), resume, force)
    in_chans = cfg.in_chans or spec.in_chans
    size = cfg.input_size or (info.input_size if cfg.dataset == "imagefolder" else spec.input_size)
    costs_at(create_model(cfg.model, spec.num_classes, in_chans), (in_chans, size, size), cfg.model,
             f"{cfg.dataset}'s")
    for k in ("train_limit", "test_limit", "exclude_proxy"):
        if getattr(cfg, k) is not None:
            check_int(f"--{k.replace('_', '-')}", getattr(cfg, k), 1)
    train_set, test_set = (data.get_dataset(cfg.dataset, s, cfg.data_dir, in_chans, size,
                                            augment=cfg.augment and s == "train", download=cfg.download)
                           for s in ("train", "test"))
    excluded = None
    if cfg.exclude_proxy:  # the float model that initialises a search never sees that search's proxy images
        proxy, fp = data.proxy_subset(train_set, cfg.exclude_proxy, cfg.proxy_seed, cfg.dataset, "train")
        held = set(proxy.indices)
        train_set = Subset(train_set, [i for i in range(len(train_set)) if i not in held])
        if not len(train_set):
            raise DatasetError(f"--exclude-proxy {cfg.exclude_proxy} leaves no training image ({cfg.dataset} holds "
                               f"{len(held)}); exclude a smaller proxy")
        excluded = {"size": len(held), "seed": cfg.proxy_seed, "fingerprint": fp}
    if cfg.train_limit:
        train_set, _ = data.proxy_subset(train_set, cfg.train_limit, cfg.seed, cfg.dataset, "train")
    if cfg.test_limit:
        test_set, _ = data.proxy_subset(test_set, cfg.test_limit, cfg.seed, cfg.dataset, "test")
    dist = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)
        model = create_model(cfg.model, num_classes=spec.num_classes, in_chans=in_chans)
        meta = {"kind": "float", "model_name": cfg.model, "num_classes": spec.num_classes, "in_chans": in_chans,
                "input_size": size, "dataset": cfg.dataset, "config": asdict(cfg), "excluded_proxy": excluded}
        if state is not None and dist.is_main:
            emit(callback, ProgressEvent("info", "train", message=f"resuming {ckpt_path} after epoch {state['epoch']}"))
        record = fit(model, train_set, test_set, cfg.recipe(), dist, ckpt_path, meta, state, callback, "train")
        report = {"config": asdict(cfg), "model": cfg.model, "dataset": cfg.dataset,
                  "top1_per_epoch": [h["test_top1"] for h in record["history"]], "top1": record["top1"],
                  "test_count": record["test_count"], "time_s": record["time_s"], "history": record["history"],
                  "world_size": dist.world, "machine": machine_info(), "versions": versions(),
                  "provenance": provenance(dataset=cfg.dataset, seed=cfg.seed), "checkpoint": str(ckpt_path)}
        if dist.is_main:
            atomic_write_json(report_path, report)
        barrier(dist)
        return TrainResult(ckpt_path, report_path, report, dist.is_main)
    finally:
        shutdown(dist)
