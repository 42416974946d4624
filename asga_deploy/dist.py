"""torch.distributed helpers: init from torchrun's environment, rank checks, metric reduction."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import AsgaError, MissingDependencyError


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: rank, world size, local rank, device, and whether we started the group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files and reports progress)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Return the torch device for 'auto', 'cpu', 'cuda' or 'cuda:N' (auto: this rank's GPU if any)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"--device {device} asked for, but CUDA is not available here; "
                                         "use --device cpu")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    if device != "cpu":
        raise AsgaError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # NCCL only moves CUDA tensors; gloo is the CPU backend
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def shutdown(info: DistInfo) -> None:
    """Leave the process group if init_distributed created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Return the element-wise sum of values over all ranks (float64, so counts stay exact)."""
    if not info.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Return True if flag is True on any rank."""
    return all_reduce_sum([1.0 if flag else 0.0], info)[0] > 0
