"""Hutchinson estimates of Hessian traces per layer (HAWQ-V2): for a layer's weight and for its input.

Tr(H) = E[v^T H v] over Rademacher vectors v; H v comes from a second backward pass. One pass serves
every layer at once: with independent v per layer the cross terms vanish in expectation, so each
layer's estimate is unbiased (only noisier than one pass per layer).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def _rademacher(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, generator=g).to(t.dtype).mul_(2).sub_(1)


def _add_probe(probes: dict[str, torch.Tensor], n: str, inp: tuple) -> tuple:
    """Forward pre-hook body: add a zero tensor to the input, whose derivatives are the input's."""
    probes[n] = torch.zeros_like(inp[0], requires_grad=True)
    return (inp[0] + probes[n], *inp[1:])


def hutchinson_traces(model: nn.Module, names: list[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      samples: int = 4, seed: int = 0) -> dict[str, dict[str, float]]:
    """Return {layer: {"weight", "input", "input_numel"}}: mean Hessian traces of the loss (eval-mode model)."""
    layers = {n: model.get_submodule(n) for n in names}
    g = torch.Generator().manual_seed(seed)
    sums = {n: {"weight": 0.0, "input": 0.0, "input_numel": 0} for n in names}
    count = 0
    was = model.training
    model.eval()
    try:
        for x, y in batches:
            probes: dict[str, torch.Tensor] = {}
            hooks = [m.register_forward_pre_hook(lambda m, inp, n=n, p=probes: _add_probe(p, n, inp))
                     for n, m in layers.items()]
            try:
                loss = F.cross_entropy(model(x), y)
            finally:
                for h in hooks:
                    h.remove()
            params = [layers[n].weight for n in names] + [probes[n] for n in names]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for _ in range(samples):
                vs = [_rademacher(p, g) for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                for i, n in enumerate(names):
                    sums[n]["weight"] += float((vs[i] * hv[i]).sum())
                    k = len(names) + i
                    sums[n]["input"] += float((vs[k] * hv[k]).sum())
            for n in names:
                sums[n]["input_numel"] = probes[n].numel()
            count += samples
    finally:
        model.train(was)
    return {n: {"weight": v["weight"] / max(count, 1), "input": v["input"] / max(count, 1),
                "input_numel": v["input_numel"]} for n, v in sums.items()}
