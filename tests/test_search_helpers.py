"""Helpers of the search tests: a tiny supernet and synthetic SearchData (no files, no data.py)."""

from __future__ import annotations

import copy

import torch

from asga_deploy.cost import layer_costs
from asga_deploy.models import create_model, edge_layers
from asga_deploy.search.run import SearchData
from asga_deploy.search.supernet import Supernet

SIZE = 12  # tiny inputs keep every step in milliseconds


def batches(n: int, batch: int = 8, seed: int = 0, size: int = SIZE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return n learnable synthetic (x, y) batches: a fixed pattern per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, size, size, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=g)
        out.append((templates[y] + 0.5 * torch.randn(batch, 1, size, size, generator=g), y))
    return out


def tiny_supernet(model: str = "tinynet", bits=(2, 3, 4, 6, 8), target: str = "sim", seed: int = 0,
                  keep_float: bool = False):
    """Return a supernet of a registered tiny model (and optionally a float copy made before the swap)."""
    torch.manual_seed(seed)
    m = create_model(model, 10, 1)
    x = batches(1, 16, seed=seed)[0][0]
    float_copy = copy.deepcopy(m) if keep_float else None
    costs = layer_costs(m, (1, SIZE, SIZE), example=x)
    net = Supernet.build(m, model, costs, x, bits, bits, target, edge_layers(m), num_classes=10,
                         input_shape=(1, SIZE, SIZE))
    return (net, float_copy, x) if keep_float else net


def search_data(n_train: int = 4, batch: int = 8, nan_at_epoch: int | None = None) -> SearchData:
    """Return SearchData over fixed synthetic batches; the order depends on the epoch only."""
    base = batches(n_train, batch)

    def train(epoch: int):
        g = torch.Generator().manual_seed(1000 + epoch)
        order = torch.randperm(len(base), generator=g).tolist()
        for i in order:
            x, y = base[i]
            if nan_at_epoch is not None and epoch + 1 == nan_at_epoch:
                x = x * float("nan")
            yield x, y

    held = batches(2, batch, seed=99)

    def heldout(epoch: int):
        return iter(held)

    return SearchData("synthetic", "fp-synthetic", 10, 1, SIZE, n_train * batch, n_train, train, heldout)
