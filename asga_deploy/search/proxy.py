"""The proxy data of a search from asga_deploy.data: a class-balanced subset, optionally a held-out part."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset

from .. import data as D
from ..checkpoint import incomplete_note, load_checkpoint
from ..errors import CheckpointError, DatasetError
from ..evaluate import check_channels, check_classes
from ..models import create_model
from ..policy import costs_at
from .config import SearchConfig, SearchData


def check_init(cfg: SearchConfig, spec: D.DataSpec) -> None:
    """Raise AsgaError when the search's float checkpoint or input sizes do not fit its model and data."""
    model = create_model(cfg.model, spec.num_classes, spec.in_chans)
    sizes = {spec.input_size: f"{cfg.dataset}'s", cfg.cost_input_size or spec.input_size: "--cost-input-size"}
    for size, what in sizes.items():
        costs_at(model, (spec.in_chans, size, size), cfg.model, what)
    if cfg.init in ("scratch", "torchvision"):
        return
    ck = load_checkpoint(cfg.init, "float", allow_incomplete=True)
    note = incomplete_note(ck)
    if note:
        raise CheckpointError(f"{cfg.init} is incomplete ({note}); finish that training first (the same "
                              "`asga train` command with --resume): a search starts only from a finished float model")
    if ck["model_name"] != cfg.model:
        raise CheckpointError(f"{cfg.init} holds a {ck['model_name']} model but the search is for --model "
                              f"{cfg.model}; pass the float.pt of a {cfg.model} (asga train --model {cfg.model})")
    check_classes(cfg.dataset, spec.num_classes, int(ck["num_classes"]), cfg.init)
    check_channels(cfg.dataset, spec.in_chans, int(ck["in_chans"]), cfg.init, ck.get("dataset"))


def proxy_data(cfg: SearchConfig, data_dir: str | Path | None = None, download: bool = False,
               workers: int = 0) -> SearchData:
    """Return SearchData: the proxy (and its held-out part) drawn with proxy_seed, the batch order a function of
    (seed, epoch) only."""
    if cfg.subset is not None and cfg.fraction is not None:
        raise DatasetError("give --subset or --fraction, not both")
    spec = D.dataset_spec(cfg.dataset, data_dir)
    check_init(cfg, spec)  # before the data is read
    full = D.get_dataset(cfg.dataset, "train", data_dir, download=download)
    size = cfg.subset if cfg.subset is not None else (cfg.fraction if cfg.fraction is not None else 1.0)
    subset, fp = D.proxy_subset(full, size, cfg.proxy_seed, cfg.dataset, "train")  # fixed across search seeds
    held = None
    if cfg.alpha_data == "heldout":
        if not 0.0 < cfg.heldout_fraction < 1.0:
            raise DatasetError(f"--heldout-fraction {cfg.heldout_fraction} must be in (0, 1)")
        perm = torch.randperm(len(subset), generator=torch.Generator().manual_seed(cfg.proxy_seed + 7919)).tolist()
        k = max(1, round(cfg.heldout_fraction * len(subset)))
        if k >= len(subset):
            raise DatasetError(f"proxy of {len(subset)} images is too small to hold out {k} for the logits")
        idx = list(subset.indices)
        held = Subset(full, sorted(idx[i] for i in perm[:k]))
        subset = Subset(full, sorted(idx[i] for i in perm[k:]))
    loader = D.make_loader(subset, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=workers)
    held_loader = (D.make_loader(held, cfg.batch_size, shuffle=True, seed=cfg.seed + 1, workers=workers)
                   if held is not None else None)

    def train(epoch: int):
        D.set_epoch(loader, epoch)
        return loader

    def heldout(epoch: int):
        D.set_epoch(held_loader, epoch)
        return held_loader

    return SearchData(cfg.dataset, fp, spec.num_classes, spec.in_chans, spec.input_size, len(subset), len(loader),
                      train, heldout if held_loader is not None else None,
                      {"proxy_size": len(subset), "heldout_size": len(held) if held is not None else 0,
                       "full_size": len(full), "split": "train"})
